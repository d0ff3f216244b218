"""The report survives hostile labels and many classes (no services: a hand-made Evaluation)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from service.evaluation.metrics import RetrievalScores
from service.evaluation.report import MAX_BARS, write_report
from service.evaluation.service import Evaluation, QueryOutcome


def evaluation(classes: list[str], collection: str = "shop") -> Evaluation:
    scores = RetrievalScores(mean_ap=0.5, precision={10: 0.4}, recall={10: 0.2}, queries=9)
    worst = [QueryOutcome(image_id="00000000-0000-0000-0000-000000000001", label=classes[0],
                          ap=0.1)]
    return Evaluation(collection=collection, model="m", label_key="label", images=9,
                      classes=len(classes), service=scores, exact=scores,
                      per_class_ap={c: i / len(classes) for i, c in enumerate(classes)},
                      pr_curve=[(0.0, 1.0), (1.0, 0.3)], worst=worst)


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def test_labels_are_text_not_math_or_markup(tmp_path: Path) -> None:
    # An unbalanced "$\frac" made matplotlib's math parser raise, and the whole report with it.
    hostile = ["<script>alert(1)</script>", "$\\frac{a}{$", "x" * 5000]
    write_report(evaluation(hostile, collection="we$ird<b>"), tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert "we$ird&lt;b&gt;" in page
    assert png_width(tmp_path / "per_class_ap.png") < 2000


def test_many_classes_chart_the_weakest_and_keep_every_ap(tmp_path: Path) -> None:
    classes = [f"class-{i:04d}" for i in range(3000)]
    write_report(evaluation(classes), tmp_path)
    assert png_width(tmp_path / "per_class_ap.png") < 0.45 * MAX_BARS * 120 + 400
    assert len(json.loads((tmp_path / "report.json").read_text())["per_class_ap"]) == 3000
