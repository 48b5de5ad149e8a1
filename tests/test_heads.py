"""Heads: Gaussian NLL against its closed form, NaN masking, label scaling, ensemble mixtures,
sigma calibration."""

import math

import numpy as np
import pytest
import torch

from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError
from sim2obs.heads import (
    GaussianHead,
    LabelScaler,
    fit_sigma_scale,
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


def test_sigma_scale_restores_coverage():
    rng = np.random.default_rng(1)
    y = rng.normal(0, 2.0, (20000, 1))
    mu = np.zeros_like(y)
    sd = np.ones_like(y)  # over-confident by a factor 2
    s = fit_sigma_scale(y, mu, sd)
    assert s[0] == pytest.approx(2.0, rel=0.02)
    cov = interval_coverage(y, mu - s * sd, mu + s * sd)
    assert cov[0] == pytest.approx(0.6827, abs=0.01)
