"""`lookalike eval`: mAP, P@k and R@k of a labelled collection, search against brute force."""

from __future__ import annotations

from pathlib import Path

import click

from service.cli.console import app_session, domain_errors


@click.command("eval")
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
    from service.embedding.service import find_model
    from service.evaluation.report import write_report
    from service.evaluation.service import evaluate_collection
    from service.images import service as images

    try:
        k_values = tuple(sorted({int(k) for k in ks.split(",")}))
    except ValueError as exc:
        raise click.BadParameter("--k takes comma-separated integers") from exc
    if k_values[0] < 1:
        raise click.BadParameter("--k takes positive integers")
    with app_session() as (app, session):
        name = model or app.config["DEFAULT_MODEL"]
        row = find_model(name, session=session)
        if row is None:
            raise click.ClickException(f"no images have been embedded with model {name!r}")
        with domain_errors():
            result = evaluate_collection(session=session, collection=collection,
                                         label_key=label_key, model=row, ks=k_values,
                                         sample=sample, method=None if method == "auto"
                                         else method,
                                         rerank=None if rerank == "none" else rerank)
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
