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


def _cand(w, nll, auc):
    return {"adapter_weight": w, "source_val_nll": nll, "selection_auc": auc}


def test_select_weight_keeps_the_best_aligned_run_that_still_fits_the_source():
    import math

    from sim2obs.benchmark import NLL_TOLERANCE, select_weight

    assert NLL_TOLERANCE == pytest.approx(math.log(1.1))
    c = [_cand(1, 0.40, 0.80), _cand(3, 0.42, 0.70), _cand(10, 0.49, 0.62), _cand(30, 0.60, 0.55)]
    # best NLL 0.40 -> runs up to 0.40 + ln 1.1 = 0.4953 qualify: w = 1, 3, 10; lowest AUC is w = 10
    assert select_weight(c)["adapter_weight"] == 10
    # a stricter tolerance leaves 1 and 3
    assert select_weight(c, tolerance=0.03)["adapter_weight"] == 3
    # the best-fitting run always qualifies, even when it aligns worst
    assert select_weight([_cand(1, 0.3, 0.9), _cand(3, 0.9, 0.5)])["adapter_weight"] == 1
    # ties in AUC go to the smaller weight
    assert select_weight([_cand(3, 0.4, 0.6), _cand(1, 0.4, 0.6)])["adapter_weight"] == 1


def test_select_weight_refuses_empty_or_non_finite_candidates():
    from sim2obs.benchmark import select_weight
    from sim2obs.errors import Sim2ObsValueError

    with pytest.raises(Sim2ObsValueError, match="at least one"):
        select_weight([])
    with pytest.raises(Sim2ObsValueError, match="selection_auc"):
        select_weight([_cand(1, 0.4, float("nan"))])


def test_dev_choice_is_summarised_and_printed_beside_the_protocol_choice():
    from sim2obs.benchmark import _dev_choice_summary

    runs = {"none": [_run(0.30, 0.8)], "oracle": [_run(0.20, 0.8)], "mmd": [_run(0.24, 0.58)]}
    runs["mmd"][0]["adapter_weight"] = 30.0
    runs["mmd"][0]["dev_choice"] = {"adapter_weight": 1.0, "scores": _run(0.28, 0.8)["scores"],
                                    "gap_after": {"c2st_auc": 0.79, "sinkhorn": 0.2}}
    s = _summarise(runs, PROTOCOL["labels"])
    d = _dev_choice_summary(runs, s)
    assert list(d) == ["mmd"]
    assert d["mmd"]["closure"] == pytest.approx(0.2) and d["mmd"]["c2st_auc"]["mean"] == 0.79
    r = {"protocol": PROTOCOL, "seeds": 1, "summary": s, "closure": _closure(s), "runs": runs,
         "dev_choice": d, "gap_before": {"c2st_auc": {"mean": 0.8, "std": 0.0},
                                         "sinkhorn": {"mean": 1.0, "std": 0.0}},
         "references": [], "seconds": 1}
    md = results_markdown(r)
    assert "mmd +60%" in md and "per seed" in md and "mmd 30" in md
    assert "Had DEV chosen the weights" in md and "mmd +20% closed, AUC 0.790 (weights 1)" in md


def test_closure_per_seed():
    from sim2obs.benchmark import _closure_per_seed

    runs = {"none": [_run(0.30, 0.8), _run(0.25, 0.8)], "oracle": [_run(0.20, 0.8), _run(0.26, 0.8)],
            "mmd": [_run(0.27, 0.6), _run(0.24, 0.6)]}
    c = _closure_per_seed(runs)
    assert list(c) == ["mmd"] and c["mmd"][0] == pytest.approx(0.3)
    import math

    assert math.isnan(c["mmd"][1])  # that seed's oracle is worse than none: undefined
    r = {"protocol": PROTOCOL, "seeds": 2, "summary": _summarise(runs, PROTOCOL["labels"]),
         "closure": {"mmd": 0.5}, "closure_per_seed": c, "references": [], "seconds": 1,
         "gap_before": {"c2st_auc": {"mean": 0.8, "std": 0.0}, "sinkhorn": {"mean": 1.0, "std": 0.0}}}
    assert "Per seed: mmd +30%/+nan%" in results_markdown(r)
    assert "protocol v3, 2 seeds" in results_markdown(r)
    r["protocol"] = {**PROTOCOL, "pretrain_augment": "reobserve"}  # an experiment outside v3
    assert "protocol v3, pretraining views 'reobserve' instead of the protocol's 'physical'" in results_markdown(r)


def test_quick_benchmark_end_to_end(tmp_path):
    """One seed, one adapter, quick sizes: every grid run is scored for the selection and the
    results file holds the chosen and DEV's weights and finite metrics."""
    import json
    import math

    from sim2obs.benchmark import WEIGHT_GRID, run_benchmark

    r = run_benchmark(tmp_path / "bench", seeds=1, methods=["mmd"], quick=True,
                      label_efficiency=False, workers=1, progress=False)
    on_disk = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert on_disk["protocol"]["version"] == 3 and set(on_disk["runs"]) == {"none", "mmd", "oracle"}
    from sim2obs import __version__

    assert on_disk["sim2obs_version"] == __version__  # the views' code changes between versions
    res = r["runs"]["mmd"][0]
    assert set(res["by_weight"]) == {f"{w:g}" for w in WEIGHT_GRID}
    for v in res["by_weight"].values():
        assert 0.0 <= v["selection_auc"] <= 1.0 and math.isfinite(v["source_val_nll"])
    assert f"{res['adapter_weight']:g}" in res["by_weight"]
    assert res["dev_choice"]["adapter_weight"] in WEIGHT_GRID
    for m in ("none", "mmd", "oracle"):
        assert all(math.isfinite(x["mean"]) for x in r["summary"][m].values())
    assert "Had DEV chosen the weights" in (tmp_path / "bench" / "results.md").read_text()
    assert r["pretrained"] == [str(tmp_path / "bench" / "pretrain")]
    # v3 pretrains with its own views, whatever pretrain's default
    from sim2obs.errors import Sim2ObsValueError
    from sim2obs.pretrain.train import load_checkpoint

    assert on_disk["protocol"]["pretrain_augment"] == "physical"
    assert load_checkpoint(tmp_path / "bench" / "pretrain")["config"]["augment"] == "physical"
    with pytest.raises(Sim2ObsValueError, match="pretrained with --augment physical"):
        run_benchmark(tmp_path / "bench", seeds=1, methods=["mmd"], quick=True, label_efficiency=False,
                      workers=1, progress=False, pretrain_augment="reobserve")


def test_a_reused_run_of_another_encoder_is_refused(tmp_path):
    import json

    from sim2obs.benchmark import _check_encoder
    from sim2obs.errors import Sim2ObsValueError

    run = tmp_path / "runs" / "mmd_w1_seed1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"pretrained": str((tmp_path / "pretrain").resolve())}))
    _check_encoder(run, tmp_path / "pretrain")  # same encoder: fine
    with pytest.raises(Sim2ObsValueError, match="fresh --out"):
        _check_encoder(run, tmp_path / "pretrain_seed1")
