"""Benchmark bookkeeping: summaries over seeds, gap closure, the Markdown table."""

import pytest

from sim2obs.benchmark import PROTOCOL, _closure, _summarise, results_markdown


def _run(nmad, auc):
    sc = {lab: {"nmad": nmad, "bias": 0.01, "r2": 0.8, "coverage_68": 0.68} for lab in PROTOCOL["labels"]}
    cov = {lab: {"coverage_68": 0.7, "coverage_95": 0.95} for lab in PROTOCOL["labels"]}
    return {"scores": sc, "source_coverage": cov, "gap_after": {"c2st_auc": auc, "sinkhorn": 0.1}, "gap": {"c2st_auc": 0.8, "sinkhorn": 1.0}}


def test_summary_closure_and_table():
    runs = {"none": [_run(0.30, 0.8), _run(0.32, 0.8)], "sinkhorn": [_run(0.25, 0.55), _run(0.27, 0.57)],
            "oracle": [_run(0.20, 0.8), _run(0.22, 0.8)]}
    s = _summarise(runs, PROTOCOL["labels"])
    assert s["none"]["log_mstar.nmad"]["mean"] == pytest.approx(0.31)
    assert s["none"]["log_mstar.nmad"]["std"] == pytest.approx(0.01)
    c = _closure(s)
    assert c["sinkhorn"] == pytest.approx(0.5)
    r = {"protocol": PROTOCOL, "seeds": 2, "summary": s, "closure": c,
         "gap_before": {"c2st_auc": {"mean": 0.8, "std": 0.0}, "sinkhorn": {"mean": 1.0, "std": 0.0}},
         "label_efficiency": {"pretrained": {"10": 0.4, "100": 0.3}, "scratch": {"10": 0.5, "100": 0.35}},
         "references": ["x"], "seconds": 60}
    md = results_markdown(r)
    assert "| sinkhorn | 0.260 ± 0.010" in md and "+50%" in md and "| scratch | 0.500 | 0.350 |" in md
    assert s["sinkhorn"]["redshift.source_coverage_95"]["mean"] == pytest.approx(0.95)
    assert "held-out *source* data" in md and "| oracle | 0.700 ± 0.000 | 0.950 ± 0.000 |" in md


def test_closure_undefined_without_a_gap():
    runs = {"none": [_run(0.2, 0.8)], "mmd": [_run(0.19, 0.7)], "oracle": [_run(0.21, 0.8)]}
    import math

    assert math.isnan(_closure(_summarise(runs, PROTOCOL["labels"]))["mmd"])
