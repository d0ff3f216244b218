"""`lookalike ingest`: submit an archive or a directory as a job, follow it, summarise it."""

from __future__ import annotations

import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import httpx

POLL_S = 0.5
# The server refuses the path itself (not allowed there, or not a directory there): upload it.
FALLBACK_CODES = ("path_not_allowed", "not_a_directory")
# Job statuses that are still moving (an uploaded archive is `expanding` first).
ACTIVE = ("expanding", "queued", "running")


class ApiFailure(click.ClickException):
    """The API answered with an error body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error") or {}
        self.code = str(error.get("code") or status)
        super().__init__(f"{status} {self.code}: {error.get('message') or body}")


class JobsClient:
    """The jobs API over httpx; archives are streamed from disk, never read into memory."""

    def __init__(self, base_url: str, timeout: float = 600.0,
                 api_key: str | None = None) -> None:
        url = base_url if "://" in base_url else f"http://{base_url}"
        # From the environment, not an option, so that the token stays out of `ps`.
        key = api_key or os.environ.get("LOOKALIKE_API_KEY") or None
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One call; an error status raises `ApiFailure` with the API's code and message."""
        resp = self.http.request(method, path, **kwargs)
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = {"error": {"code": str(resp.status_code), "message": resp.text[:200]}}
        if resp.status_code >= 400:
            raise ApiFailure(resp.status_code, body)
        return body

    def submit_archive(self, archive: Path, *, collection: str,
                       metadata: Path | None) -> dict[str, Any]:
        """Upload an archive (streamed from disk) as multipart."""
        with ExitStack() as opened:
            files = {}
            if metadata is not None:
                files["metadata"] = (metadata.name, opened.enter_context(metadata.open("rb")))
            files["file"] = (archive.name, opened.enter_context(archive.open("rb")))
            return self.request("POST", "/api/v1/jobs", data={"collection": collection},
                                files=files)

    def submit_path(self, folder: Path, *, collection: str,
                    metadata: Path | None) -> dict[str, Any]:
        """Ask the server to read a directory it can see (under its INGEST_ROOTS)."""
        source = {"path": str(folder.resolve())}
        if metadata is None:
            return self.request("POST", "/api/v1/jobs",
                                json={"collection": collection, "source": source})
        with metadata.open("rb") as fh:
            return self.request("POST", "/api/v1/jobs",
                                data={"collection": collection, "source": json.dumps(source)},
                                files={"metadata": (metadata.name, fh)})

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's state."""
        return self.request("GET", f"/api/v1/jobs/{job_id}")

    def items(self, job_id: str, status: str | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a job (optionally of one status), page by page."""
        cursor = None
        while True:
            query = {"limit": 1000, **({"status": status} if status else {}),
                     **({"cursor": cursor} if cursor else {})}
            page = self.request("GET", f"/api/v1/jobs/{job_id}/items", params=query)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return


def pack_directory(folder: Path, target: Path) -> Path:
    """An uncompressed tar of a directory (photos do not compress); links stay links."""
    with tarfile.open(target, "w") as tf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() or path.is_symlink():
                tf.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return target


def submit(client: JobsClient, path: Path, *, collection: str,
           metadata: Path | None) -> dict[str, Any]:
    """Submit a file as an archive, or a directory as a server path (else packed and uploaded)."""
    if path.is_file():
        return client.submit_archive(path, collection=collection, metadata=metadata)
    try:
        return client.submit_path(path, collection=collection, metadata=metadata)
    except ApiFailure as exc:
        if exc.code not in FALLBACK_CODES:
            raise
        click.echo(f"the server cannot read {path} ({exc.code}); uploading it as a tar archive",
                   err=True)
    with tempfile.TemporaryDirectory(prefix="lookalike-ingest-") as tmp:
        archive = pack_directory(path, Path(tmp) / f"{path.resolve().name or 'upload'}.tar")
        return client.submit_archive(archive, collection=collection, metadata=metadata)


def follow(client: JobsClient, job_id: str, total: int) -> dict[str, Any]:
    """Poll a job with a progress bar (rate and ETA) until it is no longer moving."""
    from tqdm import tqdm

    with tqdm(total=total or None, unit="img", dynamic_ncols=True, smoothing=0.1) as bar:
        while True:
            state = client.job(job_id)
            if state["total"] and bar.total != state["total"]:
                bar.total = state["total"]  # an archive's count is known once expanded
                bar.refresh()
            processed = state["done"] + state["duplicates"] + state["failed"]
            bar.update(processed - bar.n)
            bar.set_postfix(failed=state["failed"], dup=state["duplicates"], refresh=False)
            if state["status"] not in ACTIVE:
                return state
            time.sleep(POLL_S)


def summary(state: dict[str, Any]) -> str:
    """Counts, throughput and the first failures, for the terminal."""
    rate = f", {state['rate']:.1f} img/s" if state.get("rate") else ""
    lines = [f"job {state['id']} {state['status']}: {state['done']} new, "
             f"{state['duplicates']} duplicates, {state['failed']} failed, "
             f"{state['cancelled']} cancelled of {state['total']}{rate}"]
    if state.get("error"):
        lines.append(f"  {state['error']['code']}: {state['error']['message']}")
    for error in state.get("errors") or []:
        lines.append(f"  failed {error['name']}: {error['error']}")
    if state["failed"] > len(state.get("errors") or []):
        lines.append(f"  … all failures: GET /api/v1/jobs/{state['id']}/items?status=failed")
    return "\n".join(lines)


def run_ingest(path: Path, *, url: str, collection: str, metadata: Path | None,
               wait: bool) -> int:
    """Submit, follow and summarise; the exit status is 1 when any item failed."""
    client = JobsClient(url)
    created = submit(client, path, collection=collection, metadata=metadata)
    if created["status"] == "expanding":
        click.echo(f"job {created['id']}: archive uploaded into {collection!r}; the server is "
                   "expanding it", err=True)
    else:
        click.echo(f"job {created['id']}: {created['total']} files into {collection!r}",
                   err=True)
    if not wait:
        click.echo(created["id"])
        return 0
    state = follow(client, created["id"], created["total"])
    click.echo(summary(state))
    return 0 if state["status"] == "done" and not state["failed"] else 1


@click.command("ingest")
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
    url = url or os.environ.get("LOOKALIKE_URL", "http://127.0.0.1:8000")
    sys.exit(run_ingest(path, url=url, collection=collection, metadata=metadata,
                        wait=not no_wait))
