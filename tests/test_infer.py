"""Inference: CSV layout of DESIGN.md, FITS table, scores against a hand check, plot, CLI."""

import csv

import numpy as np
import pytest
from astropy.table import Table

from sim2obs.adapters.loop import AdaptConfig, adapt
from sim2obs.cli import main
from sim2obs.infer import Predictions, infer, predict, scores
from sim2obs.pretrain.train import PretrainConfig, pretrain

TINY = dict(epochs=1, batch_size=32, encoder_kwargs={"width": 8, "depths": [1, 1], "stem_stride": 2},
            embed_dim=16, proj_hidden=32, proj_dim=16, val_fraction=0.2)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, make_shards):
    root = tmp_path_factory.mktemp("infer")
    src = make_shards(root / "src", n=160, seed=1)
    tgt = make_shards(root / "tgt", n=64, seed=2, id_offset=5000, noise=0.2)
    pre = pretrain([src], root / "pre", PretrainConfig(**TINY), progress=False)
    run = adapt(pre, src, tgt, root / "ad", AdaptConfig(
        method="coral", labels=("log_mstar", "redshift"), epochs=3, batch_size=32, ensemble=2,
        bottleneck_dim=16, head_hidden=16), progress=False)
    return run, tgt


def test_predictions_and_files(adapted, tmp_path):
    run, tgt = adapted
    pred, sc = infer(run, [tgt], tmp_path / "p.csv", fits=tmp_path / "p.fits",
                     plot=tmp_path / "p.png", progress=False)
    assert pred.mean.shape == (64, 2) and pred.has_truth
    assert np.all(pred.p16 <= pred.mean + 1e-9) and np.all(pred.mean <= pred.p84 + 1e-9)
    assert np.all(pred.p02 < pred.p16) and np.all(pred.p84 < pred.p98)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["object_id", "log_mstar", "log_mstar_p16", "log_mstar_p84",
                             "log_mstar_true", "redshift", "redshift_p16", "redshift_p84",
                             "redshift_true"]
    assert [int(r["object_id"]) for r in rows] == list(range(5000, 5064))
    t = Table.read(tmp_path / "p.fits")
    assert np.allclose(t["log_mstar"], pred.mean[:, 0], rtol=1e-6)
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert set(sc) == {"log_mstar", "redshift"}
    assert 0 <= sc["log_mstar"]["coverage_68"] <= 1
    # deterministic
    again = predict(run, [tgt], progress=False)
    assert np.array_equal(again.mean, pred.mean)


def test_intervals_use_the_factor_of_their_own_level(adapted, tmp_path):
    """p16/p84 are stretched by the 68 % factor, p02/p98 by the 95 % one."""
    import shutil

    import torch

    run, tgt = adapted
    runs = {}
    for tag, table in (("one", [[1.0, 1.0], [1.0, 1.0]]), ("mixed", [[2.0, 0.5], [3.0, 1.5]])):
        copy = tmp_path / tag
        shutil.copytree(run, copy)
        ckpt = torch.load(copy / "checkpoint.pt", weights_only=True)
        ckpt["interval_scale"] = torch.tensor(table, dtype=torch.float64)
        torch.save(ckpt, copy / "checkpoint.pt")
        runs[tag] = predict(copy, [tgt], progress=False)
    one, mixed = runs["one"], runs["mixed"]
    assert np.array_equal(one.mean, mixed.mean)
    f68, f95 = np.array([2.0, 0.5]), np.array([3.0, 1.5])
    assert np.allclose(mixed.p84 - mixed.mean, f68 * (one.p84 - one.mean), rtol=1e-9, atol=1e-12)
    assert np.allclose(mixed.mean - mixed.p16, f68 * (one.mean - one.p16), rtol=1e-9, atol=1e-12)
    assert np.allclose(mixed.p98 - mixed.mean, f95 * (one.p98 - one.mean), rtol=1e-9, atol=1e-12)


def test_scores_hand_check():
    truth = np.array([[1.0], [2.0], [3.0], [4.0]])
    mean = truth + np.array([[0.1], [-0.1], [0.1], [0.5]])
    pred = Predictions(np.arange(4), ("log_mstar",), {}, mean, mean - 0.2, mean + 0.2, mean - 0.4,
                       mean + 0.4, truth)
    s = scores(pred)["log_mstar"]
    assert s["bias"] == pytest.approx(0.1)
    assert s["coverage_68"] == pytest.approx(0.75)  # |d| <= 0.2 for 3 of 4
    assert s["coverage_95"] == pytest.approx(0.75)
    assert s["outlier_fraction"] == pytest.approx(0.25)  # |d| > 0.3
    assert s["r2"] == pytest.approx(1 - (0.01 * 3 + 0.25) / 5.0)


def test_cli_infer_prints_scores(adapted, tmp_path, capsys):
    run, tgt = adapted
    assert main(["infer", str(run), str(tgt), "--out", str(tmp_path / "x.csv"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "log_mstar" in out and "cov68" in out
    assert (tmp_path / "x_vs_true.png").is_file()
    assert main(["infer", str(tmp_path), str(tgt), "--out", str(tmp_path / "y.csv")]) == 1
