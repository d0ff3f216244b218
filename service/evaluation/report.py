"""Evaluation report: report.json, a precision-recall curve, per-class AP, and an HTML page."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render straight to files

import matplotlib.pyplot as plt  # noqa: E402

from service.evaluation.service import Evaluation  # noqa: E402

# Bars in the per-class chart; report.json keeps every class's AP.
MAX_BARS = 40


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def write_report(evaluation: Evaluation, folder: Path,
                 thumbnails: dict[str, bytes] | None = None) -> Path:
    """Write the report files into `folder`; returns the HTML page's path."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()
    (folder / "report.json").write_text(json.dumps(summary, indent=2))

    fig, ax = plt.subplots(figsize=(5, 4))
    recall, precision = zip(*evaluation.pr_curve, strict=True)
    ax.plot(recall, precision, marker="o")
    ax.set(xlabel="recall", ylabel="interpolated precision", xlim=(0, 1), ylim=(0, 1.02))
    # Names and labels are user text: never parsed as matplotlib's math ($...$).
    ax.set_title(_short(f"{evaluation.model} on {evaluation.collection}", 60), parse_math=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "pr_curve.png", dpi=120)
    plt.close(fig)

    ap = evaluation.per_class_ap
    classes = sorted(ap, key=lambda c: (ap[c], c))[:MAX_BARS]  # the weakest, when many
    title = ("Average precision per class" if len(ap) <= MAX_BARS else
             f"Average precision: the {MAX_BARS} lowest of {len(ap)} classes")
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(classes) + 2), 4))
    ax.bar(range(len(classes)), [ap[c] for c in classes], color="#4c72b0")
    ax.set_xticks(range(len(classes)), [_short(c, 30) for c in classes], rotation=60,
                  ha="right", parse_math=False)
    ax.set(ylabel="AP (exact)", ylim=(0, 1), title=title)
    fig.tight_layout()
    fig.savefig(folder / "per_class_ap.png", dpi=120)
    plt.close(fig)

    page = folder / "index.html"
    page.write_text(_html(evaluation, summary, thumbnails or {}))
    return page


def _img(image_id: str, thumbnails: dict[str, bytes], label: str) -> str:
    data = thumbnails.get(image_id)
    alt = html.escape(f"{label} ({image_id})")
    if data is None:
        return f"<figure><div class='missing'>{alt}</div></figure>"
    src = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    return (f"<figure><img src='{src}' alt='{alt}' width='96'>"
            f"<figcaption>{html.escape(label)}</figcaption></figure>")


def _html(evaluation: Evaluation, summary: dict, thumbnails: dict[str, bytes]) -> str:
    ks = sorted(evaluation.service.precision)
    rows = "".join(
        f"<tr><th>{name}</th><td>{s.mean_ap:.3f}</td>"
        + "".join(f"<td>{s.precision[k]:.3f}</td><td>{s.recall[k]:.3f}</td>" for k in ks)
        + "</tr>"
        for name, s in (("service (SQL + HNSW)", evaluation.service),
                        ("exact brute force", evaluation.exact)))
    head = "".join(f"<th>P@{k}</th><th>R@{k}</th>" for k in ks)
    worst = "".join(
        f"<section><h3>{html.escape(q.label)} — AP {q.ap:.3f}</h3><div class='row'>"
        + _img(q.image_id, thumbnails, "query: " + q.label)
        + "".join(_img(r["id"], thumbnails, r["label"]) for r in q.top)
        + "</div></section>"
        for q in evaluation.worst)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Lookalike evaluation: {html.escape(evaluation.collection)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .3rem .6rem; }}
.row {{ display: flex; gap: .5rem; flex-wrap: wrap; }} figure {{ margin: 0; font-size: .8rem; }}
.missing {{ width: 96px; height: 96px; background: #eee; }}
</style></head><body>
<h1>Retrieval quality: {html.escape(evaluation.collection)}</h1>
<p>Model <code>{html.escape(evaluation.model)}</code>, label key
<code>{html.escape(evaluation.label_key)}</code>, {evaluation.images} images,
{evaluation.classes} classes, {evaluation.service.queries} queries. AP over the full ranking of
every other image (the query excluded); mAP is the mean over queries.
mAP gap (exact − service): {summary['map_gap']:+.4f}.</p>
<table><tr><th></th><th>mAP</th>{head}</tr>{rows}</table>
<h2>Precision-recall</h2><img src="pr_curve.png" alt="precision-recall curve">
<h2>Per-class AP</h2><img src="per_class_ap.png" alt="average precision per class">
<h2>Worst queries</h2>{worst}
</body></html>
"""
