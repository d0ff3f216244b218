"""Fixtures of the text tests: the sentence model, and a cat and a coffee cup uploaded."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from PIL import Image as PILImage

from service.text import sentence
from tests.api.test_images import upload
from tests.conftest import wait_for_status


@pytest.fixture(scope="session")
def sentence_model(model_dir: Path) -> Path:
    """The sentence model: `make test` installs it beside the image models, else built here."""
    if not sentence.is_installed(model_dir):
        sentence.install_sentence_model(model_dir)
    return model_dir


def jpeg(pixels: np.ndarray) -> bytes:
    """An RGB array as JPEG bytes."""
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def cat_and_coffee(app: Flask, worker: object) -> tuple[str, dict[str, str]]:
    """scikit-image's sample photos of a cat and of a cup of coffee, embedded by the worker."""
    import skimage.data

    client = app.test_client()
    collection = f"pets-{uuid.uuid4().hex[:6]}"
    ids = {}
    for name, pixels in (("cat", skimage.data.chelsea()), ("coffee", skimage.data.coffee())):
        resp = upload(client, jpeg(pixels), collection=collection, name=f"{name}-photo.jpg")
        assert resp.status_code in (200, 202), resp.get_json()
        ids[name] = resp.get_json()["id"]
    for image_id in ids.values():
        assert wait_for_status(client, image_id)["status"] == "ready"
    return collection, ids
