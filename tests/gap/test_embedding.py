"""Embedding-space distances against closed forms, and their calibration under a controlled shift."""

import numpy as np
import pytest

from sim2obs.errors import Sim2ObsValueError
from sim2obs.gap.embedding import (
    c2st_auc,
    embedding_gap,
    frechet_distance,
    mmd2_unbiased,
    mmd_permutation_test,
    prdc,
    roc_auc,
    sinkhorn_divergence,
    standardise_pair,
)


def test_frechet_closed_form_gaussians():
    rng = np.random.default_rng(0)
    d = 3
    mu1, mu2 = np.zeros(d), np.array([1.0, -2.0, 0.5])
    s1 = np.diag([1.0, 2.0, 0.5])
    s2 = np.diag([2.0, 1.0, 0.5])
    # closed form for commuting covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    x = rng.multivariate_normal(mu1, s1, 40000)
    y = rng.multivariate_normal(mu2, s2, 40000)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.03)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_roc_auc_mann_whitney():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 0, 1, 1]) == 0.5
    # one discordant pair out of 4
    assert roc_auc([0.1, 0.6, 0.5, 0.9], [0, 0, 1, 1]) == 0.75


def test_mmd_identical_distribution_not_significant():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 5))
    assert mmd2_unbiased(z[:100], z[:100]) < 1e-2
    res = mmd_permutation_test(z[:100], z[100:], n_perm=100, rng=np.random.default_rng(2), n_boot=30)
    assert abs(res["value"]) < 0.02
    assert res["p_value"] > 0.05
    assert res["ci"][0] <= res["value"] <= res["ci"][1] or res["ci"][0] < 0.01


def test_mmd_shift_is_significant():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 5))
    y = rng.normal(size=(100, 5)) + 1.0
    res = mmd_permutation_test(x, y, n_perm=100, rng=rng)
    assert res["p_value"] < 0.02
    assert res["value"] > 0.05


def test_c2st_halves_near_half():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(300, 8))
    res = c2st_auc(z[:150], z[150:], rng=np.random.default_rng(5), n_boot=50)
    assert 0.38 < res["value"] < 0.62
    assert res["ci"][0] < 0.5 < res["ci"][1] + 0.05
    assert res["scores"].shape == (300,)


def test_prdc_identical_sets_and_same_distribution():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 4))
    same = prdc(x, x, k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert same["density"] >= 1.0
    y = rng.normal(size=(300, 4))
    r = prdc(x, y, k=5)
    assert 0.7 < r["density"] < 1.3
    assert r["coverage"] > 0.85
    assert r["precision"] > 0.75 and r["recall"] > 0.75
    far = prdc(x, y + 5.0, k=5)
    assert far["precision"] < 0.05 and far["coverage"] < 0.05


def test_sinkhorn_zero_for_same_set_and_grows():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 3))
    assert abs(sinkhorn_divergence(x, x)) < 1e-6
    vals = [sinkhorn_divergence(x, rng.normal(size=(200, 3)) + s) for s in (0.0, 1.0, 2.0)]
    assert vals[0] < vals[1] < vals[2]
    # tends to |shift|^2 / 2 (W2^2 / 2 between translated measures) for large shifts
    assert vals[2] == pytest.approx(0.5 * 3 * 2.0**2, rel=0.3)


def test_standardise_and_errors():
    x = np.c_[np.arange(10.0), np.ones(10)]
    a, b = standardise_pair(x, x)
    assert np.allclose(a.mean(0), 0) and np.allclose(a[:, 1], 0)
    with pytest.raises(Sim2ObsValueError, match="embedding sizes"):
        frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(Sim2ObsValueError, match="NaN"):
        mmd2_unbiased(np.full((5, 2), np.nan), np.zeros((5, 2)))


def test_calibration_halves_and_monotonic_shift():
    """Part 5 of the issue: halves of one set are indistinguishable, a growing mean shift
    (0, 0.5, 1, 2 sigma along one direction) gives growing, eventually significant metrics."""
    rng = np.random.default_rng(8)
    d, n = 6, 120
    base = rng.normal(size=(2 * n, d))
    halves = embedding_gap(base[:n], base[n:], rng=np.random.default_rng(9), n_boot=20, n_perm=100)
    assert 0.35 < halves["c2st_auc"]["value"] < 0.65
    assert halves["mmd2"]["p_value"] > 0.05
    lo, hi = halves["sinkhorn"]["ci"]
    assert lo <= 0.0 <= hi  # the bias-corrected divergence is zero within its interval
    assert halves["sinkhorn"]["p_value"] > 0.05
    assert halves["sinkhorn"]["raw"] > 0  # the raw finite-sample value is not
    direction = np.zeros(d)
    direction[0] = 1.0
    res = []
    for shift in (0.0, 0.5, 1.0, 2.0):
        y = rng.normal(size=(n, d)) + shift * direction
        res.append(embedding_gap(base[:n], y, rng=np.random.default_rng(10), n_boot=10, n_perm=100))
    for key in ("c2st_auc", "sinkhorn", "mmd2", "frechet"):
        vals = [r[key]["value"] for r in res]
        assert all(a < b for a, b in zip(vals[1:], vals[2:], strict=False)), (key, vals)
        assert vals[0] < vals[-1], (key, vals)
    assert res[-1]["mmd2"]["p_value"] < 0.02
    assert res[-1]["sinkhorn"]["p_value"] < 0.05 and res[-1]["sinkhorn"]["ci"][0] > 0
    assert res[-1]["c2st_auc"]["ci"][0] > 0.7
    assert res[-1]["prdc"]["coverage"]["value"] < res[0]["prdc"]["coverage"]["value"]
