"""Adaptation loop: runs for every method, resumes to identical weights, picks its checkpoint
without target labels, calibrates intervals, refuses bad input."""

import csv
import json

import numpy as np
import pytest
import torch

from sim2obs.adapters import METHODS
from sim2obs.adapters.loop import AdaptConfig, adapt, density_ratio, dev_risk, load_adapted
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError
from sim2obs.pretrain.train import PretrainConfig, load_encoder, pretrain

TINY = dict(epochs=1, batch_size=32, encoder_kwargs={"width": 8, "depths": [1, 1], "stem_stride": 2},
            embed_dim=16, proj_hidden=32, proj_dim=16, val_fraction=0.2)
FAST = dict(labels=("log_mstar", "redshift"), epochs=2, batch_size=32, bottleneck_dim=16, head_hidden=16)


@pytest.fixture(scope="module")
def domains(tmp_path_factory, make_shards):
    root = tmp_path_factory.mktemp("adapt")
    src = make_shards(root / "src", n=160, seed=1)
    tgt = make_shards(root / "tgt", n=96, seed=2, id_offset=5000, noise=0.2)
    run = pretrain([src], root / "pre", PretrainConfig(**TINY), progress=False)
    return src, tgt, run


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_writes_a_run(domains, tmp_path, method):
    src, tgt, pre = domains
    out = adapt(pre, src, tgt, tmp_path / method, AdaptConfig(method=method, **FAST), progress=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["kind"] == "adapt" and ckpt["epoch"] == 1
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2
    for r in rows:
        assert np.isfinite(float(r["nll"])) and np.isfinite(float(r["dev_risk"]))
        assert "target_nmad_log_mstar" in r  # reported (target has labels), never trained on
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected_epoch"] in (0, 1)
    cal = summary["calibration"]
    assert set(cal["calibrated"]) == {"log_mstar", "redshift"}
    assert ckpt["interval_scale"].shape == (2, 2)  # (68 %, 95 %) x labels, all positive
    assert bool((ckpt["interval_scale"] > 0).all())
    for level in ("68", "95"):
        assert set(cal["interval_scale"][level]) == {"log_mstar", "redshift"}
        for name in ("log_mstar", "redshift"):
            assert 0.0 <= cal["calibrated"][name][f"coverage_{level}"] <= 1.0


def test_target_labels_do_not_influence_training(domains, tmp_path, make_shards):
    """Same target images with scrambled labels -> identical weights."""
    src, tgt, pre = domains
    import shutil

    import h5py

    tgt2 = tmp_path / "tgt2"
    shutil.copytree(tgt, tgt2)
    for p in sorted(tgt2.glob("*.h5")):
        with h5py.File(p, "r+") as f:
            f["labels/log_mstar"][...] = f["labels/log_mstar"][()][::-1]
    cfg = AdaptConfig(method="dann", **FAST)
    a = adapt(pre, src, tgt, tmp_path / "a", cfg, progress=False)
    b = adapt(pre, src, tgt2, tmp_path / "b", cfg, progress=False)
    sa, sb = (torch.load(r / "checkpoint.pt", weights_only=True)["model"] for r in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("finetune", ["none", "last"])
def test_resume_gives_the_same_weights(domains, tmp_path, finetune):
    src, tgt, pre = domains
    cfg = AdaptConfig(method="mmd", finetune=finetune, **{**FAST, "epochs": 3})
    full = adapt(pre, src, tgt, tmp_path / "full", cfg, progress=False)
    part = adapt(pre, src, tgt, tmp_path / "part", cfg, progress=False, stop_after_epoch=0)
    assert torch.load(part / "checkpoint.pt", weights_only=True)["epoch"] == 0
    adapt(pre, src, tgt, part, cfg, progress=False, resume=True)
    sa, sb = (torch.load(r / "checkpoint.pt", weights_only=True)["model"] for r in (full, part))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_all_changes_the_encoder_and_none_does_not(domains, tmp_path):
    src, tgt, pre = domains
    enc0 = {k: v.clone() for k, v in load_encoder(pre)[0].state_dict().items()}
    for ft, changed in (("none", False), ("all", True)):
        out = adapt(pre, src, tgt, tmp_path / ft, AdaptConfig(method="coral", finetune=ft, **FAST),
                    progress=False)
        model, _ = load_adapted(out)
        diff = any(not torch.equal(model.encoder.state_dict()[k], v) for k, v in enc0.items()
                   if v.dtype.is_floating_point)
        assert diff == changed


def test_adapted_run_stands_in_for_an_encoder(domains, tmp_path):
    """load_encoder on an adapted run gives its aligned (bottleneck) features."""
    src, tgt, pre = domains
    out = adapt(pre, src, tgt, tmp_path / "r", AdaptConfig(method="none", **FAST), progress=False)
    enc, norm, _ = load_encoder(out)
    assert enc(norm(torch.ones(3, 3, 32, 32))).shape == (3, FAST["bottleneck_dim"])


def test_bad_input(domains, tmp_path, make_shards):
    src, tgt, pre = domains
    with pytest.raises(Sim2ObsDataError, match="log_sfr"):
        adapt(pre, src, tgt, tmp_path / "a", AdaptConfig(labels=("log_sfr",)), progress=False)
    other = make_shards(tmp_path / "big", n=40, stamp=40)
    with pytest.raises(Sim2ObsDataError, match="stamp"):
        adapt(pre, src, other, tmp_path / "b", AdaptConfig(**FAST), progress=False)
    with pytest.raises(Sim2ObsValueError, match="unknown method"):
        AdaptConfig(method="magic")
    out = adapt(pre, src, tgt, tmp_path / "c", AdaptConfig(**FAST), progress=False)
    with pytest.raises(Sim2ObsValueError, match="already holds"):
        adapt(pre, src, tgt, out, AdaptConfig(**FAST), progress=False)
    with pytest.raises(Sim2ObsValueError, match="adaptation run"):
        adapt(out, src, tgt, tmp_path / "d", AdaptConfig(**FAST), progress=False)


def test_dev_risk_is_unbiased_importance_weighting():
    """With w = p_t / p_s exactly, DEV's estimate of the target risk is close to the truth."""
    rng = np.random.default_rng(0)
    xs = rng.normal(0, 1, 20000)
    loss = xs**2  # target N(1, 1): E_t[x^2] = 2
    w = np.exp(xs - 0.5)  # N(1,1)/N(0,1)
    assert dev_risk(loss, w) == pytest.approx(2.0, rel=0.05)
    # estimated weights from a domain classifier
    xt = rng.normal(1, 1, 20000)
    w_hat = density_ratio(xs[:, None], xt[:, None], xs[:, None])
    assert dev_risk(loss, w_hat) == pytest.approx(2.0, rel=0.1)
