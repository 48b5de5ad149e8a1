"""Probes and embeddings: ridge/kNN against closed forms, metric conventions, embeddings file."""

import h5py
import numpy as np
import pytest

from sim2obs.errors import Sim2ObsValueError
from sim2obs.pretrain.evaluate import (
    embed_folder,
    group_folds,
    knn_fit_predict,
    outlier_threshold,
    probe,
    random_init_encoder,
    read_embeddings,
    regression_scores,
    residual_unit,
    ridge_fit_predict,
    score_conventions,
)
from sim2obs.pretrain.train import PretrainConfig, pretrain


def test_ridge_recovers_a_linear_law_and_matches_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.7
    pred = ridge_fit_predict(x[:150], y[:150], x[150:], alphas=(1e-8,))
    np.testing.assert_allclose(pred, y[150:], atol=1e-5)
    # closed form with alpha on standardised features
    a = 10.0
    mu, sd = x[:150].mean(0), x[:150].std(0)
    xs = (x[:150] - mu) / sd
    coef = np.linalg.solve(xs.T @ xs + a * np.eye(5), xs.T @ (y[:150] - y[:150].mean()))
    expected = ((x[150:] - mu) / sd) @ coef + y[:150].mean()
    np.testing.assert_allclose(ridge_fit_predict(x[:150], y[:150], x[150:], alphas=(a,)), expected)


def test_knn_averages_neighbours():
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    y = np.array([0.0, 1.0, 2.0, 10.0])
    np.testing.assert_allclose(knn_fit_predict(x, y, np.array([[0.9]]), k=3), [1.0])


def test_score_conventions():
    y = np.array([0.1, 0.2, 0.3, 0.4])
    s = regression_scores(y, y, "redshift")
    assert s.r2 == 1 and s.nmad == 0 and s.outlier_fraction == 0
    # photo-z outlier: |dz|/(1+z) > 0.15
    s = regression_scores(np.array([1.0, 1.0]), np.array([1.0, 1.4]), "redshift")
    assert s.outlier_fraction == 0.5
    d = np.array([0.0, 0.1, -0.1, 0.2, -0.2])
    s = regression_scores(np.zeros(5), d, "log_mstar")
    assert s.nmad == pytest.approx(1.4826 * 0.1)


def test_probe_finds_signal_and_not_noise():
    rng = np.random.default_rng(1)
    y = rng.uniform(9, 11, 300)
    signal = np.c_[y + rng.normal(0, 0.05, 300), rng.normal(size=(300, 7))]
    noise = rng.normal(size=(300, 8))
    good = probe(signal, y, "log_mstar")
    bad = probe(noise, y, "log_mstar")
    assert good["linear"].r2 > 0.95 and good["knn"].r2 > 0.5
    assert bad["linear"].r2 < 0.1
    with pytest.raises(Sim2ObsValueError, match="too few"):
        probe(signal[:4], y[:4], "log_mstar")


@pytest.mark.parametrize("folds", [0, 1, -3])
def test_probe_rejects_fewer_than_two_folds(folds):
    # before: folds=0 scored np.empty_like garbage, folds=1 crashed inside cKDTree
    rng = np.random.default_rng(0)
    with pytest.raises(Sim2ObsValueError, match="--folds must be an integer >= 2"):
        probe(rng.normal(size=(50, 3)), rng.normal(size=50), "log_mstar", folds=folds)


def test_probe_folds_above_galaxies_names_the_option_and_the_count():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(240, 3)), rng.normal(size=240)
    ids = np.repeat(np.arange(120), 2)  # 120 galaxies, two surveys each
    with pytest.raises(Sim2ObsValueError, match=r"--folds 200 .* only 120 available; use --folds 120"):
        probe(x, y, "log_mstar", folds=200, groups=ids)
    with pytest.raises(Sim2ObsValueError, match="only 120 available"):
        probe(x, y, "log_mstar", folds=121, groups=ids)
    assert probe(x, y, "log_mstar", folds=120, groups=ids)["linear"].n == 240  # leave-one-galaxy-out


def test_group_folds_keep_each_galaxy_in_one_fold():
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.repeat(np.arange(37), 3))  # 37 galaxies x 3 surveys, shuffled rows
    fold = group_folds(ids, 5, seed=4)
    assert all(len(set(fold[ids == g])) == 1 for g in np.unique(ids))
    per_fold = [len(np.unique(ids[fold == f])) for f in range(5)]
    assert sorted(per_fold) == [7, 7, 7, 8, 8]  # galaxies dealt evenly
    np.testing.assert_array_equal(group_folds(ids, 5, seed=4), fold)  # deterministic
    assert not np.array_equal(group_folds(ids, 5, seed=5), fold)
    # one row per group (in any id order): the ordinary shuffled K-fold split of the rows, as
    # the probe made before it grouped (single-survey results unchanged)
    order = np.random.default_rng(2).permutation(23)
    plain = np.empty(23, dtype=int)
    plain[order] = np.arange(23) % 4
    ids_shuffled = rng.permutation(np.arange(1000, 1023))
    np.testing.assert_array_equal(group_folds(ids_shuffled, 4, seed=2), plain)


def test_probe_does_not_leak_a_galaxy_across_folds():
    # each galaxy seen by two surveys: nearly the same embedding twice, unrelated to the label.
    # Ungrouped folds put one copy in training and the other in test: kNN "predicts" the label.
    rng = np.random.default_rng(0)
    n = 150
    y_gal = rng.uniform(9, 11, n)
    e_gal = rng.normal(size=(n, 6))
    x = np.concatenate([e_gal, e_gal + rng.normal(0, 0.01, (n, 6))])
    y = np.concatenate([y_gal, y_gal])
    ids = np.concatenate([np.arange(n), np.arange(n)])
    leaky = probe(x, y, "log_mstar", k=1)
    grouped = probe(x, y, "log_mstar", k=1, groups=ids)
    assert leaky["knn"].r2 > 0.4  # the leak the grouping removes (twins share a fold 1 time in 5)
    assert grouped["knn"].r2 < 0.2 and grouped["linear"].r2 < 0.2
    assert grouped["knn"].n == 2 * n
    # rows with a NaN label are dropped together with their group entry
    y_nan = y.copy()
    y_nan[:10] = np.nan
    assert probe(x, y_nan, "log_mstar", groups=ids)["linear"].n == 2 * n - 10
    with pytest.raises(Sim2ObsValueError, match="groups"):
        probe(x, y, "log_mstar", groups=ids[:-1])


def test_units_and_outlier_definitions_follow_regression_scores():
    assert residual_unit("log_mstar", "log10(Msun)") == "dex"
    assert residual_unit("redshift") == "dz/(1+z)"
    assert residual_unit("age_gyr") == "Gyr" and residual_unit("r_half_kpc", "kpc") == "kpc"
    assert residual_unit("mag_r") == "mag" and residual_unit("concentration") == ""
    assert "dex" in score_conventions("log_mstar") and "> 0.3 dex" in score_conventions("log_mstar")
    assert "dz/(1+z)" in score_conventions("redshift") and "> 0.15" in score_conventions("redshift")
    # the thresholds printed are the ones applied
    for label in ("redshift", "log_mstar"):
        t = outlier_threshold(label)
        y = np.zeros(4)
        d = np.array([0.0, 0.99 * t, 1.01 * t, -1.01 * t])
        assert regression_scores(y, y + d, label).outlier_fraction == 0.5
    s = regression_scores(np.ones(3), np.array([1.0, 2.0, 3.0]), "log_mstar")
    assert np.isnan(s.r2) and s.as_dict()["r2"] is None and s.as_dict()["n"] == 3


def test_embed_folder_writes_design_format(synthetic_folders, tmp_path):
    cfg = PretrainConfig(epochs=1, batch_size=16, embed_dim=8, proj_hidden=16, proj_dim=8,
                         encoder_kwargs={"width": 8, "depths": [1], "stem_stride": 2})
    run = pretrain([synthetic_folders[0]], tmp_path / "run", cfg, progress=False)
    out = embed_folder(run, [synthetic_folders[0]], tmp_path / "emb.h5", progress=False)
    emb, labels, attrs = read_embeddings(out)
    assert emb.shape == (96, 8) and emb.dtype == np.float32
    np.testing.assert_array_equal(labels["object_id"], np.arange(96))
    assert "log_mstar" in labels and attrs["domain"] == "sim" and list(attrs["bands"]) == ["g", "r", "i"]
    assert "@" in attrs["model"]
    with h5py.File(out) as f:
        assert f["labels/log_mstar"].attrs["unit"] == ""
        assert f["survey"].shape == (96,) and set(f["survey"][()]) == {b"hsc"}
    both = embed_folder(run, list(synthetic_folders), tmp_path / "both.h5", progress=False)
    _, labels2, _ = read_embeddings(both)
    with h5py.File(both) as f:  # each row's survey tells the two renderings of one id apart
        rows = list(zip(f["survey"][()].tolist(), labels2["object_id"].tolist(), strict=True))
    assert len(rows) == 192 and len(set(rows)) == 192 and {s for s, _ in rows} == {b"hsc", b"lsst"}
    lines: list[str] = []
    embed_folder(run, [synthetic_folders[0]], tmp_path / "same.h5", progress=False, log=lines.append)
    assert lines == []  # the training stamp size: nothing to say


def test_other_stamp_size_gets_a_note(synthetic_folders, make_shards, tmp_path):
    """Stamps of another size than the training ones embed (the encoder pools globally), with a
    note naming both sizes; probe says it too."""
    from sim2obs.pretrain.evaluate import probe_run

    cfg = PretrainConfig(epochs=1, batch_size=16, embed_dim=8, proj_hidden=16, proj_dim=8,
                         encoder_kwargs={"width": 8, "depths": [1], "stem_stride": 2})
    run = pretrain([synthetic_folders[0]], tmp_path / "run", cfg, progress=False, max_steps_per_epoch=1)
    small = make_shards(tmp_path / "small", n=40, stamp=24, seed=4)
    lines: list[str] = []
    emb, _, _ = read_embeddings(embed_folder(run, [small], tmp_path / "e.h5", progress=False,
                                             log=lines.append))
    assert emb.shape == (40, 8) and np.isfinite(emb).all()
    assert len(lines) == 1 and "24x24" in lines[0] and "trained on 32x32" in lines[0]
    lines.clear()
    probe_run(run, [small], folds=2, log=lines.append)
    assert len(lines) == 1 and "24x24" in lines[0]


def test_embed_and_probe_commands(synthetic_folders, tmp_path, capsys):
    import torch

    from sim2obs.cli import main
    from sim2obs.pretrain.train import load_encoder

    cfg = PretrainConfig(epochs=1, batch_size=16, embed_dim=8, proj_hidden=16, proj_dim=8,
                         encoder_kwargs={"width": 8, "depths": [1], "stem_stride": 2})
    run = pretrain([synthetic_folders[0]], tmp_path / "run", cfg, progress=False)
    folder = str(synthetic_folders[0])
    assert main(["embed", str(run), folder, "--out", str(tmp_path / "e.h5"), "--device", "auto"]) == 0
    emb, labels, _ = read_embeddings(tmp_path / "e.h5")
    assert emb.shape == (96, 8) and np.isfinite(emb).all()
    capsys.readouterr()
    assert main(["probe", str(run), folder, "--label", "log_mstar", "--folds", "3", "--device", "auto"]) == 0
    out = capsys.readouterr().out
    assert "96 stamps of 96 galaxies, 3-fold" in out and "effective rank" in out
    assert "N = 96 embeddings" in out and "> 0.3 dex" in out
    for name in ("pretrained", "random-init"):
        for kind in ("linear", "knn"):
            assert any(line.split()[:2] == [name, kind] and "R2" in line and "NMAD" in line
                       for line in out.splitlines()), (name, kind, out)
    assert main(["probe", str(run), folder, "--label", "no_such_label"]) != 0
    assert "no_such_label" in capsys.readouterr().err
    # the baseline: same architecture, other weights, reproducible, global RNG untouched
    enc, _, _ = load_encoder(run)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    r1, _ = random_init_encoder(run, seed=0)
    assert torch.equal(torch.rand(3), before)
    r2, _ = random_init_encoder(run, seed=0)
    s_enc, s1, s2 = enc.state_dict(), r1.state_dict(), r2.state_dict()
    assert s_enc.keys() == s1.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s_enc[k], s1[k]) for k in s1 if s1[k].is_floating_point())
