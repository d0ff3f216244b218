"""Near-duplicate detection: 500 clothing photos x 7 edits mixed into the full set.

Edits: resize to 30%, centre crop 70%, JPEG quality 20, rotation by 90 degrees, horizontal
flip, brightness +30%, a text watermark. Every item (3,308 originals + 3,500 variants) queries
all others, per method: CNN (EfficientNet-Lite0, cosine), pHash (64 bits, Hamming), HSV colour
histogram (chi-square and L1), 256-bit LSH codes of the CNN vectors (Hamming), and the CNN
with centre regions (`"query_crops": true`: the best of whole-whole, whole-region and
region-whole cosine, regions being the central 70% embedded by the same network).

Reported per edit: recall@1 (the nearest other item is the original or another variant of the
same photo) and duplicate-group precision/recall: groups are the minimum spanning tree of each
method's 10-NN graph cut at a threshold (service.graph.clustering, as the service does), pairwise
against the true groups. The threshold of each method is calibrated here: the largest one whose
overall pairwise precision is at least 0.95 (printed, and used as the service's default for
CNN duplicates). Then the tiers of GET /api/v1/duplicates: pHash pairs at most t bits apart,
alone and followed by the CNN's calibrated cut, for a sweep of t (the pHash tier's threshold).

    python -m bench.neardup [--photos 500]
"""

from __future__ import annotations

import argparse
import io
import time
import uuid
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from bench.harness import BENCH_DIR, CLOTHING, append_results, clothing_embeddings

EDITS = ("resize30", "crop70", "jpeg20", "rot90", "hflip", "bright30", "watermark")
K = 10
TARGET_PRECISION = 0.95


def make_variant(img: Image.Image, edit: str) -> bytes:
    """One edited copy of a photo, as the JPEG bytes a user would upload."""
    quality = 90
    w, h = img.size
    if edit == "resize30":
        out = img.resize((max(1, round(w * 0.3)), max(1, round(h * 0.3))),
                         Image.Resampling.LANCZOS)
    elif edit == "crop70":
        cw, ch = round(w * 0.7), round(h * 0.7)
        left, top = (w - cw) // 2, (h - ch) // 2
        out = img.crop((left, top, left + cw, top + ch))
    elif edit == "jpeg20":
        out, quality = img, 20
    elif edit == "rot90":
        out = img.transpose(Image.Transpose.ROTATE_90)
    elif edit == "hflip":
        out = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif edit == "bright30":
        out = ImageEnhance.Brightness(img).enhance(1.3)
    else:
        out = img.copy().convert("RGBA")
        layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        font = ImageFont.load_default(size=max(12, h // 12))
        draw.text((w // 10, h // 2), "© lookalike stock", fill=(255, 255, 255, 160),
                  font=font)
        out = Image.alpha_composite(out, layer).convert("RGB")
    buf = io.BytesIO()
    out.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def features(n_photos: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per method, one feature row per item; the group and the edit index (-1: original)."""
    from service.config import load_settings
    from service.embedding.session import get_embedder
    from service.embedding.transforms import batch, preprocess
    from service.features.handcrafted import decode_rgb, hsv_histogram, phash
    from service.features.models import region_preprocessing

    base, rows = clothing_embeddings()
    cache = BENCH_DIR / f"neardup-{n_photos}-{seed}-v2.npz"
    if cache.exists():
        data = np.load(cache)
        return ({k[2:]: data[k] for k in data.files if k.startswith("f_")}, data["group"],
                data["edit"])
    picks = np.sort(np.random.default_rng(seed).choice(len(rows), n_photos, replace=False))
    embedder = get_embedder(load_settings()["MODEL_DIR"], "efficientnet-lite0")
    prep = embedder.info.preprocessing
    # The centre-region vectors of `"query_crops": true` (service/embedding/regions.py).
    zoom_prep = region_preprocessing(prep)
    hist, ph = [], []
    started = time.perf_counter()
    items: list[bytes] = [(CLOTHING / r["file"]).read_bytes() for r in rows]
    group, edit = list(range(len(rows))), [-1] * len(rows)
    for p in picks:
        with Image.open(CLOTHING / rows[p]["file"]) as img:
            img = img.convert("RGB")
            for e, name in enumerate(EDITS):
                items.append(make_variant(img, name))
                group.append(int(p))
                edit.append(e)
    # The service's own decoding and features (service/features), from the bytes.
    for data in items:
        img = decode_rgb(data, max_pixels=10**8)
        hist.append(hsv_histogram(img))
        ph.append(phash(img))
    print(f"hand-crafted features of {len(hist)} items in {time.perf_counter() - started:.0f}s")
    cnn, zoom = [base], []
    variants = items[len(rows):]
    for i in range(0, len(variants), 16):
        arrays = [preprocess(b, prep, max_pixels=10**8) for b in variants[i:i + 16]]
        cnn.append(embedder.run(batch(arrays)).vectors)
    for i in range(0, len(items), 16):
        arrays = [preprocess(b, zoom_prep, max_pixels=10**8) for b in items[i:i + 16]]
        zoom.append(embedder.run(batch(arrays)).vectors)
    print(f"CNN features in {time.perf_counter() - started:.0f}s")
    feats = {"cnn": np.concatenate(cnn).astype(np.float32), "hist": np.stack(hist),
             "phash": np.stack(ph), "zoom": np.concatenate(zoom).astype(np.float32)}
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    np.savez(cache, group=np.array(group), edit=np.array(edit),
             **{f"f_{k}": v for k, v in feats.items()})
    return feats, np.array(group), np.array(edit)


def knn(distance: Callable[[np.ndarray], np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The K nearest other items of every item (ids and distances), in blocks of rows."""
    ids = np.zeros((n, K), dtype=np.int64)
    dist = np.zeros((n, K), dtype=np.float64)
    for start in range(0, n, 64):
        rows = np.arange(start, min(n, start + 64))
        d = distance(rows).astype(np.float64)
        d[np.arange(len(rows)), rows] = np.inf
        order = np.argsort(d, axis=1, kind="stable")[:, :K]
        ids[rows] = order
        dist[rows] = np.take_along_axis(d, order, axis=1)
    return ids, dist


def method_distances(feats: dict[str, np.ndarray]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Row-block distance functions per method."""
    from service.features.handcrafted import chi_square
    from service.hashing.encoders import encode, fit_lsh

    unit = feats["cnn"] / np.linalg.norm(feats["cnn"], axis=1, keepdims=True)
    hist = feats["hist"].astype(np.float32)
    ph = feats["phash"].astype(np.float32)
    # Fitted on every item, as a code set is fitted on the collection as stored.
    lsh = encode(fit_lsh(feats["cnn"], 256, seed=0), feats["cnn"]).astype(np.float32)

    def hamming_of(codes: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda rows: (codes[rows] @ (1 - codes).T + (1 - codes[rows]) @ codes.T)

    def chi(rows: np.ndarray) -> np.ndarray:
        return np.stack([chi_square(hist[r][None, :], hist) for r in rows])

    def l1(rows: np.ndarray) -> np.ndarray:
        return np.stack([np.abs(hist[r][None, :] - hist).sum(axis=1) for r in rows])

    zoom = feats["zoom"] / np.linalg.norm(feats["zoom"], axis=1, keepdims=True)

    def with_regions(rows: np.ndarray) -> np.ndarray:
        # `"query_crops": true`: the best of whole vs whole, the query vs stored centre
        # regions (the query is a crop) and the query's centre region vs whole stored images.
        return 1.0 - np.maximum(np.maximum(unit[rows] @ unit.T, unit[rows] @ zoom.T),
                                zoom[rows] @ unit.T)

    return {"CNN cosine": lambda rows: 1.0 - unit[rows] @ unit.T,
            "CNN + centre regions": with_regions,
            "pHash Hamming": hamming_of(ph),
            "HSV hist chi-square": chi,
            "HSV hist L1": l1,
            "LSH-256 Hamming": hamming_of(lsh)}


def group_scores(ids: np.ndarray, dist: np.ndarray, group: np.ndarray, threshold: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: true-positive pairs and predicted pairs of its group in the cut MST; labels."""
    n = len(ids)
    edges = [(i, int(ids[i, j]), float(dist[i, j])) for i in range(n) for j in range(K)
             if dist[i, j] <= threshold]
    return edge_scores(n, edges, group)


def edge_scores(n: int, edges: list[tuple[int, int, float]], group: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """group_scores for the connected components of any list of linking edges."""
    from service.graph.clustering import cut_clusters

    pred = np.empty(n, dtype=np.int64)
    for label, members in enumerate(cut_clusters(range(n), edges, float("inf"))):
        pred[members] = label
    tp = np.zeros(n)
    sizes = np.bincount(pred)
    for label in np.unique(pred[np.bincount(pred)[pred] > 1]):
        members = np.flatnonzero(pred == label)
        same = group[members][:, None] == group[members][None, :]
        tp[members] = same.sum(axis=1) - 1
    predicted = sizes[pred] - 1
    return tp, predicted.astype(np.float64), pred


def evaluate(name: str, ids: np.ndarray, dist: np.ndarray, group: np.ndarray,
             edit: np.ndarray) -> dict[str, object]:
    """Recall@1 per edit, the calibrated threshold, and group precision/recall per edit."""
    true_size = np.bincount(group)[group] - 1
    in_groups = true_size > 0
    candidates = np.unique(dist[in_groups, 0])
    if len(candidates) > 400:
        candidates = np.quantile(dist[in_groups, :].ravel(), np.linspace(0.001, 0.6, 200))
    best = (float(candidates[0]), 0.0, 0.0)
    lo, hi = 0, len(candidates) - 1
    # Precision falls as the threshold grows: bisect for the largest one that keeps it.
    while lo <= hi:
        mid = (lo + hi) // 2
        tp, pred, _ = group_scores(ids, dist, group, float(candidates[mid]))
        precision = tp.sum() / max(pred.sum(), 1.0)
        recall = tp[in_groups].sum() / true_size[in_groups].sum()
        if precision >= TARGET_PRECISION:
            best, lo = (float(candidates[mid]), precision, recall), mid + 1
        else:
            hi = mid - 1
    threshold = best[0]
    tp, pred, labels = group_scores(ids, dist, group, threshold)
    out: dict[str, object] = {"method": name, "threshold": threshold,
                              "precision": best[1], "recall": best[2]}
    for e, edit_name in enumerate(EDITS):
        rows = np.flatnonzero(edit == e)
        out[f"r1_{edit_name}"] = float(np.mean(group[ids[rows, 0]] == group[rows]))
        out[f"gp_{edit_name}"] = float(tp[rows].sum() / max(pred[rows].sum(), 1.0))
        out[f"gr_{edit_name}"] = float(tp[rows].sum() / true_size[rows].sum())
        # The edit's item lies in the same group as its original (group ids are the
        # originals' row numbers).
        out[f"go_{edit_name}"] = float(np.mean(labels[rows] == labels[group[rows]]))
    print(out)
    return out


def tiered(feats: dict[str, np.ndarray], cnn: dict[str, tuple[np.ndarray, np.ndarray, float]],
           group: np.ndarray, edit: np.ndarray) -> list[dict[str, object]]:
    """Duplicate groups as GET /duplicates makes them: pHash pairs <= t, then CNN edges.

    `cnn`: per variant of the cnn tier (plain, or with centre regions as `crops=true`), its
    10-NN graph and threshold.
    """
    from service.graph.duplicates import phash_pairs

    n = len(group)
    started = time.perf_counter()
    pairs = phash_pairs(list(range(n)), feats["phash"].astype(np.float32), max(PHASH_SWEEP))
    print(f"pHash pairs <= {max(PHASH_SWEEP)} bits among {n} items: {len(pairs)} in "
          f"{time.perf_counter() - started:.2f}s")
    cnn_edges = {name: [(i, int(ids[i, j]), 0.0) for i in range(n) for j in range(K)
                        if dist[i, j] <= threshold]
                 for name, (ids, dist, threshold) in cnn.items()}
    true_size = np.bincount(group)[group] - 1
    in_groups = true_size > 0
    out = []
    for tiers in ("phash", *(f"phash+{name}" for name in cnn)):
        for t in PHASH_SWEEP if tiers in ("phash", "phash+cnn") else (4,):
            edges = [(int(a), int(b), 0.0) for a, b, d in pairs if d <= t]
            if tiers != "phash":
                edges += cnn_edges[tiers.removeprefix("phash+")]
            tp, pred, labels = edge_scores(n, edges, group)
            row: dict[str, object] = {
                "tiers": tiers, "t": t, "precision": tp.sum() / max(pred.sum(), 1.0),
                "recall": tp[in_groups].sum() / true_size[in_groups].sum()}
            for e, edit_name in enumerate(EDITS):
                rows = np.flatnonzero(edit == e)
                row[f"go_{edit_name}"] = float(np.mean(labels[rows] == labels[group[rows]]))
            print(row)
            out.append(row)
    return out


PHASH_SWEEP = (0, 2, 4, 6, 8, 10, 12)
# Crops the centre regions were not made for: other shares, and a 70% crop off the centre.
EXTRA_CROPS = {"crop70": (0.7, 0.5), "crop60": (0.6, 0.5), "crop80": (0.8, 0.5),
               "crop50": (0.5, 0.5), "crop70-corner": (0.7, 0.0)}


def crop(img: Image.Image, share: float, anchor: float) -> bytes:
    """A crop keeping `share` of each side, placed at `anchor` (0.5: centred, 0: top left)."""
    w, h = img.size
    cw, ch = round(w * share), round(h * share)
    left, top = round((w - cw) * anchor), round((h - ch) * anchor)
    buf = io.BytesIO()
    img.crop((left, top, left + cw, top + ch)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def extra_crops(n_photos: int, seed: int, feats: dict[str, np.ndarray],
                n_originals: int) -> str:
    """Recall@1 against the originals only, plain CNN vs centre regions, for other crops."""
    from service.config import load_settings
    from service.embedding.session import get_embedder
    from service.embedding.transforms import batch, preprocess
    from service.features.models import region_preprocessing

    rows = clothing_embeddings()[1]
    picks = np.sort(np.random.default_rng(seed).choice(len(rows), n_photos, replace=False))
    embedder = get_embedder(load_settings()["MODEL_DIR"], "efficientnet-lite0")
    preps = (embedder.info.preprocessing, region_preprocessing(embedder.info.preprocessing))

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    base = unit(feats["cnn"][:n_originals])
    base_zoom = unit(feats["zoom"][:n_originals])
    lines = []
    for name, (share, anchor) in EXTRA_CROPS.items():
        items = []
        for p in picks:
            with Image.open(CLOTHING / rows[p]["file"]) as img:
                items.append(crop(img.convert("RGB"), share, anchor))
        whole, zoom = [], []
        for prep, out in zip(preps, (whole, zoom), strict=True):
            for i in range(0, len(items), 16):
                out.append(embedder.run(batch([preprocess(b, prep, max_pixels=10**8)
                                               for b in items[i:i + 16]])).vectors)
        u, z = unit(np.concatenate(whole)), unit(np.concatenate(zoom))
        plain = np.argmax(u @ base.T, axis=1)
        regions = np.argmax(np.maximum(np.maximum(u @ base.T, u @ base_zoom.T), z @ base.T),
                            axis=1)
        r_plain, r_regions = float(np.mean(plain == picks)), float(np.mean(regions == picks))
        print(f"{name}: recall@1 vs originals plain {r_plain:.3f}, regions {r_regions:.3f}")
        lines.append(f"| {name} | {share:.0%} | {'centre' if anchor == 0.5 else 'top left'} | "
                     f"{r_plain:.3f} | {r_regions:.3f} |")
    return ("| crop | side kept | where | CNN cosine | CNN + centre regions |\n"
            "|---|---:|---|---:|---:|\n" + "\n".join(lines))


def latency(feats: dict[str, np.ndarray], queries: int, seed: int) -> str:
    """p50 of plain and `"query_crops": true` searches by stored image, in PostgreSQL."""
    import psycopg
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector
    from sqlalchemy.orm import Session

    from bench.harness import bench_services, percentiles
    from service.db import make_engine
    from service.embedding.indexes import build_now
    from service.embedding.models import EmbeddingModel
    from service.embedding.service import ensure_indexes
    from service.features.models import region_model_name
    from service.search.service import run_search
    from service.search.types import SearchRequest

    n = len(feats["cnn"])
    ids = [uuid.uuid4() for _ in range(n)]
    base = "efficientnet-lite0"
    with bench_services("neardup") as urls:
        url = urls["DATABASE_URL"]
        with psycopg.connect(url) as conn:
            register_vector(conn)
            with conn.cursor().copy(
                    "COPY images (id, collection, sha256, mime, format, width, height, bytes, "
                    "metadata, status) FROM STDIN") as copy:
                for i, image_id in enumerate(ids):
                    copy.write_row((image_id, "neardup", f"{i:064x}", "image/jpeg", "JPEG", 1,
                                    1, 1, "{}", "ready"))
            for name, key in ((base, "cnn"), (region_model_name(base), "zoom")):
                model_id = conn.execute(
                    "INSERT INTO models (name, version, dim, sha256) VALUES (%s, '1', %s, %s) "
                    "RETURNING id", (name, feats[key].shape[1], "0" * 64)).fetchone()[0]
                with conn.cursor().copy("COPY image_embeddings (image_id, model_id, vector) "
                                        "FROM STDIN WITH (FORMAT BINARY)") as copy:
                    copy.set_types(["uuid", "int4", "halfvec"])
                    for i, image_id in enumerate(ids):
                        copy.write_row((image_id, model_id, HalfVector(feats[key][i])))
            conn.commit()
        engine = make_engine(url)
        with Session(engine) as session:
            # Built after the load, as a reindex; CONCURRENTLY, once nothing here is open.
            builds = [ensure_indexes(model, session=session)
                      for model in session.query(EmbeddingModel).all()]
            session.commit()
        build_now(builds, engine=engine)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        picks = np.random.default_rng(seed).choice(n, queries, replace=False)
        times: dict[bool, list[float]] = {False: [], True: []}
        with Session(engine) as session:
            for rep in range(2):  # the first pass warms caches and is not counted
                for i in picks:
                    for crops in (False, True):
                        started = time.perf_counter()
                        run_search(SearchRequest(k=10, image_id=str(ids[i]), query_crops=crops),
                                   session=session, model_dir="", default_model=base,
                                   max_pixels=10**8, max_k=1000)
                        session.rollback()
                        if rep:
                            times[crops].append((time.perf_counter() - started) * 1000)
        engine.dispose()
    plain, crops = percentiles(times[False]), percentiles(times[True])
    print(f"plain p50 {plain[0]:.2f} ms, query_crops p50 {crops[0]:.2f} ms")
    return ("| search by stored image, k = 10 | p50 ms | p95 ms | p50 ratio |\n"
            "|---|---:|---:|---:|\n"
            f"| plain (HNSW, cosine) | {plain[0]:.2f} | {plain[1]:.2f} | 1.00 |\n"
            f"| `\"query_crops\": true` (3 searches) | {crops[0]:.2f} | {crops[1]:.2f} | "
            f"{crops[0] / plain[0]:.2f} |")


def main() -> None:
    """Run the benchmark and append its tables to docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-crops", action="store_true",
                        help="only: recall@1 of other crops against the originals")
    parser.add_argument("--latency", type=int, metavar="QUERIES", default=0,
                        help="only: plain vs query_crops search latency in PostgreSQL")
    args = parser.parse_args()
    feats, group, edit = features(args.photos, args.seed)
    if args.latency:
        append_results(
            f"query_crops latency: {len(group)} items in PostgreSQL, {args.latency} queries",
            "Both searches by a stored image over the near-duplicate items (whole and centre-"
            "region vectors, each model with its HNSW index built after loading); alternating "
            "plain and query_crops, a warm-up pass not counted. Shared machine: compare the "
            "ratio.\n\n" + latency(feats, args.latency, args.seed))
        return
    if args.extra_crops:
        append_results(
            f"Crops the centre regions were not made for: {args.photos} clothing photos",
            "Each crop of each photo queries the 3,308 originals only (recall@1: its own "
            "original is the nearest). CNN + centre regions = `\"query_crops\": true` (the "
            "best of whole-whole, whole-region and region-whole cosine; regions are the "
            "central 70%).\n\n" + extra_crops(args.photos, args.seed, feats,
                                               int(np.sum(edit == -1))))
        return
    results = []
    graphs = {}
    for name, distance in method_distances(feats).items():
        started = time.perf_counter()
        ids, dist = knn(distance, len(group))
        graphs[name] = (ids, dist)
        print(f"{name}: 10-NN of {len(group)} items in {time.perf_counter() - started:.0f}s")
        results.append(evaluate(name, ids, dist, group, edit))
    cnn_threshold = float(next(r["threshold"] for r in results if r["method"] == "CNN cosine"))
    # The service cuts both cnn variants at the CNN's calibrated 0.108.
    tiers = tiered(feats, {"cnn": (*graphs["CNN cosine"], cnn_threshold),
                           "cnn regions": (*graphs["CNN + centre regions"], cnn_threshold)},
                   group, edit)
    tier_table = "\n".join(
        f"| {r['tiers']} | {r['t']} | {r['precision']:.3f} | {r['recall']:.3f} | "
        + " | ".join(f"{r[f'go_{e}']:.2f}" for e in EDITS) + " |" for r in tiers)
    head = "| method | " + " | ".join(EDITS) + " |\n|---|" + "---:|" * len(EDITS)
    r1 = "\n".join(f"| {r['method']} | " + " | ".join(f"{r[f'r1_{e}']:.3f}" for e in EDITS)
                   + " |" for r in results)
    groups = "\n".join(
        f"| {r['method']} | {r['threshold']:.4g} | {r['precision']:.3f} | {r['recall']:.3f} | "
        + " | ".join(f"{r[f'gp_{e}']:.2f}/{r[f'gr_{e}']:.2f}/{r[f'go_{e}']:.2f}"
                     for e in EDITS) + " |"
        for r in results)
    append_results(
        f"Near duplicates: {args.photos} clothing photos x {len(EDITS)} edits in "
        f"{len(group)} items",
        "Recall@1: the nearest other item is the original or another edit of the same photo.\n\n"
        + head + "\n" + r1 + "\n\nDuplicate groups: the MST of each method's 10-NN graph cut at "
        "the largest threshold with pairwise precision >= 0.95 (calibrated here); per edit, "
        "precision / recall of the pairs its items form (with all 7 other members of their "
        "true group, hard edits included) / share of its items grouped with their original.\n\n"
        "| method | threshold | precision | "
        "recall | " + " | ".join(EDITS) + " |\n|---|---:|---:|---:|" + "---|" * len(EDITS)
        + "\n" + groups
        + f"\n\nTiered duplicate groups (GET /api/v1/duplicates): pHash pairs at most t bits "
        f"apart (all pairs, exact), alone and then with the CNN's 10-NN edges at "
        f"{cnn_threshold:.4g} (cnn regions: the CNN + centre regions graph, as `crops=true`); "
        "overall pairwise precision / recall, and per edit the share of its items grouped "
        "with their original.\n\n"
        "| tiers | pHash t | precision | recall | " + " | ".join(EDITS) + " |\n|---|---:|---:|"
        "---:|" + "---:|" * len(EDITS) + "\n" + tier_table)


if __name__ == "__main__":
    main()
