"""`lookalike ingest` against a real HTTP server: server paths, uploads, exit status."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

from service.config import PROJECT_ROOT


@pytest.fixture
def api_url(jobs_app: Flask) -> Iterator[str]:
    """The jobs app behind a real threaded HTTP server on a free port."""
    server = make_server("127.0.0.1", 0, jobs_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def ingest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "ingest", *args],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.usefixtures("jobs_worker")
def test_ingest_reads_server_paths_uploads_the_rest_and_fails_on_bad_items(
        api_url: str, photos: list[Path], ingest_root: Path, tmp_path: Path) -> None:
    inside = ingest_root / "cli"
    inside.mkdir()
    for p in photos[:3]:
        (inside / p.name).write_bytes(p.read_bytes())
    (inside / "metadata.csv").write_text(f"file,label\n{photos[0].name},Shirt\n")
    done = ingest(str(inside), "--collection", "c-cli", "--url", api_url)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "done: 3 new, 0 duplicates, 0 failed" in done.stdout
    assert "uploading" not in done.stderr  # the server read the directory itself

    outside = tmp_path / "mine"
    outside.mkdir()
    for p in photos[3:5]:
        (outside / p.name).write_bytes(p.read_bytes())
    (outside / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    meta = tmp_path / "meta.jsonl"
    meta.write_text(f'{{"file": "{photos[3].name}", "n": 1}}\n')
    failed = ingest(str(outside), "--collection", "c-cli", "--url", api_url,
                    "--metadata", str(meta))
    assert failed.returncode == 1, failed.stderr + failed.stdout
    assert "uploading it as a tar archive" in failed.stderr
    assert "2 new, 0 duplicates, 1 failed" in failed.stdout
    assert "failed broken.jpg:" in failed.stdout

    queued = ingest(str(outside), "--collection", "c-cli", "--url", api_url, "--no-wait")
    assert queued.returncode == 0 and len(queued.stdout.strip()) == 36


@pytest.mark.usefixtures("jobs_worker")
def test_a_metadata_file_inside_the_directory_is_not_an_item(
        api_url: str, photos: list[Path], ingest_root: Path, tmp_path: Path) -> None:
    # Both ways in: the server reads the directory, or the client uploads it as a tar.
    for folder in (ingest_root / "with-labels", tmp_path / "with-labels"):
        folder.mkdir()
        for p in photos[5:7]:
            (folder / p.name).write_bytes(p.read_bytes() + folder.parent.name.encode())
        (folder / "labels.csv").write_text(f"file,label\n{photos[5].name},Shirt\n")
        (folder / "notes.txt").write_text("not an image, and not the metadata")
        done = ingest(str(folder), "--collection", "c-cli-labels", "--url", api_url,
                      "--metadata", str(folder / "labels.csv"))
        assert "2 new, 0 duplicates, 1 failed" in done.stdout, done.stderr + done.stdout
        assert "failed notes.txt:" in done.stdout and "labels.csv" not in done.stdout
