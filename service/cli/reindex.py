"""`lookalike reindex` (a new model's vectors) and `lookalike tags backfill` (class labels)."""

from __future__ import annotations

import sys
import time

import click

from service.cli.console import app_session, domain_errors


@click.command("reindex")
@click.option("--collection", required=True)
@click.option("--model", "model_name", required=True, help="The new model to fill.")
@click.option("--no-wait", is_flag=True, help="Return once the job is queued.")
def reindex(collection: str, model_name: str, no_wait: bool) -> None:
    """Fill MODEL's vectors for a collection in the background; search keeps its model."""
    from tqdm import tqdm

    from service.db import session_scope
    from service.indexing.reindex import progress, start_reindex
    from service.queue import REINDEX, enqueue

    with app_session() as (app, session), domain_errors():
        run = start_reindex(collection, model_name, session=session,
                            model_dir=app.config["MODEL_DIR"])
        run_id, total = run.id, run.total
    with app.app_context():
        enqueue(REINDEX, str(run_id))
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


@click.group()
def tags() -> None:
    """Automatic ImageNet tags and class probabilities (docs/search.md)."""


@tags.command("backfill")
@click.option("--collection", help="Only this collection (default: all).")
@click.option("--model", "model_name", help="Classifier model (default: the default model).")
def tags_backfill(collection: str | None, model_name: str | None) -> None:
    """Classify ready images that have no class probabilities (embedded before migration 0007)."""
    from service.embedding.defaults import default_model
    from service.text.labels import backfill_labels

    done, skipped = 0, set()
    with app_session() as (app, session):
        name = model_name or default_model(session=session)
        while True:
            with domain_errors():
                count, failed = backfill_labels(
                    session=session, store=app.extensions["content_store"],
                    model_dir=app.config["MODEL_DIR"], model_name=name,
                    max_pixels=int(app.config["MAX_IMAGE_PIXELS"]), collection=collection,
                    skip=skipped)
            if not count and not failed:
                break
            done += count
            skipped.update(failed)
    click.echo(f"classified {done} images with {name}; {len(skipped)} unreadable")
