"""Observing-condition augmentations: worse seeing reaches its FWHM, re-realised noise its
sigma, reddening its exact band ratios, redshift dimming its flux and size; per-survey tables."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from stamp_helpers import S, fwhm_from_moments, gaussian, gen  # tests/helpers (pytest's pythonpath)

from sim2obs.errors import MissingDependencyError, Sim2ObsValueError
from sim2obs.pretrain.augment import FWHM_PER_SIGMA, Compose
from sim2obs.pretrain.observing import (
    GalacticReddening,
    NoiseResample,
    PSFDegrade,
    RedshiftDimming,
    extinction_coefficients,
)

# ------------------------------------------------------------------------------ PSF and noise

def test_psf_degrade_reaches_target_fwhm():
    fwhm_in = [3.0, 4.0, 5.0]
    x = torch.cat([gaussian(2, 1, sigma=f / FWHM_PER_SIGMA) for f in fwhm_in], dim=1)
    measured_in = fwhm_from_moments(x)
    torch.testing.assert_close(measured_in, torch.tensor(fwhm_in, dtype=torch.float64).expand(2, 3),
                               rtol=0.01, atol=0)
    y = PSFDegrade(fwhm_in, max_factor=1.5, min_factor=1.5)(x, gen(9))
    target = 1.5 * torch.tensor(fwhm_in, dtype=torch.float64)
    assert torch.allclose(fwhm_from_moments(y), target.expand(2, 3), rtol=0.03)
    torch.testing.assert_close(y.sum((2, 3)), x.sum((2, 3)), rtol=1e-5, atol=0)


def test_psf_degrade_random_factor_within_range_and_per_band():
    x = gaussian(16, 2, sigma=4.0 / FWHM_PER_SIGMA)
    y = PSFDegrade([4.0, 4.0], max_factor=2.0)(x, gen(10))
    ratio = fwhm_from_moments(y) / 4.0
    assert ((ratio > 0.98) & (ratio < 2.03)).all()
    torch.testing.assert_close(ratio[:, 0], ratio[:, 1])  # one factor per sample by default
    yb = PSFDegrade([4.0, 4.0], max_factor=2.0, per_band=True)(x, gen(10))
    rb = fwhm_from_moments(yb)
    assert (rb[:, 0] - rb[:, 1]).abs().max() > 0.05
    with pytest.raises(Sim2ObsValueError, match="sharper"):
        PSFDegrade([4.0], max_factor=0.8)
    with pytest.raises(Sim2ObsValueError, match="bands"):
        PSFDegrade([4.0, 4.0, 4.0])(x, gen(0))


def test_psf_degrade_from_survey():
    from sim2obs.forward_models.surveys import get_survey

    spec = get_survey("sdss")
    aug = PSFDegrade.from_survey(spec, max_factor=1.3)
    expect = [b.psf_fwhm_arcsec / spec.pixel_scale_arcsec for b in spec.bands]
    np.testing.assert_allclose(aug.fwhm_in_pix.numpy(), expect, rtol=1e-6)


def test_noise_resample_reaches_target_std():
    g = gen(11)
    sigma = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    noise = sigma * torch.randn(8, 2, S, S, generator=g)
    ivar = (1.0 / sigma**2).expand(8, 2, S, S).clone()
    y = NoiseResample(factor_range=(2.0, 2.0))(noise, gen(12), ivar=ivar)
    std = y.std(dim=(0, 2, 3))
    torch.testing.assert_close(std, 2.0 * sigma.flatten(), rtol=0.03, atol=0)
    # random factors stay within range
    y = NoiseResample(factor_range=(1.0, 3.0))(noise, gen(13), ivar=ivar)
    ratio = y.std(dim=(2, 3)) / noise.std(dim=(2, 3))
    assert ((ratio > 0.95) & (ratio < 3.1)).all() and ratio.std() > 0.1


def test_noise_resample_leaves_ivar_zero_pixels_and_needs_ivar():
    x = gaussian(2, 2, flux=10.0)
    ivar = torch.full_like(x, 25.0)
    ivar[:, :, :10] = 0.0
    y = NoiseResample(factor_range=(1.5, 2.0))(x, gen(14), ivar=ivar)
    assert torch.equal(y[:, :, :10], x[:, :, :10])
    assert not torch.equal(y[:, :, 10:], x[:, :, 10:])
    with pytest.raises(Sim2ObsValueError, match="inverse variance"):
        NoiseResample()(x, gen(0))
    with pytest.raises(Sim2ObsValueError, match="broadcast"):
        NoiseResample()(x, gen(0), ivar=torch.ones(3, 5))
    with pytest.raises(Sim2ObsValueError, match="removed"):
        NoiseResample(factor_range=(0.5, 1.0))


# ------------------------------------------------------------------------------ astrophysics

def test_reddening_ratio_exact():
    r = [4.2, 3.3, 2.3]
    x = gaussian(8, 3, flux=3.0) + 0.01
    y = GalacticReddening(r, ebv_max=0.5, ebv_min=0.1)(x, gen(15))
    ratio = (y / x).double()
    # the same factor for every pixel of a band
    torch.testing.assert_close(ratio, ratio[..., :1, :1].expand_as(ratio), rtol=1e-6, atol=0)
    ebv = -2.5 * torch.log10(ratio[..., 0, 0]) / torch.tensor(r, dtype=torch.float64)
    # one E(B-V) per sample shared by all bands, within the range
    torch.testing.assert_close(ebv, ebv[:, :1].expand_as(ebv), rtol=1e-5, atol=0)
    assert ((ebv > 0.1 - 1e-6) & (ebv < 0.5 + 1e-6)).all()


def test_extinction_coefficients_match_schlafly_finkbeiner_2011():
    sf11 = np.array([4.239, 3.303, 2.285, 1.698, 1.263])  # Table 6, R_V = 3.1, SDSS ugriz
    r = extinction_coefficients([f"sdss2010-{b}" for b in "ugriz"])
    np.testing.assert_allclose(r, sf11, rtol=0.10)
    assert np.all(np.diff(r) < 0)  # redder bands are less extinguished
    r_true = extinction_coefficients(["sdss2010-r"], sfd_scale=1.0)
    assert r_true[0] == pytest.approx(r[2] / 0.86)


def test_reddening_from_survey_and_missing_dependency(monkeypatch):
    from sim2obs.forward_models.surveys import get_survey

    aug = GalacticReddening.from_survey(get_survey("sdss"), ebv_max=0.2)
    assert aug.extinction_coeffs.shape == (5,)
    monkeypatch.setitem(sys.modules, "extinction", None)
    with pytest.raises(MissingDependencyError, match="pip install extinction"):
        extinction_coefficients(["sdss2010-r"])


def test_per_survey_tables_give_each_sample_its_surveys_row():
    """A batch mixing two surveys: each sample is blurred / reddened with its own survey's row,
    as the single-survey module with that row would do it (same draws from the same seed)."""
    x = gaussian(6, 3, sigma=2.0, flux=50.0)
    survey = torch.tensor([0, 1, 1, 0, 1, 0])
    fwhm = [[2.0, 2.5, 3.0], [4.0, 4.0, 3.5]]
    coeffs = [[3.6, 2.6, 1.9], [3.2, 2.2, 1.6]]
    for cls, table, kw in ((PSFDegrade, fwhm, {"max_factor": 1.5, "min_factor": 1.2}),
                           (GalacticReddening, coeffs, {"ebv_max": 0.3})):
        y = cls(table, **kw)(x, gen(21), survey=survey)
        for row in (0, 1):
            ref = cls(table[row], **kw)(x, gen(21))
            sel = survey == row
            # PSFDegrade pads for the widest row of its table: the blur differs by < 1e-7 of the flux
            torch.testing.assert_close(y[sel], ref[sel], rtol=0, atol=1e-6)
        assert not torch.allclose(y, cls(table[0], **kw)(x, gen(21)))
    # the FWHM each sample ends with follows its own survey's input FWHM
    psf = gaussian(2, 1, sigma=4.0 / FWHM_PER_SIGMA)  # an unresolved source seen with FWHM 4 px
    y = PSFDegrade([[4.0], [2.0]], max_factor=1.5, min_factor=1.5)(psf, gen(22), survey=torch.tensor([0, 1]))
    # survey 1 believes its PSF is 2 px: it adds sqrt(1.5^2 - 1) x 2 px in quadrature to the 4 px
    expect = torch.tensor([6.0, math.hypot(4.0, 2.0 * math.sqrt(1.25))], dtype=torch.float64)
    torch.testing.assert_close(fwhm_from_moments(y).flatten().double(), expect, rtol=0.01, atol=0)


def test_per_survey_tables_need_the_batch_surveys():
    x = gaussian(4, 2)
    for aug in (PSFDegrade([[2.0, 2.0], [3.0, 3.0]]), GalacticReddening([[3.0, 2.0], [2.5, 1.5]])):
        with pytest.raises(Sim2ObsValueError, match="pass survey="):
            aug(x, gen(0))
        with pytest.raises(Sim2ObsValueError, match="4 integer row indices"):
            aug(x, gen(0), survey=torch.tensor([0, 1]))
        with pytest.raises(Sim2ObsValueError, match="outside the 2 rows"):
            aug(x, gen(0), survey=torch.tensor([0, 1, 2, 0]))
        # Compose hands the batch's survey on
        Compose([aug])(x, gen(0), survey=torch.tensor([0, 1, 1, 0]))
    with pytest.raises(Sim2ObsValueError, match="one row per survey"):
        GalacticReddening(np.ones((2, 2, 2)))


def test_redshift_dimming_flux_and_size():
    from astropy.cosmology import Planck15

    z0, dz = 0.05, 0.1
    x = gaussian(3, 2, sigma=5.0, flux=100.0)
    aug = RedshiftDimming(z_in=z0, max_dz=dz, min_dz=dz)
    y = aug(x, gen(16))
    d_l = Planck15.luminosity_distance([z0, z0 + dz]).value
    d_a = Planck15.angular_diameter_distance([z0, z0 + dz]).value
    expect_flux = (d_l[0] / d_l[1]) ** 2
    ratio = (y.sum((2, 3)) / x.sum((2, 3))).double()
    torch.testing.assert_close(ratio, torch.full_like(ratio, expect_flux), rtol=0.01, atol=0)
    size = fwhm_from_moments(y) / fwhm_from_moments(x)
    torch.testing.assert_close(size, torch.full_like(size, d_a[0] / d_a[1]), rtol=0.03, atol=0)
    # per-galaxy redshifts: a galaxy already far away changes less
    y2 = aug(x, gen(16), redshift=torch.tensor([0.05, 0.5, 1.0]))
    f2 = y2.sum((2, 3))[:, 0]
    assert f2[0] < f2[1] < f2[2]
    with pytest.raises(Sim2ObsValueError, match="redshift"):
        aug(x, gen(0), redshift=torch.tensor([0.1, -1.0, 0.2]))
