"""Text-to-image without CLIP: the label bridge on the shared clothing set.

Each of the 17 labels, lower-cased, is a text query ("dress", "shoes", "t-shirt", ...). Every
photo's class probabilities come from the default model's ImageNet head (the same
`softmax` the service stores, rounded to float16 as halfvec keeps them); the query's class
weights come from `service.text.sentence` (MiniLM similarities to the class names, softmax
over the best few). An image's score is their inner product. P@10 and AP are computed over
all 3,308 photos, a photo being relevant when its label is the query's. A sweep over the
bridge's two settings is printed first; the per-label table is for the service's defaults.
Then the same queries run through the SQL path (`semantic_side`, pgvector inner product over
halfvec(1000)) on a throwaway database, to check that it ranks as numpy does.

    python -m bench.text [--no-sql]
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np

from bench.harness import BENCH_DIR, CLOTHING, append_results, bench_services, clothing_labels
from service.config import settings_from_env
from service.text.labels import class_names, class_synonyms, softmax
from service.text.sentence import TEMPERATURE, TOP_LABELS, Bridge, bridge_weights

MODEL = "efficientnet-lite0"


def clothing_logits(batch_size: int = 16) -> tuple[np.ndarray, list[dict[str, str]]]:
    """ImageNet logits of every clothing photo (cached under var/bench)."""
    from service.embedding.session import get_embedder
    from service.embedding.transforms import batch, preprocess

    rows = clothing_labels()
    cache = BENCH_DIR / f"clothing-logits-{MODEL}.npy"
    if cache.exists():
        logits = np.load(cache)
        if len(logits) == len(rows):
            return logits, rows
    embedder = get_embedder(settings_from_env()["MODEL_DIR"], MODEL)
    out = []
    started = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        arrays = [preprocess((CLOTHING / r["file"]).read_bytes(), embedder.info.preprocessing,
                             max_pixels=10**8) for r in rows[i:i + batch_size]]
        result = embedder.run(batch(arrays))
        assert result.logits is not None
        out.append(result.logits)
    logits = np.concatenate(out).astype(np.float32)
    print(f"classified {len(rows)} photos in {time.perf_counter() - started:.0f}s")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    np.save(cache, logits)
    return logits, rows


def precision_and_ap(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> tuple[float, float]:
    """P@k and average precision of one ranking (ties broken by index, as by id in SQL)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    hits = relevant[order]
    p_at_k = float(hits[:k].mean())
    ranks = np.flatnonzero(hits) + 1
    ap = float((np.arange(1, len(ranks) + 1) / ranks).mean()) if len(ranks) else 0.0
    return p_at_k, ap


def evaluate(probs: np.ndarray, labels: np.ndarray, sims: dict[str, np.ndarray],
             bridge: Bridge) -> dict[str, tuple[float, float]]:
    """P@10 and AP per label query under one bridge setting."""
    out = {}
    for label, sim in sims.items():
        scores = probs @ bridge_weights(sim, bridge)
        out[label] = precision_and_ap(scores, labels == label)
    return out


def sql_check(probs: np.ndarray, labels: np.ndarray, weights: dict[str, np.ndarray]
              ) -> dict[str, float]:
    """P@10 per label through `semantic_side` on a throwaway PostgreSQL."""
    from sqlalchemy import insert, select

    from service.app import create_app
    from service.db import session_scope
    from service.embedding.registry import ModelInfo
    from service.embedding.service import ensure_model_row
    from service.images.models import Image
    from service.search.service import candidate_conditions
    from service.text.models import ImageClasses
    from service.text.service import semantic_side

    with bench_services("text") as urls:
        app = create_app({"DATABASE_URL": urls["DATABASE_URL"], "REDIS_URL": urls["REDIS_URL"]})
        with app.app_context(), session_scope() as session:
            model = ensure_model_row(ModelInfo(
                name=MODEL, version="1", dim=1280, input_size=224, resize=256, mean=[0, 0, 0],
                std=[1, 1, 1], input_name="image", outputs=["embedding", "logits"],
                licence="", sha256="0" * 64), session=session)
            ids = [uuid.uuid4() for _ in labels]
            session.execute(insert(Image), [
                {"id": ids[i], "collection": "clothing", "sha256": f"{i:064x}",
                 "mime": "image/jpeg", "format": "JPEG", "width": 1, "height": 1, "bytes": 1,
                 "status": "ready", "meta": {"label": str(labels[i])}}
                for i in range(len(ids))])
            session.execute(insert(ImageClasses), [
                {"image_id": ids[i], "model_id": model.id, "probs": probs[i]}
                for i in range(len(ids))])
            session.commit()
            label_of = {image_id: str(labels[i]) for i, image_id in enumerate(ids)}
            out, timings = {}, []
            for label, w in weights.items():
                conditions = candidate_conditions(collection="clothing", filter_doc=None,
                                                  exclude_id=None)
                side = semantic_side(w, model=model, conditions=conditions, limit=10)
                started = time.perf_counter()
                top = list(session.scalars(select(side.c.image_id)))
                timings.append((time.perf_counter() - started) * 1000)
                out[label] = sum(label_of[i] == label for i in top) / 10
            out["_ms"] = float(np.median(timings))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-sql", action="store_true", help="skip the PostgreSQL check")
    args = parser.parse_args()
    from service.text.sentence import get_sentence_encoder

    logits, rows = clothing_logits()
    probs = softmax(logits).astype(np.float16).astype(np.float32)  # as stored in halfvec
    labels = np.array([r["label"] for r in rows])
    encoder = get_sentence_encoder(settings_from_env()["MODEL_DIR"])
    assert encoder.labels is not None
    queries = sorted(set(labels.tolist()))
    sims = {q: encoder.labels @ encoder.encode([q.lower()])[0] for q in queries}

    lines = [f"{len(rows)} photos, {len(queries)} label queries (the label, lower-cased); "
             f"image side: `{MODEL}` ImageNet softmax (float16); text side: all-MiniLM-L6-v2 "
             "similarity to the 1,000 classes (names and a description each), softmax(sim / T)"
             " over the top N classes. Mean over labels.", "",
             "| top N | T | mean P@10 | mAP |", "|---|---|---|---|"]
    for top in (1, 3, 10, 30, 1000):
        for temperature in (0.01, 0.02, 0.05, 0.1):
            result = evaluate(probs, labels, sims, Bridge(top, temperature))
            p10 = np.mean([r[0] for r in result.values()])
            m_ap = np.mean([r[1] for r in result.values()])
            mark = " (default)" if (top, temperature) == (TOP_LABELS, TEMPERATURE) else ""
            lines.append(f"| {top} | {temperature}{mark} | {p10:.3f} | {m_ap:.3f} |")
            print(lines[-1])

    # Two reference points: class names without descriptions, and an oracle that queries with
    # each label's own mean class profile (minus the collection's): what no text can know, so
    # a rough ceiling for a text-to-ImageNet-class bridge over these probabilities.
    names_only = encoder.encode(list(class_synonyms()))
    plain = evaluate(probs, labels, {q: names_only @ encoder.encode([q.lower()])[0]
                                     for q in queries}, Bridge())
    mean = probs.mean(axis=0)
    oracle = {q: precision_and_ap(probs @ (probs[labels == q].mean(axis=0) - mean),
                                  labels == q) for q in queries}
    for name, res in (("class names only, no descriptions", plain),
                      ("oracle: the label's mean class profile as the query", oracle)):
        lines.append(f"| {name} | | {np.mean([r[0] for r in res.values()]):.3f} | "
                     f"{np.mean([r[1] for r in res.values()]):.3f} |")
        print(lines[-1])

    result = evaluate(probs, labels, sims, Bridge())
    names = class_names()
    lines += ["", f"Per label at the defaults (top {TOP_LABELS}, T {TEMPERATURE}); 'classes' "
              "are the query's three most weighted ImageNet classes:", "",
              "| label | photos | P@10 | AP | classes |", "|---|---|---|---|---|"]
    for q in queries:
        w = bridge_weights(sims[q])
        top3 = ", ".join(f"{names[i]} {w[i]:.2f}" for i in np.argsort(-w)[:3])
        lines.append(f"| {q} | {(labels == q).sum()} | {result[q][0]:.2f} | "
                     f"{result[q][1]:.3f} | {top3} |")
        print(lines[-1])
    p10 = np.mean([r[0] for r in result.values()])
    m_ap = np.mean([r[1] for r in result.values()])
    failing = [q for q in queries if result[q][0] < 0.7]
    lines += ["", f"**Mean P@10 {p10:.3f}, mAP {m_ap:.3f}** at the defaults; below 0.7: "
              f"{', '.join(failing) or 'none'}. A random ranking scores about "
              f"{np.mean([(labels == q).mean() for q in queries]):.3f} (mean label share)."]
    # Why a label fails: what its photos look like to ImageNet (the class with the highest mean
    # probability over them) and which label's photos show that class most.
    profile = {q: probs[labels == q].mean(axis=0) for q in queries}
    reasons = []
    for q in failing:
        c = int(np.argmax(profile[q]))
        owner = max(queries, key=lambda other: profile[other][c])
        query_class = names[int(np.argmax(bridge_weights(sims[q])))]
        shared = f", more so {owner}'s" if owner != q else ""
        reasons.append(f"{q} (photos: {names[c]} {profile[q][c]:.2f}{shared}; "
                       f"query went to {query_class})")
    if reasons:
        lines.append("Why they fail: " + "; ".join(reasons) + ".")
    if not args.no_sql:
        weights = {q: bridge_weights(sims[q]) for q in queries}
        sql = sql_check(probs, labels, weights)
        sql_p10 = np.mean([sql[q] for q in queries])
        agree = sum(abs(sql[q] - result[q][0]) < 1e-9 for q in queries)
        lines.append(f"Through SQL (`semantic_side`, halfvec inner product, exact scan of "
                     f"{len(rows)} rows): mean P@10 {sql_p10:.3f}, equal to numpy for "
                     f"{agree}/{len(queries)} labels, median {sql['_ms']:.1f} ms a query.")
        print(lines[-1])
    append_results("Text search: the label bridge on the clothing set", "\n".join(lines))


if __name__ == "__main__":
    main()
