"""Heads: Gaussian NLL against its closed form, NaN masking, label scaling, ensemble mixtures,
per-level (conformal) interval calibration."""

import math

import numpy as np
import pytest
import torch

from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError
from sim2obs.heads import (
    INTERVALS,
    NOMINAL,
    GaussianHead,
    LabelScaler,
    conformal_interval_scale,
    gaussian_nll,
    interval_coverage,
    mixture_moments,
    mixture_quantiles,
)


def test_nll_hand_computed_and_nan_masked():
    mu = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    log_sigma = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    y = torch.tensor([[1.0, 3.0], [float("nan"), 0.0]])
    # entries: z=1, sigma=1 -> 0.5 + 0 ; z=1, sigma=2 -> 0.5 + log 2 ; z=0 -> 0 ; plus 0.5 log 2pi each
    expect = (0.5 + 0.5 + math.log(2.0) + 0.0) / 3 + 0.5 * math.log(2 * math.pi)
    assert float(gaussian_nll(mu, log_sigma, y)) == pytest.approx(expect, rel=1e-6)
    mu.requires_grad_(True)
    gaussian_nll(mu, log_sigma, y).backward()
    assert mu.grad[1, 0] == 0  # the masked entry gets no gradient
    with pytest.raises(Sim2ObsValueError):
        gaussian_nll(mu, log_sigma, y[:, :1])


def test_head_learns_heteroscedastic_noise():
    """Noise sigma = 0.1 for x < 0 and 0.5 for x > 0: the head must learn both."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 1, generator=g) * 2 - 1
    sigma = torch.where(x < 0, 0.1, 0.5)
    y = 2 * x + sigma * torch.randn(x.shape, generator=g)
    torch.manual_seed(0)
    head = GaussianHead(1, 1, hidden=32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(400):
        opt.zero_grad()
        mu, ls = head(x)
        gaussian_nll(mu, ls, y).backward()
        opt.step()
    with torch.no_grad():
        _, ls = head(torch.tensor([[-0.5], [0.5]]))
    assert ls.exp().squeeze().numpy() == pytest.approx([0.1, 0.5], rel=0.25)


def test_label_scaler_round_trip_and_errors():
    y = np.array([[10.0, np.nan], [11.0, 1.0], [12.0, 3.0]])
    s = LabelScaler.fit(("a", "b"), y)
    assert s.mean == pytest.approx((11.0, 2.0))
    z = s.transform(y)
    assert np.allclose(s.inverse_mean(z)[1:], y[1:])
    assert LabelScaler.from_dict(s.to_dict()) == s
    with pytest.raises(Sim2ObsDataError, match="b"):
        LabelScaler.fit(("a", "b"), np.array([[1.0, np.nan], [2.0, np.nan]]))
    with pytest.raises(Sim2ObsDataError):
        LabelScaler(("a",), (0.0,), (0.0,))


def test_mixture_of_one_is_the_gaussian_and_quantiles_match():
    mu = np.array([[[0.3]]])
    sd = np.array([[[2.0]]])
    m, s = mixture_moments(mu, sd)
    assert m[0, 0] == 0.3 and s[0, 0] == 2.0
    assert mixture_quantiles(mu, sd, 0.8413447460685429)[0, 0] == pytest.approx(2.3, abs=1e-9)
    # two well-separated members: median between them, moments by hand
    mu2 = np.array([[[-1.0]], [[1.0]]])
    sd2 = np.full_like(mu2, 0.5)
    m2, s2 = mixture_moments(mu2, sd2)
    assert m2[0, 0] == 0 and s2[0, 0] == pytest.approx(math.sqrt(1 + 0.25))
    assert mixture_quantiles(mu2, sd2, 0.5)[0, 0] == pytest.approx(0.0, abs=1e-9)


def test_conformal_scale_calibrates_each_level_of_heavy_tailed_residuals():
    # Student-t (3 dof) residuals with unit "sigma": the raw +-1 / +-2 sigma intervals cover
    # ~0.61 / ~0.86, and no single factor fixes both levels. One factor per level does.
    rng = np.random.default_rng(1)

    def draw(n):
        return rng.standard_t(3, (n, 1)), np.zeros((n, 1)), np.ones((n, 1))

    y, c, sd = draw(3000)
    y_new, c_new, sd_new = draw(50000)
    factors = {}
    for lvl, k in (("68", 1.0), ("95", 2.0)):
        factors[lvl] = conformal_interval_scale(y, c, c - k * sd, c + k * sd, NOMINAL[lvl])
        s = factors[lvl]
        cov = interval_coverage(y_new, c_new - s * k * sd_new, c_new + s * k * sd_new)
        assert cov[0] == pytest.approx(NOMINAL[lvl], abs=0.015)  # ~3 sigma of a 3000-point fit
    # t3 (scipy.stats.t.ppf): |t| quantiles 1.20 (68 %) and 3.31 (95 %) -> factors 1.20 and 1.65
    assert factors["68"][0] == pytest.approx(1.20, abs=0.06)
    assert factors["95"][0] == pytest.approx(1.65, abs=0.12)  # no single factor fits both
    assert NOMINAL["68"] == pytest.approx(0.6827, abs=1e-4) and NOMINAL["95"] == pytest.approx(0.9545, abs=1e-4)
    assert INTERVALS["68"][0] == pytest.approx(0.158655, abs=1e-6)


def test_conformal_scale_hand_computed_order_statistic_and_asymmetric_bounds():
    # centre 0, upper half-width 2, lower half-width 1: scores are y/2 above, -y below.
    y = np.array([[1.0], [-0.5], [4.0], [-3.0], [0.2], [-0.1], [2.0], [-2.0], [6.0], [-1.0]])
    c, lo, hi = np.zeros_like(y), -np.ones_like(y), 2 * np.ones_like(y)
    # scores: 0.5 0.5 2 3 0.1 0.1 1 2 3 1 -> sorted 0.1 0.1 0.5 0.5 1 1 2 2 3 3
    # level 0.5, n = 10: k = ceil(11 * 0.5) = 6 -> 1.0; level 0.7: k = ceil(7.7) = 8 -> 2.0
    assert conformal_interval_scale(y, c, lo, hi, 0.5)[0] == pytest.approx(1.0)
    assert conformal_interval_scale(y, c, lo, hi, 0.7)[0] == pytest.approx(2.0)
    assert conformal_interval_scale(y, c, lo, hi, 0.99)[0] == pytest.approx(3.0)  # k > n: largest
    y_nan = y.copy()
    y_nan[:2] = np.nan  # 8 finite < min_n = 10: left uncalibrated
    assert conformal_interval_scale(y_nan, c, lo, hi, 0.5)[0] == 1.0
    with pytest.raises(Sim2ObsValueError, match="level"):
        conformal_interval_scale(y, c, lo, hi, 1.0)
    with pytest.raises(Sim2ObsValueError, match="either side"):
        conformal_interval_scale(y, c, c, hi, 0.5)
