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

The head vocabulary (service.text.vocabulary): the clothing set is split by sender_id exactly
as bench/training.py and `lookalike finetune` split it (`_side(sender_id)` is the test side);
a cosine head is fitted by `service.training.service.train_head` on the training side only
(with its augmentation views), and the 17 label queries rank the TEST side photos only, by the
inner product of the query's weights over the head's class names with the class slice of the
head's embedding. The ImageNet bridge is scored on the same test photos beside it. The bridge
settings for the head are looked at on a validation split inside the training side (other
senders), never on test. The head was trained with these very labels on other people's
photos, so the queries are in its vocabulary: it is not a zero-label figure.

    python -m bench.text [--no-sql] [--no-head] [--head-models efficientnet-lite0,...]
"""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.harness import (
    append_results,
    bench_services,
    clothing_embeddings,
    clothing_outputs,
)
from service.config import load_settings
from service.text.labels import class_names, class_synonyms, softmax
from service.text.sentence import TEMPERATURE, TOP_LABELS, Bridge, bridge_weights
from service.text.vocabulary import HEAD_BRIDGE, HeadVocabulary

MODEL = "efficientnet-lite0"
# Words that are not the class names, written by hand (not tuned), each with the label it
# means: how the head vocabulary does when the query is not one of its labels.
SYNONYMS = {"sneakers": "Shoes", "boots": "Shoes", "cap": "Hat", "beanie": "Hat",
            "jeans": "Pants", "trousers": "Pants", "jacket": "Outwear", "coat": "Outwear",
            "tee": "T-Shirt", "gown": "Dress", "sweatshirt": "Hoodie", "bodysuit": "Body",
            "tank top": "Undershirt", "suit jacket": "Blazer",
            "long sleeve shirt": "Longsleeve", "polo shirt": "Polo", "mini skirt": "Skirt",
            "swim trunks": "Shorts", "button-down shirt": "Shirt", "crop top": "Top"}
HEAD_SWEEP = ((1, 0.02), (3, 0.05), (3, 0.1), (TOP_LABELS, TEMPERATURE), (17, 0.1))


def clothing_logits(batch_size: int = 16) -> tuple[np.ndarray, list[dict[str, str]]]:
    """ImageNet logits of every clothing photo (cached under var/bench)."""
    return clothing_outputs(MODEL, "logits", batch_size)


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


@dataclass
class HeadCheck:
    """The test photos' head embeddings and the label queries' weights over its classes."""

    rows: np.ndarray  # indices of the test photos
    embeddings: np.ndarray  # their head embeddings (float16 values, as stored)
    vocabulary: HeadVocabulary
    weights: dict[str, np.ndarray]


def sql_check(probs: np.ndarray, labels: np.ndarray, weights: dict[str, np.ndarray],
              head: HeadCheck | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """P@10 per label through `semantic_side` on a throwaway PostgreSQL; with `head`, also
    through `head_side` over the head's vectors of the test photos (its own collection)."""
    from sqlalchemy import insert, select

    from service.app import create_app
    from service.db import session_scope
    from service.embedding.registry import ModelInfo
    from service.embedding.service import ensure_model_row
    from service.images.models import Image
    from service.search.sql import candidate_conditions
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
            head_out: dict[str, float] = {}
            if head is not None:
                head_out = _head_sql(session, head, labels, ids, label_of)
    return out, head_out


def _head_sql(session: Any, head: HeadCheck, labels: np.ndarray, ids: list[uuid.UUID],
              label_of: dict[uuid.UUID, str]) -> dict[str, float]:
    """The test photos (a collection of their own) with head vectors; P@10 by `head_side`."""
    from sqlalchemy import insert, select, update

    from service.embedding.models import ImageEmbedding
    from service.embedding.registry import ModelInfo
    from service.embedding.service import ensure_model_row
    from service.images.models import Image
    from service.search.sql import candidate_conditions
    from service.text.service import head_side

    model = ensure_model_row(ModelInfo(
        name=f"{MODEL}+head-bench", version="1", dim=head.vocabulary.dim, input_size=224,
        resize=256, mean=[0, 0, 0], std=[1, 1, 1], input_name="image",
        outputs=["embedding", "logits"], licence="", sha256="0" * 64), session=session)
    test_ids = [ids[i] for i in head.rows]
    session.execute(update(Image).where(Image.id.in_(test_ids)).values(collection="test-side"))
    session.execute(insert(ImageEmbedding), [
        {"image_id": image_id, "model_id": model.id, "vector": vector}
        for image_id, vector in zip(test_ids, head.embeddings, strict=True)])
    session.commit()
    # numpy as SQL computes it: weights rounded to float16 (halfvec), ties ordered by id. Many
    # test photos get a class probability of ~1, so their float16 scores tie.
    slices = head.embeddings[:, head.vocabulary.start - 1:]
    by_id = np.argsort([str(i) for i in test_ids])
    rank_of_id = np.empty(len(test_ids), int)
    rank_of_id[by_id] = np.arange(len(test_ids))
    out, timings, agree = {}, [], 0
    for label, w in head.weights.items():
        conditions = candidate_conditions(collection="test-side", filter_doc=None,
                                          exclude_id=None)
        side = head_side(w, vocabulary=head.vocabulary, model=model, conditions=conditions,
                         limit=10)
        started = time.perf_counter()
        top = list(session.scalars(select(side.c.image_id)))
        timings.append((time.perf_counter() - started) * 1000)
        out[label] = sum(label_of[i] == label for i in top) / 10
        scores = slices @ w.astype(np.float16).astype(np.float32)
        expected = [test_ids[i] for i in np.lexsort((rank_of_id, -scores))[:10]]
        agree += expected == top
    out["_ms"] = float(np.median(timings))
    out["_same_top10"] = agree
    return out


def mean_pair(result: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """Mean P@10 and mAP over the queries of a result."""
    return (float(np.mean([r[0] for r in result.values()])),
            float(np.mean([r[1] for r in result.values()])))


def head_scores(slice_: np.ndarray, labels: np.ndarray, vectors: np.ndarray,
                queries: dict[str, str], bridge: Bridge = HEAD_BRIDGE
                ) -> dict[str, tuple[float, float]]:
    """P@10 and AP of each query (words -> the label it means) over a head's class slice."""
    from service.text.sentence import get_sentence_encoder

    encoder = get_sentence_encoder(load_settings()["MODEL_DIR"])
    return {words: precision_and_ap(
        slice_ @ bridge_weights(vectors @ encoder.encode([words])[0], bridge), labels == label)
        for words, label in queries.items()}


def fit_head(model_name: str, rows: list[dict[str, str]], fit_idx: np.ndarray,
             classes: list[str]) -> tuple[Any, np.ndarray]:
    """A cosine head (with augmentation views) fitted on the given rows; and the backbone's
    features of every photo, as stored (float16)."""
    from bench.training import clothing_views
    from service.training.service import train_head

    vectors, _ = clothing_embeddings(model_name)
    vectors = vectors.astype(np.float16).astype(np.float32)
    views = clothing_views(model_name, rows)
    labels = np.array([r["label"] for r in rows])
    senders = [r["sender_id"] for r in rows]
    head = train_head(vectors, labels, senders, fit_idx, classes, head_kind="cosine",
                      views_of=lambda r: views[r])
    return head, vectors


def head_section(lines: list[str], probs: np.ndarray, rows: list[dict[str, str]],
                 sims: dict[str, np.ndarray], models: list[str]
                 ) -> HeadCheck:
    """The head vocabulary against the ImageNet bridge on the test side; returns the data of
    the first model's SQL check."""
    from service.text.sentence import get_sentence_encoder
    from service.training.service import _side

    encoder = get_sentence_encoder(load_settings()["MODEL_DIR"])
    labels = np.array([r["label"] for r in rows])
    senders = [r["sender_id"] for r in rows]
    test = np.array([_side(s) for s in senders])
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    classes = sorted(set(labels[train_idx].tolist()))
    class_vectors = encoder.encode(classes)
    queries = {q.lower(): q for q in sorted(set(labels.tolist()))}
    n = len(classes)

    # Bridge settings, on a validation split inside the training side (other senders).
    val = np.array([_side(senders[i] + "/val", 5) for i in train_idx])
    fit_idx, val_idx = train_idx[~val], train_idx[val]
    started = time.perf_counter()
    head, vectors = fit_head(models[0], rows, fit_idx, classes)
    fit_s = time.perf_counter() - started
    examples = ", ".join(f"{w} → {lab}" for w, lab in list(SYNONYMS.items())[:4])
    val_slice = head.transform(vectors[val_idx]).astype(np.float16).astype(np.float32)[:, -n:]
    lines += ["", "### The head's own classes as the vocabulary", "",
              f"Split by sender_id as `lookalike finetune` and bench/training.py split it: "
              f"train {len(train_idx)} / test {len(test_idx)} photos, {n} classes. A cosine "
              f"head (`train_head`, augmentation views) is fitted on the training side only; "
              "the 17 label queries rank the test photos only, by the inner product of the "
              "query's weights over the head's class names (MiniLM, `bridge_weights`) with the "
              "class slice of the head's embedding (mix · unit(probabilities)). **The head was "
              "trained with these very labels on other people's photos, so the queries are in "
              "its vocabulary**: this is what a user who labelled photos gets, not a zero-label "
              "figure (the ImageNet bridge above stays that). The synonyms are 20 hand-written "
              f"words that are not class names ({examples}, …).",
              "", f"Bridge settings on a validation split of the training side ({len(fit_idx)} "
              f"fit / {len(val_idx)} validation photos, other senders; head fitted in "
              f"{fit_s:.0f} s on `{models[0]}`):", "",
              "| top N | T | labels: mean P@10 | mAP | synonyms: mean P@10 | mAP |",
              "|---|---|---|---|---|---|"]
    for top, temperature in HEAD_SWEEP:
        bridge = Bridge(top, temperature)
        lab = mean_pair(head_scores(val_slice, labels[val_idx], class_vectors, queries, bridge))
        syn = mean_pair(head_scores(val_slice, labels[val_idx], class_vectors, SYNONYMS,
                                    bridge))
        mark = " (used)" if bridge == HEAD_BRIDGE else ""
        lines.append(f"| {top} | {temperature}{mark} | {lab[0]:.3f} | {lab[1]:.3f} | "
                     f"{syn[0]:.3f} | {syn[1]:.3f} |")
        print(lines[-1], flush=True)

    # The ImageNet bridge and the heads, on the test photos only.
    imagenet = {q.lower(): precision_and_ap(probs[test_idx] @ bridge_weights(sims[q]),
                                            labels[test_idx] == q) for q in queries.values()}
    per_model, check = {}, None
    for model_name in models:
        started = time.perf_counter()
        head, vectors = fit_head(model_name, rows, train_idx, classes)
        fit_s = time.perf_counter() - started
        embeddings = head.transform(vectors[test_idx]).astype(np.float16).astype(np.float32)
        per_model[model_name] = (
            head_scores(embeddings[:, -n:], labels[test_idx], class_vectors, queries),
            head_scores(embeddings[:, -n:], labels[test_idx], class_vectors, SYNONYMS),
            fit_s, head)
        if check is None:
            vocabulary = HeadVocabulary(model=f"{model_name}+head", classes=tuple(classes),
                                        vectors=class_vectors, dim=head.dim,
                                        start=head.dim - n + 1)
            check = HeadCheck(rows=test_idx, embeddings=embeddings, vocabulary=vocabulary,
                              weights={q: bridge_weights(class_vectors @ encoder.encode(
                                  [q.lower()])[0], HEAD_BRIDGE) for q in queries.values()})
    lines += ["", f"Test side ({len(test_idx)} photos of other senders), the 17 label queries, "
              f"bridge top {HEAD_BRIDGE.top}, T {HEAD_BRIDGE.temperature}:", "",
              "| label | test photos | ImageNet P@10 | AP | "
              + " | ".join(f"head `{m}` P@10 | AP" for m in models) + " |",
              "|---|---|---|---|" + "---|---|" * len(models)]
    for q, label in queries.items():
        cells = " | ".join(f"{per_model[m][0][q][0]:.2f} | {per_model[m][0][q][1]:.3f}"
                           for m in models)
        lines.append(f"| {q} | {(labels[test_idx] == label).sum()} | {imagenet[q][0]:.2f} | "
                     f"{imagenet[q][1]:.3f} | {cells} |")
        print(lines[-1], flush=True)
    p10, m_ap = mean_pair(imagenet)
    cells = " | ".join(f"**{mean_pair(per_model[m][0])[0]:.3f}** | "
                       f"**{mean_pair(per_model[m][0])[1]:.3f}**" for m in models)
    lines.append(f"| **mean** | {len(test_idx)} | **{p10:.3f}** | **{m_ap:.3f}** | {cells} |")
    print(lines[-1], flush=True)
    lines.append("")
    for m in models:
        result, synonyms, fit_s, head = per_model[m]
        failing = [q for q in queries if result[q][0] < 0.7]
        syn_failing = [w for w in SYNONYMS if synonyms[w][0] < 0.7]
        lines.append(f"- head `{m}` ({head.kind}, {head.dim - n} hidden + {n} classes, mix "
                     f"{head.mix}, fitted in {fit_s:.0f} s): labels below P@10 0.7: "
                     f"{', '.join(failing) or 'none'}; the 20 synonyms: mean P@10 "
                     f"{mean_pair(synonyms)[0]:.3f}, mAP {mean_pair(synonyms)[1]:.3f}, below "
                     f"0.7: {', '.join(syn_failing) or 'none'}.")
        print(lines[-1], flush=True)
    failing = [q for q in queries if imagenet[q][0] < 0.7]
    lines.append(f"- ImageNet bridge on the same test photos: below 0.7: "
                 f"{', '.join(failing) or 'none'}.")
    assert check is not None
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-sql", action="store_true", help="skip the PostgreSQL check")
    parser.add_argument("--no-head", action="store_true",
                        help="skip the head vocabulary (fits a few heads: minutes)")
    parser.add_argument("--head-models", default="efficientnet-lite0,efficientnet-lite2",
                        help="backbones of the heads (the first one's is checked in SQL)")
    args = parser.parse_args()
    from service.text.sentence import get_sentence_encoder

    logits, rows = clothing_logits()
    probs = softmax(logits).astype(np.float16).astype(np.float32)  # as stored in halfvec
    labels = np.array([r["label"] for r in rows])
    encoder = get_sentence_encoder(load_settings()["MODEL_DIR"])
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
    sql_lines: list[str] = []
    if not args.no_sql:
        weights = {q: bridge_weights(sims[q]) for q in queries}
        head_lines: list[str] = []
        check = None
        if not args.no_head:
            check = head_section(head_lines, probs, rows, sims, args.head_models.split(","))
        sql, head_sql = sql_check(probs, labels, weights, check)
        sql_p10 = np.mean([sql[q] for q in queries])
        agree = sum(abs(sql[q] - result[q][0]) < 1e-9 for q in queries)
        lines.append(f"Through SQL (`semantic_side`, halfvec inner product, exact scan of "
                     f"{len(rows)} rows): mean P@10 {sql_p10:.3f}, equal to numpy for "
                     f"{agree}/{len(queries)} labels, median {sql['_ms']:.1f} ms a query.")
        print(lines[-1])
        lines += head_lines
        if check is not None:
            numpy_p10 = {q: precision_and_ap(
                check.embeddings[:, check.vocabulary.start - 1:] @ check.weights[q],
                labels[check.rows] == q)[0] for q in queries}
            agree = sum(abs(head_sql[q] - numpy_p10[q]) < 1e-9 for q in queries)
            sql_lines.append(
                f"- Through SQL (`head_side`: `subvector(vector, {check.vocabulary.start}, "
                f"{check.vocabulary.count}) <#> :weights` over the `{check.vocabulary.dim}`-d "
                f"head vectors of the {len(check.rows)} test photos, exact scan): mean P@10 "
                f"{np.mean([head_sql[q] for q in queries]):.3f} (numpy above: "
                f"{np.mean(list(numpy_p10.values())):.3f}, equal P@10 for {agree}/"
                f"{len(queries)} labels; the same top 10 ids as numpy with float16 weights and "
                f"ties by id, as SQL orders them, for {head_sql['_same_top10']:.0f}/"
                f"{len(queries)}), median {head_sql['_ms']:.1f} ms a query.")
            print(sql_lines[-1])
    elif not args.no_head:
        head_section(lines, probs, rows, sims, args.head_models.split(","))
    lines += sql_lines
    append_results("Text search: the label bridge on the clothing set (ImageNet, and a head's "
                   "classes)", "\n".join(lines))


if __name__ == "__main__":
    main()
