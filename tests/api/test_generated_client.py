"""A client generated from the served /openapi.json drives the real server end to end.

openapi-python-client refuses a document it cannot model (warnings fail the generation) and
the generated client parses every documented response strictly, so a document that lies about
a schema, a status or a content type fails here rather than in a user's client.
"""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
from PIL import Image as PILImage

from service.config import PROJECT_ROOT

PACKAGE = "lookalike_client"
# Ignored by git (build/ in .gitignore): a developer can read what was generated.
BUILD_DIR = PROJECT_ROOT / "build" / "client"
GENERATOR = Path(sys.executable).parent / "openapi-python-client"
# No post hooks: the generator would otherwise run ruff over the output, which costs time and
# checks nothing about the document. The generator reads only JSON, text and octet-stream
# bodies; the images the document names are bytes to it.
CONFIG = f"""package_name_override: {PACKAGE}
post_hooks: []
content_type_overrides:
  "image/*": application/octet-stream
  image/jpeg: application/octet-stream
  image/png: application/octet-stream
"""


def generate(document: bytes, out: Path) -> None:
    """Generate the client package into `out`, failing on any warning about the document."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "openapi.json").write_bytes(document)
    (out / "config.yaml").write_text(CONFIG)
    proc = subprocess.run(
        [str(GENERATOR), "generate", "--path", str(out / "openapi.json"), "--meta", "none",
         "--config", str(out / "config.yaml"), "--output-path", str(out / PACKAGE),
         "--overwrite", "--fail-on-warning"],
        capture_output=True, text=True, timeout=120, cwd=out)
    if proc.returncode != 0:
        pytest.fail(f"openapi-python-client could not model the document:\n"
                    f"{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
    import_unset(out / PACKAGE)


def import_unset(package: Path) -> None:
    """Import `Unset` where the generator used it without importing it.

    openapi-python-client 0.29.1 annotates a body that may come in several content types
    (search, jobs: JSON or multipart) as `... | Unset = UNSET` even when the document says it
    is required, and imports only `UNSET`: the module fails to import, whatever the document.
    """
    for module in (package / "api").rglob("*.py"):
        text = module.read_text()
        if "| Unset = UNSET" in text and "import Unset" not in text:
            module.write_text(f"from ...types import Unset\n{text}")


@pytest.fixture(scope="module")
def lk(live_server: str, worker: Any) -> Iterator[Callable[[str], ModuleType]]:
    """Import a module of the client generated from the live server's document."""
    if not GENERATOR.exists():
        pytest.fail(f"{GENERATOR} is missing: `make install` installs the dev extra")
    doc = requests.get(f"{live_server}/openapi.json", timeout=30)
    assert doc.status_code == 200
    generate(doc.content, BUILD_DIR)
    sys.path.insert(0, str(BUILD_DIR))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]  # a fresh document each module, not one imported earlier
    try:
        yield lambda name: importlib.import_module(f"{PACKAGE}.{name}")
    finally:
        sys.path.remove(str(BUILD_DIR))


@pytest.fixture(scope="module")
def api(lk: Callable[[str], ModuleType], live_server: str) -> Any:
    """A generated client that raises on any status the document does not list."""
    client_module = lk("client")
    return client_module.Client(base_url=live_server, raise_on_unexpected_status=True,
                                timeout=60.0)


def jpeg(path: Path, *, quality: int = 90) -> bytes:
    """A photo re-encoded: other bytes, the same picture."""
    with PILImage.open(path) as img:
        out = io.BytesIO()
        img.convert("RGB").save(out, "JPEG", quality=quality)
        return out.getvalue()


def wait_ready(lk: Callable[[str], ModuleType], api: Any, image_id: str,
               timeout: float = 90.0) -> Any:
    """Poll the image through the generated client until the worker has embedded it."""
    get_image = lk("api.images.get_api_v1_images_image_id")
    deadline = time.monotonic() + timeout
    while True:
        image = get_image.sync(image_id, client=api)
        if image.status in ("ready", "failed") or time.monotonic() > deadline:
            return image
        time.sleep(0.2)


def test_generated_client_uploads_searches_ingests_and_lists_duplicates(
        lk: Callable[[str], ModuleType], api: Any, photos: list[Path]) -> None:
    """Upload (multipart), wait, filtered search, a bulk job and its status, duplicates."""
    models, types = lk("models"), lk("types")
    upload_image, search = lk("api.images.post_api_v1_images"), lk("api.search.post_api_v1_search")
    create_job, get_job = lk("api.jobs.post_api_v1_jobs"), lk("api.jobs.get_api_v1_jobs_job_id")
    duplicates = lk("api.graph.get_api_v1_duplicates")
    thumbnail = lk("api.images.get_api_v1_images_image_id_thumbnail")
    original = lk("api.images.get_api_v1_images_image_id_file")
    collection = f"gen-{uuid.uuid4().hex[:8]}"

    uploads = [(photos[0], jpeg(photos[0]), "red"), (photos[0], jpeg(photos[0], quality=70),
                                                     "red"), (photos[1], jpeg(photos[1]), "blue")]
    ids = []
    for path, data, colour in uploads:
        body = models.UploadForm(file=types.File(payload=io.BytesIO(data), file_name=path.name,
                                        mime_type="image/jpeg"),
                        metadata=json.dumps({"colour": colour}), collection=collection)
        response = upload_image.sync_detailed(client=api, body=body)
        assert response.status_code == 202, response.content
        assert isinstance(response.parsed, models.ImageOut)
        assert response.parsed.collection == collection
        ids.append(response.parsed.id)
    for image_id in ids:
        image = wait_ready(lk, api, image_id)
        assert image.status == "ready", image.error
        assert image.metadata.to_dict()["colour"] in ("red", "blue")
    small = thumbnail.sync(ids[0], client=api)
    assert isinstance(small, types.File)
    with PILImage.open(small.payload) as img:
        assert img.format == "JPEG" and max(img.size) <= 256
    assert original.sync(ids[0], client=api).payload.read() == uploads[0][1]

    query = models.SearchQuery(
        image_id=ids[0], k=5, collection=collection,
        filter_=models.SearchQueryFilterType0.from_dict({"colour": "red"}), explain=True)
    found = search.sync_detailed(client=api, body=query)
    assert found.status_code == 200, found.content
    result = found.parsed
    assert isinstance(result, models.SearchResponse)
    # The query image leaves its own results; the blue photo fails the filter.
    assert [hit.id for hit in result.results] == [ids[1]]
    assert all(hit.metadata.to_dict() == {"colour": "red"} for hit in result.results)
    assert isinstance(result.explain, models.SearchPlanOut)

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in photos[2:4]:
            zf.writestr(path.name, jpeg(path))
    created = create_job.sync_detailed(client=api, body=models.JobForm(
        file=types.File(payload=io.BytesIO(archive.getvalue()), file_name="batch.zip",
                        mime_type="application/zip"), collection=collection))
    assert created.status_code == 202, created.content
    assert isinstance(created.parsed, models.JobCreated)
    deadline = time.monotonic() + 120
    while True:
        job = get_job.sync(created.parsed.id, client=api)
        assert isinstance(job, models.JobOut)
        if job.status in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert (job.status, job.total, job.done, job.failed) == ("done", 2, 2, 0), job.to_dict()

    groups = duplicates.sync_detailed(client=api, collection=collection)
    assert groups.status_code == 200, groups.content
    assert isinstance(groups.parsed, models.DuplicateList)
    clustered = [sorted(c.ids) for c in groups.parsed.clusters]
    assert sorted(ids[:2]) in clustered, groups.parsed.to_dict()
