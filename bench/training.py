"""Retrieval heads on the shared clothing set, split by sender_id (no person on both sides).

Reports test-split mAP and P@10, per backbone, for raw pooled features, PCA whitening at a few
shrinkages, the linear softmax head and the cosine-classifier MLP head, with and without the
augmentation views, with the backbone's last conv, last block or top blocks re-trained too, on all
training images and with 5, 10 and 20 shots per class. Every head is fitted by
`service.training.service.train_head`, which `lookalike finetune` runs; the hyperparameters
were chosen on the validation split inside the training side, never on test.

    python -m bench.training [--models efficientnet-lite0,efficientnet-lite2] [--shots-only]
                             [--tune-only] [--depths last-conv,last-block,top]
                             [--tail-lr 2e-4,6e-4] [--shots 5,10,20]
                             [--beyond] [--ensemble] [--positions 0.5]

A quick configuration (lite0 only, no shots, the head-only heads and the re-trained last conv;
about 10 minutes on 2 cores once the features are cached):

    python -m bench.training --models efficientnet-lite0 --shots "" --depths last-conv
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from bench.harness import (
    BENCH_DIR,
    CLOTHING,
    append_results,
    clothing_embeddings,
    clothing_labels,
)
from service.evaluation.metrics import exact_cosine_scores
from service.training import cosine
from service.training.augment import VIEWS, embed_views
from service.training.heads import fit_pca_whitening
from service.training.service import _side, pick_shots, train_head
from service.training.tails import DEPTHS, TAIL_LR, TOP, TOP_SCHEDULE, GraphTail

SHOTS = (5, 10, 20)
SEEDS = 3  # draws of the shots (and seeds of the head) averaged


def cached(name: str, rows: list[dict[str, str]], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """var/bench/clothing-<name>.npy if it covers every photo, else computed, timed and saved."""
    path = BENCH_DIR / f"clothing-{name}.npy"
    if path.exists() and len(np.load(path, mmap_mode="r")) == len(rows):
        return np.load(path)
    started = time.perf_counter()
    values = compute()
    print(f"{name} of {len(rows)} photos in {time.perf_counter() - started:.0f}s")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    np.save(path, values)
    return values


def clothing_views(model_name: str, rows: list[dict[str, str]]) -> np.ndarray:
    """Backbone features of every photo's augmentation views (cached, half precision as the
    stored vectors)."""
    from service.config import load_settings
    from service.embedding.session import get_embedder

    def compute() -> np.ndarray:
        embedder = get_embedder(load_settings()["MODEL_DIR"], model_name)
        return embed_views(((CLOTHING / r["file"]).read_bytes() for r in rows),
                           lambda b: embedder.run(b).vectors, embedder.info.preprocessing,
                           max_pixels=10**8).astype(np.float16)

    return cached(f"views-{model_name}", rows, compute).astype(np.float32)


def clothing_maps(model_name: str, rows: list[dict[str, str]], depth: str,
                  at: str | None = None) -> tuple[np.ndarray, np.ndarray, GraphTail]:
    """Input maps of the backbone's tail, of every photo (N, C, H, W) and of its views
    (N, views, C·H·W), cached as float16; and the pretrained tail. With `at`, the backbone
    sees that model's input, resized inside its graph (as in a joined model)."""
    import onnx

    from service.config import load_settings
    from service.embedding import registry
    from service.training.joined import resized_input
    from service.training.maps import MapRunner, centre_maps

    model_dir = Path(load_settings()["MODEL_DIR"])
    info = registry.verify(model_dir, model_name)
    prep = registry.verify(model_dir, at).preprocessing if at else info.preprocessing
    backbone = resized_input(onnx.load_model(registry.model_path(model_dir, model_name) /
                                             "model.onnx"), info.input_name, prep.size,
                             info.input_size)
    runner = MapRunner(backbone, info.input_name, info.outputs[0], depth)

    def photos() -> Iterator[bytes]:
        return ((CLOTHING / r["file"]).read_bytes() for r in rows)

    name = f"{depth}-maps-{model_name}" + (f"-at-{at}" if at and at != model_name else "")
    maps = cached(name, rows, lambda: centre_maps(photos(), runner, prep, max_pixels=10**8))
    views = cached(name.replace("-maps-", "-views-"), rows, lambda: embed_views(
        photos(), runner.run, prep, max_pixels=10**8))
    return maps, views, runner.tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet-lite0,efficientnet-lite2")
    parser.add_argument("--shots-only", action="store_true",
                        help="Skip the heads on all training images.")
    parser.add_argument("--tune-only", action="store_true",
                        help="Only raw features and the heads that re-train the backbone's "
                             "last layers (--depths).")
    parser.add_argument("--depths", default=",".join(DEPTHS),
                        help="Which tails --tune-only re-trains (also: top).")
    parser.add_argument("--tail-lr", default="",
                        help="Learning rates of the re-trained layers to compare "
                             "(comma-separated; default: TAIL_LR of each depth).")
    parser.add_argument("--layer-scaled", action="store_true",
                        help="Scale the top blocks' learning rate per weight by its RMS.")
    parser.add_argument("--tail-warmup", type=float, default=None,
                        help="Epochs over which the top blocks' learning rate ramps up "
                             "(default: TOP_SCHEDULE's).")
    parser.add_argument("--positions", type=float, default=None,
                        help="Share of the map's positions a pointwise tail sees per batch "
                             "(default: cosine.POSITIONS).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the heads fitted on all training images.")
    parser.add_argument("--shots", default=",".join(map(str, SHOTS)),
                        help="Shots per class to report (comma-separated; empty: none).")
    parser.add_argument("--beyond", action="store_true",
                        help="Only the options beyond one backbone's head (mirrored queries, "
                             "query expansion, two backbones, ensembles).")
    parser.add_argument("--ensemble", action="store_true",
                        help="Only the two backbones' re-trained-conv heads, concatenated.")
    parser.add_argument("--joined", action="store_true",
                        help="Only `finetune --from efficientnet-lite0,efficientnet-lite2` "
                             "(lite0 at lite2's input) with shots, with and without AQE.")
    parser.add_argument("--draws", type=int, default=SEEDS,
                        help="Draws of the shots that --joined averages.")
    args = parser.parse_args()
    if args.joined:
        append_results("Retrieval heads: lite0 and lite2 joined, with shots",
                       joined(tuple(int(v) for v in args.shots.split(",") if v), args.draws))
        return
    if args.ensemble:
        append_results("Retrieval heads: two backbones with re-trained last convs",
                       tuned_ensemble())
        return
    if args.beyond:
        append_results("Retrieval heads: options beyond one backbone's head", beyond())
        return
    lines = ["Split by sender_id (one sender in three on the test side); exact cosine over the "
             "test split, each test image a query. Heads are fitted on the training side "
             "(early stopping, epochs and the embedding's mix chosen on a validation split of "
             "other senders inside it; with shots there is no validation). `aug`: "
             f"{len(VIEWS)} extra views of each fitted image ({', '.join(VIEWS)}).", "",
             "| backbone | features | dim | test mAP | test P@10 | fit s |",
             "|---|---|---|---|---|---|"]
    TOP_SCHEDULE["layer_scaled"] = args.layer_scaled
    if args.positions is not None:
        cosine.POSITIONS = args.positions  # read by fit_cosine_head when none is passed
    if args.tail_warmup is not None:
        TOP_SCHEDULE["tail_warmup"] = args.tail_warmup
    for model_name in args.models.split(","):
        bench_model(model_name, lines, shots_only=args.shots_only, tune_only=args.tune_only,
                    depths=tuple(args.depths.split(",")),
                    shots=tuple(int(v) for v in args.shots.split(",") if v),
                    tail_lrs=tuple(float(v) for v in args.tail_lr.split(",") if v),
                    seed=args.seed)
    append_results("Retrieval heads on the clothing set", "\n".join(lines))


def sender_split(rows: list[dict[str, str]]) -> tuple[
        np.ndarray, list[str], np.ndarray, np.ndarray, list[str], list[str]]:
    """Labels, senders, train and test rows (split by sender as `finetune` splits), classes
    of the training side, and the test rows' labels."""
    labels = np.array([r["label"] for r in rows])
    senders = [r["sender_id"] for r in rows]
    test = np.array([_side(s) for s in senders])
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    classes = sorted(set(labels[train_idx].tolist()))
    return labels, senders, train_idx, test_idx, classes, labels[test_idx].tolist()


def bench_model(model_name: str, lines: list[str], *, shots_only: bool,
                tune_only: bool = False, depths: tuple[str, ...] = DEPTHS,
                shots: tuple[int, ...] = SHOTS, tail_lrs: tuple[float, ...] = (),
                seed: int = 0) -> None:
    """Append one backbone's rows to the table."""
    vectors, rows = clothing_embeddings(model_name)
    vectors = vectors.astype(np.float16).astype(np.float32)  # as stored in halfvec
    views = clothing_views(model_name, rows)
    labels, senders, train_idx, test_idx, classes, test_labels = sender_split(rows)
    if not lines[0].startswith("Train"):
        lines.insert(0, f"Train {len(train_idx)} / test {len(test_idx)} images, "
                        f"{len(classes)} classes.")

    validation: list[float] = []  # the best validation mAP of the last tail fitted
    epoch_ends: list[float] = []  # when each epoch of the last head fitted ended

    def row(name: str, fit: Callable[[], np.ndarray]) -> None:
        started = time.perf_counter()
        validation.clear()
        epoch_ends[:] = [started]
        feats = fit()
        seconds = time.perf_counter() - started
        s = exact_cosine_scores(feats, test_labels, ks=(10,))
        if validation:
            name += f" (validation mAP {validation[0]:.3f})"
        if len(epoch_ends) > 2:  # the first epoch also pays for the setup: left out
            name += f", {np.mean(np.diff(epoch_ends[1:])):.2f} s/epoch"
        lines.append(f"| {model_name} | {name} | {feats.shape[1]} | {s.mean_ap:.3f} | "
                     f"{s.precision[10]:.3f} | {seconds:.1f} |")
        print(lines[-1], flush=True)

    tuned: tuple[np.ndarray, np.ndarray, GraphTail] | None = None

    def epoch_ended(stage: str, done: int, total: int) -> None:
        # Validation mAP is computed after each epoch, inside its time (as in finetune).
        epoch_ends.append(time.perf_counter())

    def head(kind: str, augment: bool, shots: int | None = None, seed: int = 0) -> np.ndarray:
        fit_idx = pick_shots(labels, train_idx, classes, shots, seed) if shots else train_idx
        if kind == "cosine+tail":  # the backbone's tail re-trained too, from its input maps
            assert tuned is not None
            maps, map_views, tail = tuned
            fitted = train_head(maps, labels, senders, fit_idx, classes, validate=not shots,
                                views_of=lambda r: map_views[r], seed=seed, tail=tail,
                                progress=epoch_ended)
            if fitted.record["history"]:
                curve = [round(h["val_map"], 4) for h in fitted.record["history"]]
                print(f"validation mAP by epoch: {curve}", flush=True)
                validation.append(max(curve))
            return fitted.transform_maps(maps[test_idx])
        fitted = train_head(vectors, labels, senders, fit_idx, classes, validate=not shots,
                            head_kind=kind, views_of=(lambda r: views[r]) if augment else None,
                            seed=seed, progress=epoch_ended)
        return fitted.transform(vectors[test_idx])

    def shots_row(name: str, kind: str, augment: bool, shots: int) -> None:
        # Which images are the shots moves mAP by about 0.02: average over draws.
        started = time.perf_counter()
        feats = [head(kind, augment, shots, seed) for seed in range(SEEDS)]
        seconds = (time.perf_counter() - started) / SEEDS
        scores = [exact_cosine_scores(f, test_labels, ks=(10,)) for f in feats]
        maps = [s.mean_ap for s in scores]
        lines.append(f"| {model_name} | {name}, {shots} shots per class (mean of {SEEDS} draws, "
                     f"mAP {min(maps):.3f}–{max(maps):.3f}) | {feats[0].shape[1]} | "
                     f"{np.mean(maps):.3f} | {np.mean([s.precision[10] for s in scores]):.3f} | "
                     f"{seconds:.1f} |")
        print(lines[-1], flush=True)

    seeded = f", seed {seed}" if seed else ""
    row("raw pooled", lambda: vectors[test_idx])
    if not shots_only and not tune_only:
        for power in (1.0, 0.5):
            for shrink in (0.0, 0.5, 1.0):
                row(f"PCA-whitening 256, power {power}, shrinkage {shrink}",
                    lambda p=power, s=shrink: fit_pca_whitening(
                        vectors[train_idx], dim=256, shrinkage=s, power=p
                    ).transform(vectors[test_idx]))
    for kind, augment in () if tune_only else (("linear", False), ("linear", True),
                                               ("cosine", False), ("cosine", True)):
        name = f"{kind} head{' + aug' if augment else ''}"
        if not shots_only:
            row(f"{name}, all training images{seeded}",
                lambda k=kind, a=augment: head(k, a, seed=seed))
        for count in shots:
            shots_row(name, kind, augment, count)
    for depth in depths:
        tuned = clothing_maps(model_name, rows, depth)
        default = TAIL_LR[depth]
        for lr in tail_lrs or (default,):
            TAIL_LR[depth] = lr  # read by fit_cosine_head when no tail_lr is passed
            name = f"cosine head + aug + re-trained {depth.replace('-', ' ')}" + (
                f", lr {lr:g}" if tail_lrs else "") + (top_options() if depth == TOP else "") + (
                f", positions {cosine.POSITIONS:g}" if cosine.POSITIONS != 0.5
                and depth == "last-conv" else "")
            if not shots_only:
                row(f"{name}, all training images{seeded}",
                    lambda: head("cosine+tail", True, seed=seed))
            for count in shots:
                shots_row(name, "cosine+tail", True, count)
        TAIL_LR[depth] = default


def top_options() -> str:
    """The TOP_SCHEDULE options that differ from the plain schedule, for a row's name."""
    scaled = ", layer-scaled" if TOP_SCHEDULE.get("layer_scaled") else ""
    warmup = TOP_SCHEDULE.get("tail_warmup", 0)
    return scaled + (f", warm-up {warmup:g} epochs" if warmup else "")


def beyond() -> str:
    """Options that cost more at search or index time, for the P@10 and 10-shot targets."""
    v0, rows = clothing_embeddings("efficientnet-lite0")
    v2, _ = clothing_embeddings("efficientnet-lite2")
    w0, w2 = clothing_views("efficientnet-lite0", rows), clothing_views("efficientnet-lite2", rows)
    labels, senders, train_idx, test_idx, classes, test_labels = sender_split(rows)
    flip = VIEWS.index("centre-flip")
    both = np.concatenate([v0, v2], axis=1).astype(np.float16).astype(np.float32)
    both_views = np.concatenate([w0, w2], axis=2)
    single = v2.astype(np.float16).astype(np.float32)
    lines = ["Test split as above; cosine head + aug unless said; `mirrored`: the embedding of "
             "the photo plus that of its mirror image (unit vectors summed: a second backbone "
             "pass per image and per query); `AQE`: α-query expansion (the query replaced by "
             "its top k neighbours weighted by similarity³); `lite0 ⊕ lite2`: both backbones' "
             "pooled features concatenated before the head (both run per image).", "",
             "| option | test mAP | test P@10 | top-1 accuracy |", "|---|---|---|---|"]

    add = partial(option_row, lines, test_labels)

    def fitted(x: np.ndarray, xv: np.ndarray, seed: int, fit: np.ndarray = train_idx,
               shots: bool = False) -> tuple[np.ndarray, np.ndarray]:
        h = train_head(x, labels, senders, fit, classes, validate=not shots,
                       views_of=lambda r: xv[r], seed=seed)
        return h.transform(x[test_idx]), h.transform(xv[test_idx, flip])

    plain, mirror = fitted(single, w2, 0)
    add("lite2, cosine + aug, frozen conv", plain, top1(plain, classes, test_labels))
    mirrored = _unit(plain) + _unit(mirror)
    add("lite2, mirrored", mirrored)
    sims = _unit(mirrored) @ _unit(mirrored).T
    top = np.argsort(-sims, axis=1)[:, :4]  # itself and its 3 nearest
    weights = np.take_along_axis(sims, top, axis=1).clip(0) ** 3
    add("lite2, mirrored + AQE k=3", (weights[:, :, None] * _unit(mirrored)[top]).sum(axis=1))
    ensemble = []
    for seed in range(SEEDS):
        f, fm = fitted(both, both_views, seed)
        if seed == 0:
            add("lite0 ⊕ lite2", f)
        ensemble.append(_unit(f) + _unit(fm))
        add(f"lite0 ⊕ lite2, mirrored, {seed + 1} head{'s' if seed else ''} concatenated",
            np.concatenate(ensemble, axis=1))
    for name, x, xv in (("lite2", single, w2), ("lite0 ⊕ lite2", both, both_views)):
        maps = [exact_cosine_scores(fitted(x, xv, seed, pick_shots(
            labels, train_idx, classes, 10, seed), shots=True)[0], test_labels, ks=(10,)).mean_ap
            for seed in range(SEEDS)]
        lines.append(f"| {name}, 10 shots (mean of {SEEDS} draws) | {np.mean(maps):.3f} | | |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def tuned_ensemble() -> str:
    """lite0's and lite2's heads with re-trained last convs, each alone and concatenated."""
    rows = clothing_labels()
    labels, senders, train_idx, test_idx, classes, test_labels = sender_split(rows)
    flip = VIEWS.index("centre-flip")
    lines = ["Test split as above; each backbone's default head (cosine + aug + re-trained "
             "last conv); `concatenated`: both unit embeddings side by side (both backbones "
             "run per image); `mirrored`: plus the embedding of the mirror image.", "",
             "| option | test mAP | test P@10 | top-1 accuracy |", "|---|---|---|---|"]

    add = partial(option_row, lines, test_labels)

    embeddings = []
    for model_name in ("efficientnet-lite0", "efficientnet-lite2"):
        maps, views, tail = clothing_maps(model_name, rows, "last-conv")
        head = train_head(maps, labels, senders, train_idx, classes,
                          views_of=lambda r, v=views: v[r], tail=tail)
        plain = _unit(head.transform_maps(maps[test_idx]))
        mirror = _unit(head.transform_maps(
            np.asarray(views[test_idx, flip]).reshape(len(test_idx), *maps.shape[1:])))
        embeddings.append((plain, mirror))
        add(model_name, plain, top1(plain, classes, test_labels))
        add(f"{model_name}, mirrored", plain + mirror)
    (a, am), (b, bm) = embeddings
    add("lite0 ⊕ lite2 concatenated", np.concatenate([a, b], axis=1))
    add("lite0 ⊕ lite2 concatenated, mirrored", np.concatenate([a + am, b + bm], axis=1))
    return "\n".join(lines)


def joined(shots: tuple[int, ...], draws: int = SEEDS) -> str:
    """What `finetune --from efficientnet-lite0,efficientnet-lite2 --shots n` fits: a head on
    each backbone (re-trained last conv, aug) on the same shots, lite0 fed lite2's crop
    resized in its graph; unit embeddings side by side; scored plain and with search's AQE."""
    from service.evaluation.metrics import RankingAccumulator
    from service.graph.reranking import AQE_ALPHA, AQE_NEIGHBOURS, expanded_order

    rows = clothing_labels()
    labels, senders, train_idx, test_idx, classes, test_labels = sender_split(rows)
    branches = {"lite0": clothing_maps("efficientnet-lite0", rows, "last-conv",
                                       at="efficientnet-lite2"),
                "lite2": clothing_maps("efficientnet-lite2", rows, "last-conv")}
    lines = ["Test split as above; each head: cosine + aug + re-trained last conv on the "
             "same shots; `joined`: both unit embeddings side by side (what `finetune --from "
             "efficientnet-lite0,efficientnet-lite2` installs; lite0 sees lite2's 260-pixel "
             f"crop resized to 224 in its graph); `+ AQE`: α-query expansion as search's and "
             f"eval's `rerank aqe` ({AQE_NEIGHBOURS} neighbours, α = {AQE_ALPHA:g}), exact. "
             f"Mean of {draws} draws of the shots (min–max of mAP).", "",
             "| shots | embedding | test mAP | test P@10 | + AQE mAP | + AQE P@10 |",
             "|---|---|---|---|---|---|"]

    def aqe_scores(feats: np.ndarray) -> tuple[float, float]:
        # Queries expanded, the database as it is: each expanded query ranks the others.
        unit, label_arr = _unit(feats), np.asarray(test_labels)
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        acc = RankingAccumulator((10,))
        for i, row in enumerate(sims):
            order = expanded_order(unit, i, np.argsort(-row, kind="stable")[:-1])
            acc.add(label_arr[order] == label_arr[i], int((label_arr == label_arr[i]).sum()) - 1)
        s = acc.scores()
        return s.mean_ap, s.precision[10]

    for count in shots:
        figures: dict[str, list[tuple[float, float, float, float]]] = {}
        for seed in range(draws):
            fit_idx = pick_shots(labels, train_idx, classes, count, seed)
            parts = {}
            for name, (maps, views, tail) in branches.items():
                head = train_head(maps, labels, senders, fit_idx, classes, validate=False,
                                  views_of=lambda r, v=views: v[r], seed=seed, tail=tail)
                parts[name] = _unit(head.transform_maps(maps[test_idx]))
            parts["joined"] = np.concatenate([parts["lite0"], parts["lite2"]], axis=1)
            for name, feats in parts.items():
                plain = exact_cosine_scores(feats, test_labels, ks=(10,))
                figures.setdefault(name, []).append(
                    (plain.mean_ap, plain.precision[10], *aqe_scores(feats)))
        for name, values in figures.items():
            v = np.array(values)
            lines.append(f"| {count} | {name} | {v[:, 0].mean():.3f} ({v[:, 0].min():.3f}–"
                         f"{v[:, 0].max():.3f}) | {v[:, 1].mean():.3f} | {v[:, 2].mean():.3f} "
                         f"({v[:, 2].min():.3f}–{v[:, 2].max():.3f}) | {v[:, 3].mean():.3f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def option_row(lines: list[str], test_labels: list[str], name: str, feats: np.ndarray,
               accuracy: str = "") -> None:
    """Append (and print) a row of test mAP, P@10 and top-1 accuracy."""
    s = exact_cosine_scores(feats, test_labels, ks=(10,))
    lines.append(f"| {name} | {s.mean_ap:.3f} | {s.precision[10]:.3f} | {accuracy} |")
    print(lines[-1], flush=True)


def top1(feats: np.ndarray, classes: list[str], test_labels: list[str]) -> str:
    """Top-1 accuracy of a head's class probabilities (the embedding's last columns)."""
    predicted = np.array(classes)[feats[:, -len(classes):].argmax(axis=1)]
    return f"{np.mean(predicted == np.array(test_labels)):.3f}"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


if __name__ == "__main__":
    main()
