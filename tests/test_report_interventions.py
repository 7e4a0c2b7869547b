"""Ablation and adversarial noise in the model report and on the summary page, from synthetic
tables in their schemas (tables.SCHEMAS["ablation" | "adversarial" | "adversarial_concepts"])."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from test_report_html import LAYER, Page, png, prepared, report  # noqa: F401

from cnnvis_pipeline.reports.html import build_model_report, build_summary_page
from cnnvis_pipeline.tables import SCHEMAS


def table(name: str, rows: list[dict], path) -> None:
    schema = SCHEMAS[name]
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    pq.write_table(pa.table(cols, schema=schema), path)


def ablation_rows() -> list[dict]:
    """Classes `disc` and `box`; units 0-2 ranked per class; one concept group."""
    rows = []
    for cls, changes, related in (("disc", [-0.30, -0.05, 0.01], [True, False, False]),
                                  ("box", [-0.20, -0.10, 0.00], [False, False, False])):
        for rank, (u, ch, rel) in enumerate(zip((0, 1, 2), changes, related, strict=True), 1):
            rows.append({"model": "tiny", "layer": LAYER, "group": f"unit {u}", "kind": "unit",
                         "unit": u, "units": str(u), "concept": "disc", "category": "object",
                         "detector": u == 0, "class": cls, "class_index": 0, "images": 4,
                         "metric": "accuracy", "before": 0.9, "after": 0.9 + ch, "change": ch,
                         "change_low": ch - 0.05, "change_high": ch + 0.05, "rank": rank,
                         "related": rel})
    rows.append({"model": "tiny", "layer": LAYER, "group": "disc (object) top 2",
                 "kind": "concept", "unit": None, "units": "0,1", "concept": "disc",
                 "category": "object", "detector": True, "class": "disc", "class_index": 0,
                 "images": 4, "metric": "accuracy", "before": 0.9, "after": 0.4, "change": -0.5,
                 "change_low": -0.6, "change_high": -0.4, "rank": None, "related": True})
    return rows


def adversarial_rows() -> list[dict]:
    rows = []
    for attack in ("fgsm", "pgd"):
        for u, (clean, hit) in enumerate(((0.2, 0.01), (0.05, 0.06), (0.0, 0.0), (0.01, 0.02))):
            rows.append({"model": "tiny", "layer": LAYER, "attack": attack, "eps": 0.01,
                         "steps": 1 if attack == "fgsm" else 5, "unit": u, "concept": "disc",
                         "category": "object", "detector": u in (0, 1),
                         "activation_clean": 1.0, "activation_attacked": 0.5,
                         "activation_change": -0.5, "iou_clean": clean, "iou_attacked": hit,
                         "iou_change": hit - clean, "detector_attacked": u == 1,
                         "flip_rate": 0.25 if attack == "fgsm" else 0.75})
    return rows


def with_interventions(tmp_path, prepared):  # noqa: F811
    _, _, out = report(tmp_path, prepared, extras=True)
    d = tmp_path / "results" / "tiny" / LAYER
    table("ablation", ablation_rows(), d / "ablation.parquet")
    table("adversarial", adversarial_rows(), d / "adversarial.parquet")
    table("adversarial_concepts", [
        {"model": "tiny", "layer": LAYER, "attack": a, "eps": 0.01, "steps": s, "concept": "disc",
         "category": "object", "detectors": 2, "detectors_lost": 1}
        for a, s in (("fgsm", 1), ("pgd", 5))], d / "adversarial_concepts.parquet")
    png(d / "ablation.png", 30, 20)
    png(d / "adversarial.png", 30, 20)
    build_model_report("tiny", {LAYER: d}, out, top_images=3, prepared=prepared)
    return out, d


def test_the_report_shows_ablation_and_adversarial_noise(tmp_path, prepared):  # noqa: F811
    out, _ = with_interventions(tmp_path, prepared)
    text = out.read_text()
    page = Page(text)
    words = page.all_text()
    assert ("For 1 of 2 classes the single most harmful unit (zeroed alone) detects a concept "
            "related to the class.") in words
    rows = {m.group(1): " ".join(re.sub(r"<[^>]+>", " ", m.group(2)).split()) for m in re.finditer(
        r'<tr><td class="l">(\w+)</td><td class="l">(.*?)</td></tr>', text)}
    assert rows["disc"] == ("0 disc -0.300 [-0.350, -0.250] (related) ; 1 disc -0.050 "
                            "[-0.100, 0.000] ; 2 disc 0.010 [-0.040, 0.060]")
    assert rows["box"].startswith("0 disc -0.200 [-0.250, -0.150] ; 1 disc -0.100")
    assert "disc (object) top 2 on disc -0.500 [-0.600, -0.400]" in words
    assert ("fgsm (eps 0.01, 1 steps): predictions flipped on 25% of the images; 1 of 2 "
            "detectors stop detecting their label; concepts losing the most: disc (1/2).") in words
    assert "pgd (eps 0.01, 5 steps): predictions flipped on 75% of the images" in words
    # the cards: the classes a unit matters for, its IoU clean and attacked
    assert ("ablation hurts: disc (-0.300 [-0.350, -0.250]), box (-0.200 [-0.250, -0.150])"
            in page.card(0))
    assert ("IoU clean → attacked: fgsm 0.200 → 0.010 stops detecting, pgd 0.200 → 0.010 "
            "stops detecting") in page.card(0)
    assert "stops detecting" not in page.card(1)
    for name in ("ablation", "adversarial", "adversarial_concepts"):
        assert f"../{LAYER}/{name}.parquet" in page.hrefs
    assert 'alt="features.relu4: classes hurt most by one unit"' in text


def test_without_interventions_nothing_is_said(tmp_path, prepared):  # noqa: F811
    text, page, _ = report(tmp_path, prepared, extras=True)
    assert "Ablation" not in text and "Adversarial noise" not in text
    assert "ablation hurts" not in page.all_text()


def test_the_summary_compares_the_models_interventions(tmp_path, prepared):  # noqa: F811
    out, d = with_interventions(tmp_path, prepared)
    s = tmp_path / "results" / "summary"
    s.mkdir(parents=True)
    pq.write_table(pa.table({"model": ["tiny"], "layer": [LAYER], "category": ["object"],
                             "units": np.array([4], np.int32), "detectors": np.array([1], np.int32),
                             "unique_detectors": np.array([1], np.int32)}),
                   s / "detectors.parquet")
    png(s / "unique_detectors.png", 30, 20)
    page = build_summary_page({"tiny": out}, s / "detectors.parquet", s / "unique_detectors.png",
                              s / "index.html", prepared=prepared, units=[d / "units.parquet"])
    words = Page(page.read_text()).all_text()
    assert ("tiny features.relu4 ablation: mean largest drop -0.250 (accuracy), most harmful "
            "unit related for 1 of 2 classes; fgsm: flip rate 25%, detectors lost 1/2; pgd: "
            "flip rate 75%, detectors lost 1/2") in words
