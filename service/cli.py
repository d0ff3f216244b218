"""The `lookalike` command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from service.config import VAR_DIR, settings_from_env


@click.group()
def main() -> None:
    """Lookalike: image retrieval with PostgreSQL + pgvector."""


# ---- services ---------------------------------------------------------------------------------
@main.group()
def services() -> None:
    """The embedded PostgreSQL and Redis used when DATABASE_URL/REDIS_URL are unset."""


def _stack():  # noqa: ANN202  (imported lazily: the CLI must start fast)
    from service.services.stack import ServiceStack

    return ServiceStack.in_dir(VAR_DIR)


@services.command("start")
def services_start() -> None:
    """Start both services under ./var and print their URLs."""
    for name, url in _stack().start().items():
        click.echo(f"{name}={url}")


@services.command("stop")
def services_stop() -> None:
    """Stop both services."""
    _stack().stop()
    click.echo("stopped")


@services.command("status")
def services_status() -> None:
    """Say which services run; exit 1 if any is down."""
    status = _stack().status()
    for name, up in status.items():
        click.echo(f"{name}: {'running' if up else 'stopped'}")
    sys.exit(0 if all(status.values()) else 1)


# ---- database ---------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Schema migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    from service.migrate import upgrade

    upgrade(settings_from_env().get("DATABASE_URL"), revision)
    click.echo(f"database at {revision}")


# ---- models -----------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """Embedding models: install from packaged weights, list, verify."""


def _model_dir() -> Path:
    return Path(settings_from_env()["MODEL_DIR"])


@models.command("install")
@click.argument("name")
@click.option("--force", is_flag=True, help="Rebuild even if installed.")
def models_install(name: str, force: bool) -> None:
    """Build NAME's ONNX file from its package's weights into MODEL_DIR."""
    from service.embedding import registry
    from service.features.models import is_derived

    if is_derived(name):  # Issue 6: hand-crafted and region models live in the database.
        _enable_derived(name)
        return
    if name == "all-minilm-l6-v2":  # Issue 10: the sentence model of the label bridge.
        _install_sentence_model(force)
        return
    model_dir = _model_dir()
    if not force:
        try:
            info = registry.verify(model_dir, name)
            click.echo(f"{name} already installed ({info.sha256[:12]})")
            return
        except registry.ModelError:
            pass
    try:
        started = time.perf_counter()
        info = registry.install(name, model_dir)
    except registry.ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"installed {name} v{info.version} dim={info.dim} sha256={info.sha256[:12]} "
               f"in {time.perf_counter() - started:.1f}s -> {model_dir / name}")


def _enable_derived(name: str) -> None:
    """Register a hand-crafted or region model, so that new images get its vectors."""
    from service.app import create_app
    from service.db import session_scope
    from service.embedding.registry import ModelError
    from service.embedding.service import ensure_model_row
    from service.features.models import derived_info

    app = create_app()
    with app.app_context(), session_scope() as session:
        try:
            info = derived_info(name, model_dir=app.config["MODEL_DIR"])
        except ModelError as exc:
            raise click.ClickException(str(exc)) from exc
        ensure_model_row(info, session=session)
    click.echo(f"enabled {name} (dim={info.dim}): computed for every new image; run "
               f"`lookalike reindex --collection NAME --model {name}` for existing ones")


def _install_sentence_model(force: bool) -> None:
    """Convert the packaged MiniLM sentence model to ONNX (service/text/sentence.py)."""
    from service.embedding.registry import ModelError
    from service.text import sentence

    if not force and sentence.is_installed(_model_dir()):
        click.echo(f"{sentence.NAME} already installed")
        return
    started = time.perf_counter()
    try:
        target = sentence.install_sentence_model(_model_dir())
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"installed {sentence.NAME} in {time.perf_counter() - started:.1f}s -> {target}")


@models.command("list")
def models_list() -> None:
    """Show installed and available models."""
    from service.embedding import registry
    from service.features.models import HANDCRAFTED

    installed = {m.name: m for m in registry.installed(_model_dir())}
    for name in sorted(set(registry.CATALOG) | set(installed)):
        info = installed.get(name)
        state = f"installed v{info.version} dim={info.dim}" if info else "available"
        click.echo(f"{name:28s} {state}")
    for spec in HANDCRAFTED.values():
        click.echo(f"{spec.name:28s} built in, dim={spec.dim}: {spec.description}")
    from service.text import sentence  # Issue 10: the sentence model of text_mode semantic.

    state = "installed" if sentence.is_installed(_model_dir()) else "available"
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
              help="A CLIP text encoder into the same space (issue 10: text_mode 'clip').")
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
    try:
        info = registry.add_onnx(name, Path(onnx_file), _model_dir(), size=size, resize=resize,
                                 mean=_triple(mean), std=_triple(std), licence=licence)
        if text_onnx is not None and tokenizer is not None:
            from service.text.clip import add_text_encoder, check_text_encoder

            text_info = check_text_encoder(Path(text_onnx), Path(tokenizer), length=text_length,
                                           dim=info.dim)
            add_text_encoder(name, Path(text_onnx), Path(tokenizer), _model_dir(),
                             info=text_info)
    except (registry.ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"added {name} dim={info.dim} sha256={info.sha256[:12]}"
               + (" with a text encoder" if text_onnx else ""))


@models.command("default")
@click.argument("name")
@click.option("--force", is_flag=True, help="Switch even though some ready images have no "
              "vector of NAME yet (search misses them until they are reindexed).")
def models_default(name: str, force: bool) -> None:
    """Make NAME the default model of search and new uploads, for every process at once."""
    from service.app import create_app
    from service.db import session_scope
    from service.embedding import registry
    from service.embedding.defaults import set_default_model
    from service.embedding.reindex import unindexed
    from service.embedding.service import ensure_model_row

    app = create_app()
    try:
        info = registry.verify(Path(app.config["MODEL_DIR"]), name)
    except registry.ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    with app.app_context(), session_scope() as session:
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
    from service.app import create_app
    from service.db import session_scope
    from service.embedding.reindex import drop_model
    from service.errors import ApiError

    app = create_app()
    with app.app_context(), session_scope() as session:
        try:
            drop_model(name, session=session)
        except ApiError as exc:
            raise click.ClickException(exc.message) from exc
    click.echo(f"dropped {name}'s vectors")


@models.command("verify")
@click.argument("name")
def models_verify(name: str) -> None:
    """Check NAME's file hash and run a smoke inference."""
    import numpy as np

    from service.embedding import registry
    from service.embedding.session import get_embedder

    try:
        info = registry.verify(_model_dir(), name)
        embedder = get_embedder(_model_dir(), name)
        size = info.input_size
        out = embedder.run(np.zeros((1, 3, size, size), dtype=np.float32))
    except registry.ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    if out.vectors.shape != (1, info.dim) or not np.isfinite(out.vectors).all():
        raise click.ClickException(f"{name}: smoke inference gave shape {out.vectors.shape}")
    click.echo(f"{name}: sha256 ok, inference ok, dim={info.dim}")


# ---- issue 10: automatic tags ----------------------------------------------------------------
@main.group()
def tags() -> None:
    """Automatic ImageNet tags and class probabilities (docs/search.md)."""


@tags.command("backfill")
@click.option("--collection", help="Only this collection (default: all).")
@click.option("--model", "model_name", help="Classifier model (default: the default model).")
def tags_backfill(collection: str | None, model_name: str | None) -> None:
    """Classify ready images that have no class probabilities (embedded before migration 0007)."""
    from service.app import create_app
    from service.db import session_scope
    from service.embedding.defaults import default_model
    from service.embedding.registry import ModelError
    from service.text.labels import backfill_labels

    app = create_app()
    done, skipped = 0, set()
    with app.app_context(), session_scope() as session:
        name = model_name or default_model(session=session)
        while True:
            try:
                count, failed = backfill_labels(
                    session=session, store=app.extensions["content_store"],
                    model_dir=app.config["MODEL_DIR"], model_name=name,
                    max_pixels=int(app.config["MAX_IMAGE_PIXELS"]), collection=collection,
                    skip=skipped)
            except (ModelError, ValueError) as exc:
                raise click.ClickException(str(exc)) from exc
            if not count and not failed:
                break
            done += count
            skipped.update(failed)
    click.echo(f"classified {done} images with {name}; {len(skipped)} unreadable")


@main.command("reindex")
@click.option("--collection", required=True)
@click.option("--model", "model_name", required=True, help="The new model to fill.")
@click.option("--no-wait", is_flag=True, help="Return once the job is queued.")
def reindex(collection: str, model_name: str, no_wait: bool) -> None:
    """Fill MODEL's vectors for a collection in the background; search keeps its model."""
    from tqdm import tqdm

    from service.app import create_app
    from service.db import session_scope
    from service.embedding.registry import ModelError
    from service.embedding.reindex import progress, start_reindex
    from service.errors import ApiError
    from service.queue import enqueue

    app = create_app()
    with app.app_context():
        with session_scope() as session:
            try:
                run = start_reindex(collection, model_name, session=session,
                                    model_dir=app.config["MODEL_DIR"])
            except (ApiError, ModelError) as exc:
                raise click.ClickException(getattr(exc, "message", str(exc))) from exc
            run_id, total = run.id, run.total
        enqueue("lookalike.reindex", str(run_id))
        click.echo(f"reindex {run_id}: {total} images of {collection!r} with {model_name}")
        if no_wait:
            return
        with tqdm(total=total, unit="img") as bar:
            while True:
                with session_scope() as session:
                    state = progress(run_id, session=session)
                bar.update(state.done - bar.n)
                if state.status != "running":
                    break
                time.sleep(1)
    click.echo(f"{state.status}: {state.done} of {state.total} embedded, {state.failed} failed")
    if state.failed:
        sys.exit(1)


# ---- ingestion (issue 5) ----------------------------------------------------------------------
@main.command("ingest")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="metadata.csv or .jsonl with a 'file' column.")
@click.option("--collection", default="default", show_default=True)
@click.option("--url", help="The API (default: $LOOKALIKE_URL or http://127.0.0.1:8000). "
              "An API key is read from $LOOKALIKE_API_KEY.")
@click.option("--no-wait", is_flag=True, help="Print the job id and return at once.")
def ingest(path: Path, metadata: Path | None, collection: str, url: str | None,
           no_wait: bool) -> None:
    """Bulk-ingest an archive, or a directory (read by the server if it may, else uploaded)."""
    from service.jobs.client import default_url, run_ingest

    sys.exit(run_ingest(path, url=url or default_url(), collection=collection,
                        metadata=metadata, wait=not no_wait))


# ---- evaluation -------------------------------------------------------------------------------
@main.command("eval")
@click.option("--collection", required=True)
@click.option("--label-key", default="label", show_default=True)
@click.option("--k", "ks", default="1,5,10,100", show_default=True)
@click.option("--sample", type=int, help="Evaluate this many random queries, not every image.")
@click.option("--model", help="Model name (default: DEFAULT_MODEL).")
@click.option("--method", type=click.Choice(["auto", "index", "exact"]), default="auto",
              show_default=True, help="auto plans as the API does; index forces HNSW.")
@click.option("--rerank", type=click.Choice(["none", "aqe"]), default="none", show_default=True,
              help="aqe: expand each query by its top neighbours, as search's rerank does.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write report.json, PNG charts and index.html here.")
def evaluate(collection: str, label_key: str, ks: str, sample: int | None, model: str | None,
             method: str, rerank: str, report_dir: str | None) -> None:
    """mAP, P@k and R@k of a labelled collection: the search path against brute force."""
    from service.app import create_app
    from service.db import session_scope
    from service.embedding.service import find_model
    from service.errors import ApiError
    from service.evaluation.report import write_report
    from service.evaluation.service import evaluate_collection
    from service.images import service as images

    try:
        k_values = tuple(sorted({int(k) for k in ks.split(",")}))
    except ValueError as exc:
        raise click.BadParameter("--k takes comma-separated integers") from exc
    if k_values[0] < 1:
        raise click.BadParameter("--k takes positive integers")
    app = create_app()
    with app.app_context(), session_scope() as session:
        name = model or app.config["DEFAULT_MODEL"]
        row = find_model(name, session=session)
        if row is None:
            raise click.ClickException(f"no images have been embedded with model {name!r}")
        try:
            result = evaluate_collection(session=session, collection=collection,
                                         label_key=label_key, model=row, ks=k_values,
                                         sample=sample, method=None if method == "auto"
                                         else method,
                                         rerank=None if rerank == "none" else rerank)
        except ApiError as exc:
            raise click.ClickException(exc.message) from exc
        click.echo(f"{collection}: {result.images} images, {result.classes} classes, "
                   f"{result.service.queries} queries, model {row.name}"
                   + (f", re-ranked by {result.rerank}" if result.rerank else ""))
        click.echo(f"{'':24s} {'mAP':>7s}" + "".join(f" {'P@' + str(k):>7s} {'R@' + str(k):>7s}"
                                                   for k in k_values))
        for label, scores in (("service (SQL + HNSW)", result.service),
                              ("exact brute force", result.exact)):
            click.echo(f"{label:24s} {scores.mean_ap:7.4f}" + "".join(
                f" {scores.precision[k]:7.4f} {scores.recall[k]:7.4f}" for k in k_values))
        if report_dir:
            wanted = {q.image_id for q in result.worst} | {
                r["id"] for q in result.worst for r in q.top}
            thumbs = {}
            store = app.extensions["content_store"]
            for image_id in wanted:
                image = images.get_image(image_id, session=session)
                thumbs[image_id] = images.thumbnail(
                    image, session=session, store=store,
                    max_pixels=int(app.config["MAX_IMAGE_PIXELS"]))
            page = write_report(result, Path(report_dir), thumbs)
            click.echo(f"report: {page}")


@main.command("finetune")
@click.option("--collection", required=True)
@click.option("--label-key", default="label", show_default=True)
@click.option("--from", "base", default="efficientnet-lite0", show_default=True,
              help="The backbone; or several, comma-separated (e.g. efficientnet-lite0,"
              "efficientnet-lite2): a head on each, joined into one model. The first must "
              "have embedded the collection.")
@click.option("--dim", default=256, show_default=True, help="Output size of --unsupervised.")
@click.option("--split-key", help="Metadata key that keeps a group (e.g. a person) on one side.")
@click.option("--shots", type=int, help="Train on only this many images per class.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which images are the shots, and the head's initial weights.")
@click.option("--unsupervised", is_flag=True, help="PCA whitening instead of a labelled head.")
@click.option("--name", help="Name of the new model (default <from>+head-N).")
@click.option("--head", "head_kind", type=click.Choice(["cosine", "linear"]), default="cosine",
              show_default=True, help="Cosine-classifier MLP, or the linear softmax head.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Add mirrored and re-cropped views of the training photos.")
@click.option("--hidden", type=int, help="Hidden units of --head cosine (default 512; 0 under "
              "1000 labelled images).")
@click.option("--epochs", type=int, help="Epochs of --head cosine (default by training size).")
@click.option("--tune", type=click.Choice(["none", "last-conv", "last-block", "top"]),
              help="Re-train the backbone's last layers with the head: its last convolution, "
              "its last block and convolution, or (top) every block from its last "
              "downsampling on (default: last-conv with --head cosine and --augment, up to "
              "10,000 labelled images; else none).")
def finetune(collection: str, label_key: str, base: str, dim: int, split_key: str | None,
             shots: int | None, seed: int, unsupervised: bool, name: str | None,
             head_kind: str,
             augment: bool, hidden: int | None, epochs: int | None,
             tune: str | None) -> None:
    """Fit a retrieval head on a labelled collection and install backbone+head as a model."""
    from tqdm import tqdm

    from service.app import create_app
    from service.db import session_scope
    from service.errors import ApiError
    from service.training.service import finetune as run_finetune

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage))
        bar.update(done - bar.n)
        if done == total:
            bar.close()
            bars.pop(stage)  # a stage may come again (a second backbone): a new bar

    app = create_app()
    with app.app_context(), session_scope() as session:
        try:
            out = run_finetune(session=session, collection=collection, label_key=label_key,
                               base=base, model_dir=Path(app.config["MODEL_DIR"]),
                               split_key=split_key, shots=shots, seed=seed,
                               unsupervised=unsupervised,
                               dim=dim, name=name, head_kind=head_kind, hidden=hidden,
                               epochs=epochs, max_pixels=int(app.config["MAX_IMAGE_PIXELS"]),
                               tune=tune, progress=progress,
                               store=app.extensions["content_store"] if augment else None)
        except ApiError as exc:
            raise click.ClickException(exc.message) from exc
    click.echo(f"installed {out.model}: trained on {out.train_images}, tested on "
               f"{out.test_images} images")
    click.echo(f"test mAP {out.raw_test_map:.4f} -> {out.head_test_map:.4f}, "
               f"P@10 {out.raw_test_p10:.4f} -> {out.head_test_p10:.4f}")


# ---- API keys (issue 9) -----------------------------------------------------------------------
@main.group()
def keys() -> None:
    """API keys: create (the token is printed once), revoke, list."""


def _keys_session(url: str | None = None):  # noqa: ANN202  (lazy imports: the CLI starts fast)
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from service.db import make_engine

    url = url or settings_from_env().get("DATABASE_URL")
    if not url:
        raise click.ClickException("DATABASE_URL is not set and no embedded services are "
                                   "running: run `lookalike services start` first")
    return Session(make_engine(url, poolclass=NullPool), expire_on_commit=False)


@keys.command("create")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), default="read",
              show_default=True, help="read: GET and search; write: + uploads, changes, "
              "jobs; admin: everything, every collection.")
@click.option("--collections", help="Comma-separated collections the key may see "
              "(required unless --scope admin).")
@click.option("--name", default="", help="A label for listings.")
def keys_create(scope: str, collections: str | None, name: str) -> None:
    """Create a key and print its token (shown this once; only a hash is stored)."""
    from service.auth.service import create_key
    from service.errors import ApiError

    names = None if collections is None else [c for c in collections.split(",") if c.strip()]
    if scope != "admin" and not names:
        raise click.UsageError("--collections is required for read and write keys")
    with _keys_session() as session:
        try:
            created = create_key(session=session, scope=scope, collections=names, name=name)
        except ApiError as exc:
            raise click.ClickException(exc.message) from exc
        session.commit()
    key = created.key
    click.echo(f"created key {key.id} (prefix {key.prefix}, scope {key.scope}, collections "
               f"{', '.join(key.collections) if key.collections else 'all'})", err=True)
    click.echo("the token is shown once; store it now:", err=True)
    click.echo(created.token)


@keys.command("revoke")
@click.argument("id_or_prefix")
def keys_revoke(id_or_prefix: str) -> None:
    """Revoke a key by id or prefix: its token stops working at once."""
    from service.auth.service import revoke_key
    from service.errors import ApiError

    with _keys_session() as session:
        try:
            key = revoke_key(id_or_prefix, session=session)
        except ApiError as exc:
            raise click.ClickException(exc.message) from exc
        session.commit()
    click.echo(f"revoked {key.id} (prefix {key.prefix})")


@keys.command("list")
def keys_list() -> None:
    """Every key: id, prefix, scope, collections, name, dates (never a secret)."""
    from service.auth.service import list_keys

    with _keys_session() as session:
        rows = list_keys(session=session)
    click.echo(f"{'id':36s}  {'prefix':12s}  {'scope':5s}  {'status':7s}  {'last used':19s}  "
               "collections / name")
    for key in rows:
        used = key.last_used_at.strftime("%Y-%m-%d %H:%M:%S") if key.last_used_at else "never"
        status = "revoked" if key.revoked_at else "active"
        where = ",".join(key.collections) if key.collections else "*"
        click.echo(f"{key.id!s:36s}  {key.prefix:12s}  {key.scope:5s}  {status:7s}  "
                   f"{used:19s}  {where}{'  ' + key.name if key.name else ''}")


# ---- run --------------------------------------------------------------------------------------
@main.command("run")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--api-workers", default=2, show_default=True)
# One process more than cores: while one waits on PostgreSQL or the disk, the others keep the
# cores busy (bench/ingest.py: 0.77 -> 0.81 of model-only throughput on 2 cores).
@click.option("--concurrency", default=min((os.cpu_count() or 1) + 1, 5), show_default=True,
              help="Celery worker processes (each holds the model, ~550 MB).")
def run(host: str, port: int, api_workers: int, concurrency: int) -> None:
    """Start services (if needed), migrate, then serve the API and a worker until Ctrl-C."""
    env = dict(os.environ)
    if concurrency > 1:
        # One ONNX Runtime thread per worker process: N processes on N cores overlap one
        # another's decoding and database waits; N x N threads would only oversubscribe.
        env.setdefault("LOOKALIKE_ORT_INTRA_OP_THREADS", "1")
    started_here = None
    if not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
        stack = _stack()
        # Services started by `lookalike services start` are left running on exit.
        was_running = all(stack.status().values())
        urls = stack.start()
        started_here = None if was_running else stack
        env.update({k: v for k, v in urls.items() if not os.environ.get(k)})
        click.echo("embedded PostgreSQL and Redis running under ./var")
    try:
        _serve(env, host, port, api_workers, concurrency)
    finally:
        if started_here is not None:
            started_here.stop()
            click.echo("embedded services stopped")


def _check_auth(settings: dict[str, object], env: dict[str, str], host: str) -> None:
    """Tell the API its bind host; refuse to serve a network without keys (issue 9)."""
    from service.api.auth import auth_required, is_loopback
    from service.auth.service import count_active_keys

    env["LOOKALIKE_BIND_HOST"] = host
    if not auth_required({**settings, "BIND_HOST": host}):
        if not is_loopback(host):
            raise click.ClickException(f"refusing to serve {host} without API keys: unset "
                                       "LOOKALIKE_AUTH_REQUIRED or bind 127.0.0.1")
        click.echo(f"WARNING: API keys are OFF because the API listens on {host} (loopback): "
                   "anyone on this machine can read, change and delete every collection. "
                   "Bind another --host (or set LOOKALIKE_AUTH_REQUIRED=true) to require "
                   "keys.", err=True)
        return
    with _keys_session(str(settings["DATABASE_URL"])) as session:
        active = count_active_keys(session=session)
    if not active:
        click.echo("WARNING: API keys are required and none exists yet: every API request "
                   "will get 401. Create one: lookalike keys create --scope admin", err=True)


def _front_proxy(settings: dict[str, object], host: str, port: int):  # noqa: ANN202
    """nginx in front of gunicorn; None, with a warning, only on loopback without nginx."""
    from service.services.proxy import ProxyUnavailable, proxy_for_run

    try:
        proxy = proxy_for_run(VAR_DIR, host, port, settings)
    except ProxyUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    if proxy is None:
        click.echo(f"WARNING: nginx is not installed (`make proxy-deps` as root, or apt-get "
                   f"install -y nginx-light): gunicorn serves {host}:{port} directly, and a few "
                   "clients sending slowly can hold all its threads. Only acceptable on "
                   "loopback.", err=True)
    return proxy


def _serve(env: dict[str, str], host: str, port: int, api_workers: int,
           concurrency: int) -> None:
    from service.embedding import registry
    from service.migrate import upgrade

    settings = settings_from_env({k: env[k] for k in ("DATABASE_URL", "REDIS_URL")})
    model_dir = Path(settings["MODEL_DIR"])
    try:
        registry.verify(model_dir, settings["DEFAULT_MODEL"])
    except registry.ModelError:
        click.echo(f"installing {settings['DEFAULT_MODEL']} …")
        try:
            registry.install(settings["DEFAULT_MODEL"], model_dir)
        except registry.ModelError as exc:
            raise click.ClickException(str(exc)) from exc
    upgrade(settings["DATABASE_URL"])
    _check_auth(settings, env, host)
    proxy = _front_proxy(settings, host, port)
    bind = ["-b", f"{host}:{port}"]
    if proxy is not None:
        proxy.prepare()
        proxy.socket_path.unlink(missing_ok=True)
        bind = proxy.gunicorn_bind()
        env["LOOKALIKE_TRUSTED_PROXIES"] = "1"  # only nginx reaches the socket
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen([str(bin_dir / "gunicorn"), "service.wsgi:app", *bind,
                          "-w", str(api_workers), "--threads", "4", "--timeout", "120"], env=env),
        subprocess.Popen([str(bin_dir / "celery"), "-A", "workers.celery_app:celery_app",
                          "worker", "-c", str(concurrency), "-Q", "lookalike",
                          "--loglevel", "INFO"], env=env),
        # Issue 5: beat sends the job sweeper (recovers work lost with a worker or Redis).
        subprocess.Popen([str(bin_dir / "celery"), "-A", "workers.celery_app:celery_app",
                          "beat", "-s", str(VAR_DIR / "celerybeat-schedule"),
                          "--loglevel", "INFO"], env=env),
    ]
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        if proxy is not None:
            from service.services.proxy import wait_for_socket

            wait_for_socket(proxy.socket_path, lambda: procs[0].poll() is None)
            proxy.start()
        where = "nginx in front of gunicorn" if proxy else "gunicorn directly"
        click.echo(f"serving on http://{host}:{port} ({where}; Ctrl-C stops everything)")
        while (not stopping and all(p.poll() is None for p in procs)
               and (proxy is None or proxy.running())):
            time.sleep(0.5)
    except (RuntimeError, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
    finally:
        if proxy is not None:
            proxy.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if not stopping:
        sys.exit(1)


if __name__ == "__main__":
    main()
