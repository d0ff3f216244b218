"""Hashing domain functions: create, fit, list and apply code sets; encode new images."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.schema import DropIndex

from service.embedding.indexes import forget, request_build, send_builds
from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.errors import ApiError, Conflict, NotFound
from service.hashing.encoders import (
    MAX_BITS,
    METHODS,
    MIN_BITS,
    CodeParams,
    encode,
    fit,
    to_bitstring,
)
from service.hashing.models import CodeSet, ImageCode, code_index, code_index_name
from service.images.models import Image

log = logging.getLogger(__name__)

# Codes are written in chunks so that a million-image fit never holds one giant statement.
INSERT_CHUNK = 5_000
# Decoded encoders kept per process, oldest dropped first.
PARAMS_CACHE_SIZE = 32
_PARAMS_CACHE: dict[tuple[int, datetime], CodeParams] = {}


def create_code_set(name: str, *, session: Session, model: EmbeddingModel, method: str,
                    bits: int, collection: str | None = None, seed: int = 0) -> CodeSet:
    """A pending code set row; fitting happens in the `lookalike.fit_codes` task."""
    if method not in METHODS:
        raise ApiError("invalid_method", f"method must be one of {', '.join(METHODS)}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ApiError("invalid_bits", f"bits must be between {MIN_BITS} and {MAX_BITS}")
    if method == "itq" and bits > model.dim:
        raise ApiError("invalid_bits", f"ITQ needs bits <= the model's dimension {model.dim}")
    row = CodeSet(name=name, model_id=model.id, collection=collection, method=method,
                  bits=bits, seed=seed, status="pending")
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict("code_set_exists", f"a code set named {name!r} exists") from exc
    return row


def get_code_set(name: str, *, session: Session) -> CodeSet:
    """The code set called `name`, or 404."""
    row = session.scalar(select(CodeSet).where(CodeSet.name == name))
    if row is None:
        raise NotFound("unknown_code_set", f"no code set named {name!r}")
    return row


def list_code_sets(*, session: Session) -> list[tuple[CodeSet, int]]:
    """Every code set with its number of encoded images, oldest first."""
    counts = (select(ImageCode.code_set_id, func.count().label("n"))
              .group_by(ImageCode.code_set_id).subquery())
    rows = session.execute(
        select(CodeSet, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.code_set_id == CodeSet.id).order_by(CodeSet.id))
    return [(code_set, int(n)) for code_set, n in rows]


def count_codes(code_set_id: int, *, session: Session) -> int:
    """How many images have a code in the set."""
    return int(session.scalar(select(func.count()).select_from(ImageCode)
                              .where(ImageCode.code_set_id == code_set_id)) or 0)


def delete_code_set(name: str, *, session: Session) -> None:
    """Drop a code set, its codes (cascade) and its index."""
    row = get_code_set(name, session=session)
    forget(code_index_name(row.id), session=session)
    session.execute(DropIndex(code_index(row.id, row.bits), if_exists=True))
    session.execute(delete(CodeSet).where(CodeSet.id == row.id))


def params_of(code_set: CodeSet) -> CodeParams:
    """The fitted encoder of a ready code set (decoded once per process and fit)."""
    if code_set.status != "ready" or code_set.fitted_at is None:
        raise ApiError("code_set_not_ready",
                       f"code set {code_set.name!r} is {code_set.status}", status=409)
    # Reading and decoding the blob (2.6 MB for 256-bit LSH on 1280-d vectors) cost more than
    # the whole Hamming search; a refit changes fitted_at, so a stale entry is never used.
    key = (int(code_set.id), code_set.fitted_at)
    params = _PARAMS_CACHE.get(key)
    if params is None:
        assert code_set.params is not None
        params = CodeParams.from_bytes(code_set.method, code_set.bits, code_set.params)
        if len(_PARAMS_CACHE) >= PARAMS_CACHE_SIZE:
            _PARAMS_CACHE.pop(next(iter(_PARAMS_CACHE)))
        _PARAMS_CACHE[key] = params
    return params


def _covered(code_set: CodeSet) -> list[Any]:
    conditions: list[Any] = [ImageEmbedding.model_id == code_set.model_id,
                             Image.status == "ready"]
    if code_set.collection is not None:
        conditions.append(Image.collection == code_set.collection)
    return conditions


def _load_vectors(code_set: CodeSet, *, session: Session,
                  image_ids: list[uuid.UUID] | None = None
                  ) -> tuple[list[uuid.UUID], np.ndarray]:
    conditions = _covered(code_set)
    if image_ids is not None:
        conditions.append(Image.id.in_(image_ids))
    rows = session.execute(
        select(ImageEmbedding.image_id, ImageEmbedding.vector)
        .join(Image, Image.id == ImageEmbedding.image_id)
        .where(*conditions).order_by(ImageEmbedding.image_id)).all()
    ids = [r[0] for r in rows]
    vectors = (np.stack([np.asarray(r[1], dtype=np.float32) for r in rows]) if rows
               else np.zeros((0, 0), dtype=np.float32))
    return ids, vectors


def _write_codes(code_set: CodeSet, ids: list[uuid.UUID], bits: np.ndarray, *,
                 session: Session) -> None:
    for start in range(0, len(ids), INSERT_CHUNK):
        chunk = [{"image_id": ids[i], "code_set_id": code_set.id, "code": to_bitstring(bits[i])}
                 for i in range(start, min(len(ids), start + INSERT_CHUNK))]
        stmt = insert(ImageCode).values(chunk)
        session.execute(stmt.on_conflict_do_update(
            index_elements=["image_id", "code_set_id"], set_={"code": stmt.excluded.code}))


def fit_code_set(code_set_id: int, *, session: Session) -> str:
    """Fit the encoder on the covered vectors and encode them all; commits, then sends the
    Hamming index's CONCURRENTLY build (searches rank the codes exactly until it is valid)."""
    # Locked while it fits: a message sent again (by the sweeper) finds it busy, not twice fitted.
    code_set = session.scalar(select(CodeSet).where(CodeSet.id == code_set_id)
                              .with_for_update(skip_locked=True))
    if code_set is None:
        return "busy" if session.get(CodeSet, code_set_id) is not None else "deleted"
    if code_set.status == "ready":
        return "ready"
    ids, vectors = _load_vectors(code_set, session=session)
    try:
        params = fit(code_set.method, vectors, code_set.bits, code_set.seed)
    except ValueError as exc:
        code_set.status, code_set.error = "failed", str(exc)
        return "failed"
    bits = encode(params, vectors)
    session.execute(delete(ImageCode).where(ImageCode.code_set_id == code_set.id))
    _write_codes(code_set, ids, bits, session=session)
    # Built after the bulk insert: one build is much faster than inserting into a live graph.
    build = request_build(code_index(code_set.id, code_set.bits), model_id=code_set.model_id,
                          session=session)
    code_set.params = params.to_bytes()
    code_set.status, code_set.error = "ready", None
    code_set.fitted_rows = len(ids)
    code_set.fitted_at = session.scalar(select(func.now()))
    log.info("code set %s fitted on %d vectors", code_set.name, len(ids))
    session.commit()
    send_builds([build])
    return "ready"


def encode_images(image_ids: list[uuid.UUID], collection: str, *, session: Session) -> int:
    """Encode new images of one collection under every ready code set covering it, one query
    per code set for all of them; returns how many sets wrote codes."""
    if not image_ids:
        return 0
    sets = session.scalars(select(CodeSet).where(
        CodeSet.status == "ready",
        or_(CodeSet.collection.is_(None), CodeSet.collection == collection))).all()
    done = 0
    for code_set in sets:
        ids, vectors = _load_vectors(code_set, session=session, image_ids=image_ids)
        if ids:
            _write_codes(code_set, ids, encode(params_of(code_set), vectors), session=session)
            done += 1
    return done


def encode_image(image_id: uuid.UUID, *, session: Session) -> int:
    """Encode one newly embedded image under every ready code set covering it; returns how many."""
    image = session.get(Image, image_id)
    if image is None:
        return 0
    return encode_images([image_id], image.collection, session=session)
