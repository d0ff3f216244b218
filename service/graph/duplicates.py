"""Near-duplicate groups in tiers: identical bytes, then pHash, then the CNN's kNN graph.

Each tier links pairs of a collection's ready images; the groups are the connected components
(single linkage), and each link records the first tier, in that order, that joined its two
groups. So a group reports the loosest tier it needed:

- `exact`: the same sha256. Uploads into one collection are deduplicated by sha256 (a second
  upload returns the stored image with `duplicate: true`), so inside a collection this tier
  finds nothing by construction; it is kept so that the order of evidence is explicit.
- `phash`: 64-bit perceptual hashes (the `phash` model) at most `phash_threshold` bits apart,
  every pair compared exactly (XOR + popcount over the collection, blocked in numpy).
- `cnn`: the CNN's kNN graph cut at a cosine distance (service.graph.service.clusters). With
  `crops`, instead every pair compared by the best of whole-whole, whole-region and
  region-whole cosine (the model's `@centre70` vectors), so that crops join their originals.

Thresholds are calibrated by bench/neardup.py (docs/hashing.md).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.graph.clustering import DisjointSets
from service.graph.service import collection_edges
from service.images.models import Image

TIERS = ("exact", "phash", "cnn")
# pHash Hamming distance (bits of 64) up to which two images are the same picture: the
# largest at which pHash pairs followed by the CNN's cut keep pairwise precision >= 0.95 in
# bench/neardup.py (0.957 at 4 bits, 0.935 at 6; pHash alone: 0.992 at 4). docs/hashing.md.
PHASH_THRESHOLD = 4
# XORs per numpy block of the all-pairs pHash comparison (8 bytes each: 64 MB).
PHASH_BLOCK_ELEMENTS = 8_000_000
# Similarities per numpy block of the all-pairs crops comparison (three float32 matrices).
CROPS_BLOCK_ELEMENTS = 4_000_000


@dataclass
class DuplicateLink:
    """Two images joined by a tier, at its distance (bits for pHash, cosine for the CNN)."""

    a: uuid.UUID
    b: uuid.UUID
    tier: str
    distance: float


@dataclass
class DuplicateGroup:
    """Images of one picture, the links that joined them and the loosest tier among them."""

    ids: list[uuid.UUID]
    tier: str
    links: list[DuplicateLink] = field(default_factory=list)


def _pack(vectors: np.ndarray) -> np.ndarray:
    """0/1 rows of 64 -> one uint64 each."""
    bits = np.packbits(vectors > 0.5, axis=1)  # (n, 8) bytes, most significant bit first
    return bits.view(">u8").astype(np.uint64).ravel()


def phash_pairs(ids: list[uuid.UUID], vectors: np.ndarray, threshold: int
                ) -> list[tuple[uuid.UUID, uuid.UUID, float]]:
    """Every pair of images whose pHashes are at most `threshold` bits apart."""
    if len(ids) < 2:
        return []
    codes = _pack(vectors)
    step = max(1, PHASH_BLOCK_ELEMENTS // len(codes))
    out: list[tuple[uuid.UUID, uuid.UUID, float]] = []
    for start in range(0, len(codes), step):
        block = codes[start:start + step]
        # Only pairs (i, j) with j > i: the block against the rest of the collection.
        rest = codes[start:]
        distances = np.bitwise_count(block[:, None] ^ rest[None, :])
        rows, cols = np.nonzero(distances <= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if c > r:
                out.append((ids[start + r], ids[start + c], float(distances[r, c])))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def region_pairs(ids: list[uuid.UUID], whole: np.ndarray, regions: np.ndarray,
                 threshold: float) -> list[tuple[uuid.UUID, uuid.UUID, float]]:
    """Pairs whose best whole/centre-region cosine distance is at most `threshold`."""
    u, z = _unit(whole), _unit(regions)
    step = max(1, CROPS_BLOCK_ELEMENTS // max(1, len(ids)))
    out: list[tuple[uuid.UUID, uuid.UUID, float]] = []
    for start in range(0, len(ids), step):
        rows = slice(start, start + step)
        # The measure is symmetric: (i, j) and (j, i) take the max over the same three.
        distances = 1.0 - np.maximum(np.maximum(u[rows] @ u.T, u[rows] @ z.T), z[rows] @ u.T)
        r, c = np.nonzero(distances <= threshold)
        for i, j in zip(r.tolist(), c.tolist(), strict=True):
            if start + i < j:
                out.append((ids[start + i], ids[j], max(0.0, float(distances[i, j]))))
    return out


def _crop_links(collection: str, *, session: Session, model: EmbeddingModel,
                threshold: float) -> list[tuple[uuid.UUID, uuid.UUID, float]]:
    """The cnn tier's pairs over whole images and centre regions (all pairs, exact)."""
    from sqlalchemy.orm import aliased

    from service.embedding.service import find_model
    from service.errors import ApiError
    from service.features.models import region_model_name

    region = find_model(region_model_name(model.name), session=session)
    if region is None:
        raise ApiError("unknown_model", f"crops needs {region_model_name(model.name)}: run "
                       f"`lookalike models install {region_model_name(model.name)}` and "
                       "reindex the collection with it")
    zoom = aliased(ImageEmbedding)
    rows = session.execute(
        select(ImageEmbedding.image_id, ImageEmbedding.vector, zoom.vector)
        .join(zoom, (zoom.image_id == ImageEmbedding.image_id) & (zoom.model_id == region.id))
        .join(Image, Image.id == ImageEmbedding.image_id)
        .where(ImageEmbedding.model_id == model.id, Image.collection == collection,
               Image.status == "ready").order_by(ImageEmbedding.image_id)).all()
    if len(rows) < 2:
        return []
    whole = np.stack([np.asarray(r[1], dtype=np.float32) for r in rows])
    regions = np.stack([np.asarray(r[2], dtype=np.float32) for r in rows])
    return region_pairs([r[0] for r in rows], whole, regions, threshold)


def duplicate_groups(collection: str, *, session: Session, model: EmbeddingModel,
                     cnn_threshold: float, phash_threshold: int = PHASH_THRESHOLD,
                     tiers: tuple[str, ...] = TIERS, min_size: int = 2, crops: bool = False
                     ) -> tuple[list[DuplicateGroup], list[str]]:
    """The collection's duplicate groups by tier, largest first; and notes on skipped tiers."""
    from service.embedding.service import find_model
    from service.features.models import PHASH

    notes: list[str] = []
    images = session.execute(select(Image.id, Image.sha256).where(
        Image.collection == collection, Image.status == "ready")).all()
    links: list[tuple[int, float, uuid.UUID, uuid.UUID]] = []
    if "exact" in tiers:
        first: dict[str, uuid.UUID] = {}
        for image_id, sha in images:
            if sha in first:
                links.append((0, 0.0, first[sha], image_id))
            else:
                first[sha] = image_id
    if "phash" in tiers:
        phash_model = find_model(PHASH, session=session)
        rows = [] if phash_model is None else session.execute(
            select(ImageEmbedding.image_id, ImageEmbedding.vector)
            .join(Image, Image.id == ImageEmbedding.image_id)
            .where(ImageEmbedding.model_id == phash_model.id, Image.collection == collection,
                   Image.status == "ready").order_by(ImageEmbedding.image_id)).all()
        if phash_model is None:
            notes.append("phash tier skipped: the phash model is not enabled "
                         "(lookalike models install phash, then reindex)")
        elif len(rows) < len(images):
            notes.append(f"phash tier: {len(images) - len(rows)} of {len(images)} images have "
                         "no pHash yet (reindex the collection with phash)")
        if rows:
            vectors = np.stack([np.asarray(v, dtype=np.float32) for _, v in rows])
            links += [(1, d, a, b) for a, b, d in
                      phash_pairs([r[0] for r in rows], vectors, phash_threshold)]
    if "cnn" in tiers and crops:
        links += [(2, d, a, b) for a, b, d in _crop_links(
            collection, session=session, model=model, threshold=cnn_threshold)]
    elif "cnn" in tiers:
        _, edges = collection_edges(collection, session=session, model=model)
        links += [(2, d, a, b) for a, b, d in edges if d <= cnn_threshold]
    # Kruskal over (tier, distance): each link that joins two groups is kept, so a group's
    # links say which tier was needed where.
    links.sort(key=lambda e: (e[0], e[1], str(e[2]), str(e[3])))
    sets = DisjointSets()
    for image_id, _ in images:
        sets.find(image_id)
    kept: dict[uuid.UUID, list[DuplicateLink]] = {}
    joined: list[DuplicateLink] = []
    for rank, distance, a, b in links:
        if a in sets.parent and b in sets.parent and sets.union(a, b):
            joined.append(DuplicateLink(a, b, TIERS[rank], distance))
    members: dict[uuid.UUID, list[uuid.UUID]] = {}
    for image_id in list(sets.parent):
        members.setdefault(sets.find(image_id), []).append(image_id)  # type: ignore[arg-type]
    for link in joined:
        kept.setdefault(sets.find(link.a), []).append(link)  # type: ignore[arg-type]
    groups = []
    for root, ids in members.items():
        if len(ids) < min_size:
            continue
        group_links = kept.get(root, [])  # type: ignore[call-overload]
        loosest = max((TIERS.index(x.tier) for x in group_links), default=0)
        groups.append(DuplicateGroup(sorted(ids, key=str), TIERS[loosest], group_links))
    groups.sort(key=lambda g: (-len(g.ids), str(g.ids[0])))
    return groups, notes
