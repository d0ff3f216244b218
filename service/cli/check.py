"""`lookalike check [--repair]`: whether files, rows, vectors and job items agree."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from service.cli.console import app_session, stage_progress

if TYPE_CHECKING:
    from service.integrity.service import CheckReport

SHOWN = 20


@click.command("check")
@click.option("--repair", is_flag=True,
              help="Mend what can be mended safely, then check again.")
@click.option("--no-hash", "no_hash", is_flag=True,
              help="Skip reading every object to compare its sha256 (much faster on S3).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def check(repair: bool, no_hash: bool, as_json: bool) -> None:
    """Find orphaned, missing and corrupt files, unembedded images and stuck job items.

    Exits 1 when something is wrong (after --repair: when something is still wrong).
    """
    from service.embedding.defaults import default_model
    from service.integrity.repair import repair as run_repair
    from service.integrity.service import check as run_check

    with app_session() as (app, session):
        config, store = app.config, app.extensions["content_store"]
        model_name = default_model(session=session)
        timeout_s = float(config["JOB_ITEM_TIMEOUT"])

        def once() -> CheckReport:
            return run_check(session=session, store=store, model_name=model_name,
                             timeout_s=timeout_s, verify_bytes=not no_hash)

        report = once()
        repaired: dict[str, int] = {}
        if repair and report.findings:
            repaired = run_repair(report, session=session, store=store, timeout_s=timeout_s,
                                  max_attempts=int(config["JOB_MAX_ATTEMPTS"]),
                                  batch_size=int(config["JOB_BATCH_SIZE"]),
                                  parallelism=int(config["JOB_PARALLELISM"]),
                                  storage_dir=str(config["STORAGE_DIR"]),
                                  progress=stage_progress())
            found, report = report, once()
        else:
            found = report
    summary = {"objects": found.objects, "hashed": found.hashed, "images": found.images,
               "found": found.counts(), "repaired": repaired, "left": report.counts()}
    if as_json:
        summary["findings"] = [vars(f) for f in report.findings]
        click.echo(json.dumps(summary))
    else:
        click.echo(f"{found.objects} objects ({found.hashed} hashed), {found.images} images")
        for kind, count in found.counts().items():
            if count or kind in repaired:
                mended = f", {repaired[kind]} repaired" if kind in repaired else ""
                click.echo(f"  {kind}: {count}{mended}")
        for finding in report.findings[:SHOWN]:
            click.echo(f"  {finding.kind} {finding.subject} {finding.detail}".rstrip())
        if len(report.findings) > SHOWN:
            click.echo(f"  … and {len(report.findings) - SHOWN} more")
        click.echo("ok" if not report.findings else f"{len(report.findings)} problems")
    if report.findings:
        raise SystemExit(1)
