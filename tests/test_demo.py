"""`sim2obs demo --quick` end to end (the CI run of the whole chain): files exist, metrics are
finite, and adaptation shrinks the gap to the pseudo-real target."""

import json
import math

import pytest

from sim2obs.cli import main
from sim2obs.demo import DemoSizes


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    return out


def test_outputs_exist(demo_dir):
    for rel in ("index.html", "index.md", "summary.json", "gap/report.html", "gap/metrics.json",
                "figures/grid_source.png", "figures/grid_target.png", "figures/grid_hdf.png",
                "figures/pred_vs_true_none.png", "figures/pred_vs_true_sinkhorn.png",
                "predictions_none.csv", "predictions_sinkhorn.csv", "run_sinkhorn/checkpoint.pt"):
        assert (demo_dir / rel).is_file(), rel
    html = (demo_dir / "index.html").read_text()
    assert "grid_source.png" in html and "pred_vs_true_sinkhorn.png" in html


def test_metrics_finite_and_gap_shrinks(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    for run in ("none", "sinkhorn"):
        for lab in ("log_mstar", "redshift"):
            for k in ("nmad", "bias", "r2", "coverage_68"):
                assert math.isfinite(s["target_scores"][run][lab][k])
    for k in ("c2st_auc", "sinkhorn", "mmd2"):
        assert math.isfinite(s["gap"][k]["before"]) and math.isfinite(s["gap"][k]["after"])
    assert s["gap"]["c2st_auc"]["after"] < s["gap"]["c2st_auc"]["before"]


def test_rerun_reuses_stages(demo_dir):
    before = (demo_dir / "run_sinkhorn" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(demo_dir), "--quiet"]) == 0
    assert (demo_dir / "run_sinkhorn" / "checkpoint.pt").stat().st_mtime_ns == before


def test_sizes_validated():
    with pytest.raises(ValueError):
        DemoSizes(n_source=4)


def test_universes_built_concurrently_have_the_same_bytes(tmp_path):
    import hashlib

    from sim2obs.demo import _universe, _universes

    def digest(folder):
        h = hashlib.sha256()
        files = sorted(folder.rglob("*.hdf5"))
        assert len(files) >= 3  # group catalogue, snapshot chunks, offsets
        for p in files:
            h.update(p.read_bytes())
        return h.hexdigest()

    specs = [(tmp_path / "par_a", 4, 0), (tmp_path / "par_b", 3, 1)]
    par = _universes(specs, workers=2, progress=False)
    seq = [_universe(tmp_path / "seq_a", 4, 0, False), _universe(tmp_path / "seq_b", 3, 1, False)]
    assert par == [tmp_path / "par_a", tmp_path / "par_b"]
    assert [digest(p) for p in par] == [digest(p) for p in seq]
    assert digest(par[0]) != digest(par[1])
