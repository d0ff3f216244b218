"""The HTTP client behind `lookalike ingest`: submit a job, follow it, summarise it."""

from __future__ import annotations

import http.client
import json
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

import click

CHUNK = 1024 * 1024
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
    """A small client of the jobs API over http.client, streaming uploads from disk."""

    def __init__(self, base_url: str, timeout: float = 600.0,
                 api_key: str | None = None) -> None:
        parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        # Issue 9: from the environment, not an option, so the token stays out of `ps`.
        self.api_key = api_key or os.environ.get("LOOKALIKE_API_KEY") or None
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _send(self, method: str, path: str, chunks: list[bytes | Path] | None = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
        conn = self._connection()
        try:
            conn.putrequest(method, self.prefix + path)
            length = sum(c.stat().st_size if isinstance(c, Path) else len(c)
                         for c in chunks or [])
            auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            for key, value in {**(headers or {}), **auth, "Content-Length": str(length),
                               "Accept": "application/json"}.items():
                conn.putheader(key, value)
            conn.endheaders()
            for chunk in chunks or []:
                if isinstance(chunk, Path):
                    with chunk.open("rb") as fh:
                        _stream(fh, conn)
                else:
                    conn.send(chunk)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"error": {"code": str(resp.status), "message": raw[:200].decode("latin-1")}}
        if resp.status >= 400:
            raise ApiFailure(resp.status, body)
        return body

    def submit_archive(self, archive: Path, *, collection: str,
                       metadata: Path | None) -> dict[str, Any]:
        """Upload an archive (streamed from disk) as multipart."""
        boundary = f"lookalike-{uuid.uuid4().hex}"
        chunks: list[bytes | Path] = [_field(boundary, "collection", collection)]
        if metadata is not None:
            chunks += [_file_header(boundary, "metadata", metadata.name), metadata, b"\r\n"]
        chunks += [_file_header(boundary, "file", archive.name), archive, b"\r\n",
                   f"--{boundary}--\r\n".encode()]
        return self._send("POST", "/api/v1/jobs", chunks,
                          {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def submit_path(self, folder: Path, *, collection: str,
                    metadata: Path | None) -> dict[str, Any]:
        """Ask the server to read a directory it can see (under its INGEST_ROOTS)."""
        source = {"path": str(folder.resolve())}
        if metadata is None:
            body = json.dumps({"collection": collection, "source": source}).encode()
            return self._send("POST", "/api/v1/jobs", [body],
                              {"Content-Type": "application/json"})
        boundary = f"lookalike-{uuid.uuid4().hex}"
        chunks: list[bytes | Path] = [
            _field(boundary, "collection", collection),
            _field(boundary, "source", json.dumps(source)),
            _file_header(boundary, "metadata", metadata.name), metadata, b"\r\n",
            f"--{boundary}--\r\n".encode()]
        return self._send("POST", "/api/v1/jobs", chunks,
                          {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's state."""
        return self._send("GET", f"/api/v1/jobs/{job_id}")

    def items(self, job_id: str, status: str | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a job (optionally of one status), page by page."""
        cursor = None
        while True:
            query = {"limit": 1000, **({"status": status} if status else {}),
                     **({"cursor": cursor} if cursor else {})}
            page = self._send("GET", f"/api/v1/jobs/{job_id}/items?{urlencode(query)}")
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return


def _stream(fh: IO[bytes], conn: http.client.HTTPConnection) -> None:
    while chunk := fh.read(CHUNK):
        conn.send(chunk)


def _field(boundary: str, name: str, value: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
            f"{value}\r\n").encode()


def _file_header(boundary: str, name: str, filename: str) -> bytes:
    safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
            f"filename=\"{safe}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()


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
    """Poll a job with a progress bar (rate and ETA) until it is no longer queued or running."""
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


def default_url() -> str:
    """LOOKALIKE_URL, else the address `lookalike run` serves on."""
    return os.environ.get("LOOKALIKE_URL", "http://127.0.0.1:8000")
