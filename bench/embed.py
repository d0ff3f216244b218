"""Embedding throughput and retrieval quality per model on the shared clothing photos.

For each model: decode+preprocess img/s, model-only img/s at batch 1 and 16, end-to-end
decode+embed img/s through the service's path at batch 16, and a plain-script peer (Pillow
draft decoding + ONNX Runtime, no service code) in the same run; then class-level mAP and P@10
(exact cosine, every image a query, its label as relevance).

    python -m bench.embed [--models efficientnet-lite0,efficientnet-lite0-int8] [--sample 640]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

from bench.harness import CLOTHING, append_results, clothing_labels
from service.config import load_settings
from service.embedding import registry
from service.embedding.session import get_embedder
from service.embedding.transforms import batch, preprocess
from service.evaluation.metrics import exact_cosine_scores


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def plain_script_rate(onnx_path: str, files: list[bytes], size: int, resize: int,
                      mean: list[float], std: list[float]) -> float:
    """The peer: the shortest honest script, draft-decode + resize + crop + ORT, batch 16."""
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    started = time.perf_counter()
    for i in range(0, len(files), 16):
        arrays = []
        for data in files[i:i + 16]:
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (resize, resize))
            img = img.convert("RGB")
            w, h = img.size
            scale = resize / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.Resampling.BILINEAR)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arrays.append(((np.asarray(img, np.float32) / 255 - m) / s).transpose(2, 0, 1))
        session.run(None, {name: np.stack(arrays)})
    return rate(len(files), time.perf_counter() - started)


def measure(name: str, model_dir: str, files: list[bytes], all_files: list[bytes],
            labels: list[str]) -> dict[str, float]:
    embedder = get_embedder(model_dir, name)
    info = embedder.info
    prep = info.preprocessing
    embedder.run(batch([preprocess(files[0], prep, max_pixels=10**8)] * 2))  # warm up

    started = time.perf_counter()
    arrays = [preprocess(d, prep, max_pixels=10**8) for d in files]
    decode = rate(len(files), time.perf_counter() - started)

    started = time.perf_counter()
    for arr in arrays[:160]:
        embedder.run(arr[None])
    model_b1 = rate(min(160, len(arrays)), time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(0, len(arrays), 16):
        embedder.run(batch(arrays[i:i + 16]))
    model_b16 = rate(len(arrays), time.perf_counter() - started)

    started = time.perf_counter()
    for i in range(0, len(files), 16):
        embedder.embed_bytes(files[i:i + 16], max_pixels=10**8)
    end_to_end = rate(len(files), time.perf_counter() - started)

    onnx_path = str(registry.model_path(registry.Path(model_dir), name) / "model.onnx")
    plain = plain_script_rate(onnx_path, files, info.input_size, info.resize, info.mean, info.std)

    vectors = []
    for i in range(0, len(all_files), 16):
        vectors.append(embedder.embed_bytes(all_files[i:i + 16], max_pixels=10**8).vectors)
    scores = exact_cosine_scores(np.concatenate(vectors), labels, ks=(10,))
    return {"decode": decode, "model_b1": model_b1, "model_b16": model_b16,
            "end_to_end": end_to_end, "plain": plain, "map": scores.mean_ap,
            "p10": scores.precision[10], "dim": info.dim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=None, help="comma-separated; default: installed")
    parser.add_argument("--sample", type=int, default=640, help="photos for the speed runs")
    parser.add_argument("--quality", type=int, default=0,
                        help="photos for mAP (default 0: all of them)")
    args = parser.parse_args()
    model_dir = load_settings()["MODEL_DIR"]
    names = (args.models.split(",") if args.models
             else [m.name for m in registry.installed(registry.Path(model_dir))])
    rows = clothing_labels()
    if args.quality:
        rows = rows[:: max(1, len(rows) // args.quality)][: args.quality]
    all_files = [(CLOTHING / r["file"]).read_bytes() for r in rows]
    labels = [r["label"] for r in rows]
    files = all_files[: args.sample]
    results = {}
    for name in names:
        results[name] = measure(name, model_dir, files, all_files, labels)
        print(name, results[name])
    lines = [
        f"{len(files)} photos for speed (of {len(all_files)}; originals 400-1000 px JPEGs), "
        f"all {len(all_files)} for quality. ORT threads: default. img/s, higher is better.",
        "",
        "| model | dim | decode+preprocess | model b1 | model b16 | end-to-end b16 (service) | "
        "plain script b16 (peer) | service / peer | mAP | P@10 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['dim']} | {r['decode']:.0f} | {r['model_b1']:.1f} | "
            f"{r['model_b16']:.1f} | {r['end_to_end']:.1f} | {r['plain']:.1f} | "
            f"{r['end_to_end'] / r['plain']:.2f} | {r['map']:.3f} | {r['p10']:.3f} |")
    append_results("Embedding models on the clothing photos", "\n".join(lines))


if __name__ == "__main__":
    main()
