"""Augmentations: what each conserves, determinism, dtype and batch handling."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from sim2obs.errors import MissingDependencyError, Sim2ObsValueError
from sim2obs.pretrain.augment import (
    FWHM_PER_SIGMA,
    Compose,
    GalacticReddening,
    NoiseResample,
    PSFDegrade,
    RandomCropResize,
    RandomRot90Flip,
    RandomRotation,
    RandomShift,
    RedshiftDimming,
    extinction_coefficients,
)

S = 64


def gaussian(n=1, b=1, size=S, sigma=3.0, centre=None, q=1.0, flux=1.0, dtype=torch.float32):
    """(n, b, size, size) sampled elliptical Gaussians (axis ratio q along y) of total ``flux``."""
    c = (size - 1) / 2 if centre is None else centre
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                          torch.arange(size, dtype=torch.float64), indexing="ij")
    img = torch.exp(-((x - c) ** 2 / (2 * sigma**2) + (y - c) ** 2 / (2 * (q * sigma) ** 2)))
    img = flux * img / img.sum()
    return img.expand(n, b, size, size).clone().to(dtype)


def moments(img: torch.Tensor):
    """Centroid (x, y) and second moments (xx, yy, xy) over the last two axes."""
    img = img.double()
    h, w = img.shape[-2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                          torch.arange(w, dtype=torch.float64), indexing="ij")
    f = img.sum((-2, -1))
    cx, cy = (img * x).sum((-2, -1)) / f, (img * y).sum((-2, -1)) / f
    dx, dy = x - cx[..., None, None], y - cy[..., None, None]
    xx = (img * dx**2).sum((-2, -1)) / f
    yy = (img * dy**2).sum((-2, -1)) / f
    xy = (img * dx * dy).sum((-2, -1)) / f
    return cx, cy, xx, yy, xy


def fwhm_from_moments(img):
    _, _, xx, yy, _ = moments(img)
    return FWHM_PER_SIGMA * torch.sqrt((xx + yy) / 2)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mixed_batch(dtype=torch.float32):
    """Galaxy, pure noise, empty stamp, off-centre point source; 3 bands."""
    g = gen(123)
    x = torch.zeros(4, 3, S, S, dtype=torch.float64)
    x[0] = gaussian(1, 3, sigma=4.0, flux=50.0)[0].double()
    x[1] = 0.1 * torch.randn(3, S, S, generator=g, dtype=torch.float64)
    x[3, :, 20, 40] = 5.0
    return x.to(dtype)


def all_augs():
    return [
        RandomRot90Flip(),
        RandomRotation(180.0),
        RandomShift(1.5, "fourier"),
        RandomShift(1.5, "bilinear"),
        RandomCropResize((0.7, 1.0)),
        PSFDegrade([3.0, 3.5, 4.0], max_factor=1.8),
        NoiseResample(ivar=torch.full((3, 1, 1), 100.0), factor_range=(1.0, 2.0)),
        GalacticReddening([3.3, 2.3, 1.7], ebv_max=0.3),
        RedshiftDimming(z_in=0.05, max_dz=0.2),
    ]


# ------------------------------------------------------------------------------ geometric

def test_rot90_flip_is_exact_dihedral_permutation():
    x = torch.randn(64, 2, 16, 16, generator=gen(1))
    y = RandomRot90Flip()(x, gen(2))
    torch.testing.assert_close(y.sum((2, 3)), x.sum((2, 3)), rtol=0, atol=1e-5)
    seen = set()
    for i in range(len(x)):
        variants = [torch.rot90(x[i].flip(-1) if c >= 4 else x[i], c % 4, dims=(-2, -1)) for c in range(8)]
        match = [c for c, v in enumerate(variants) if torch.equal(v, y[i])]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(range(8))  # every symmetry occurs
    # sorted pixel values are identical: a pure permutation
    torch.testing.assert_close(y.flatten(1).sort().values, x.flatten(1).sort().values, rtol=0, atol=0)


def test_rot90_flip_non_square_keeps_shape():
    x = torch.randn(16, 1, 8, 12, generator=gen(1))
    y = RandomRot90Flip()(x, gen(3))
    assert y.shape == x.shape
    torch.testing.assert_close(y.sum((2, 3)), x.sum((2, 3)))


def test_rotation_conserves_flux_and_shape_of_source():
    x = gaussian(16, 2, sigma=4.0, q=0.5, flux=10.0)
    y = RandomRotation(180.0)(x, gen(4))
    ratio = y.sum((2, 3)) / x.sum((2, 3))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.01)
    # ellipticity modulus conserved (bilinear smoothing rounds it slightly), orientation varies
    def ellipticity(img):
        _, _, xx, yy, xy = moments(img)
        return torch.sqrt((xx - yy) ** 2 + 4 * xy**2) / (xx + yy), xx, yy, xy

    e, xx, yy, xy = ellipticity(y)
    e0 = ellipticity(x)[0]
    assert torch.allclose(e, e0, rtol=0.03)
    angles = 0.5 * torch.atan2(2 * xy, xx - yy)
    assert angles.std() > 0.3
    # zero angle is the identity
    torch.testing.assert_close(RandomRotation(0.0)(x, gen(0)), x, rtol=0, atol=1e-6)


def test_rotation_small_angle_limit():
    x = gaussian(4, 1, sigma=3.0, q=0.5)
    _, _, xx, yy, xy = moments(RandomRotation(10.0)(x, gen(5)))
    angles = torch.rad2deg(0.5 * torch.atan2(2 * xy, xx - yy))
    assert (angles.abs() <= 10.5).all()


@pytest.mark.parametrize("method,tol", [("fourier", 1e-5), ("bilinear", 0.01)])
def test_shift_conserves_flux(method, tol):
    x = gaussian(8, 2, sigma=3.0, flux=7.0)
    y = RandomShift(2.0, method)(x, gen(6))
    ratio = y.sum((2, 3)) / x.sum((2, 3))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=tol)


def test_shift_moves_centroid_by_the_same_amount_in_both_methods():
    x = gaussian(8, 1, sigma=3.0)
    yf = RandomShift(1.5, "fourier")(x, gen(7))
    yb = RandomShift(1.5, "bilinear")(x, gen(7))
    cx0, cy0, *_ = moments(x)
    cxf, cyf, *_ = moments(yf)
    cxb, cyb, *_ = moments(yb)
    dxf, dyf = cxf - cx0, cyf - cy0
    assert (dxf.abs() <= 1.5 + 1e-4).all() and (dyf.abs() <= 1.5 + 1e-4).all()
    assert dxf.abs().max() > 0.3
    torch.testing.assert_close(cxb - cx0, dxf, atol=1e-3, rtol=0)
    torch.testing.assert_close(cyb - cy0, dyf, atol=1e-3, rtol=0)
    torch.testing.assert_close(RandomShift(0.0)(x, gen(0)), x, atol=1e-6, rtol=0)


def test_crop_resize_flux_and_size():
    x = gaussian(8, 1, sigma=3.0, flux=4.0)
    y = RandomCropResize((0.6, 0.9), jitter=False)(x, gen(8))
    ratio = y.sum((2, 3)) / x.sum((2, 3))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.01)
    grown = fwhm_from_moments(y) / fwhm_from_moments(x)
    assert ((grown > 1.1) & (grown < 1.0 / 0.6 + 0.02)).all()
    y_sb = RandomCropResize((0.6, 0.9), jitter=False, conserve_flux=False)(x, gen(8))
    torch.testing.assert_close(y_sb, y / (y.sum((2, 3), keepdim=True) / y_sb.sum((2, 3), keepdim=True)))
    # peak surface brightness kept without flux conservation
    assert torch.allclose(y_sb.amax((2, 3)), x.amax((2, 3)), rtol=0.02)
    torch.testing.assert_close(RandomCropResize((1.0, 1.0))(x, gen(0)), x, atol=1e-6, rtol=0)
    with pytest.raises(Sim2ObsValueError):
        RandomCropResize((0.5, 1.2))


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


# ------------------------------------------------------------------------------ generic

@pytest.mark.parametrize("aug", all_augs(), ids=lambda a: type(a).__name__)
def test_deterministic_with_seeded_generator(aug):
    x = mixed_batch()
    a, b = aug(x, gen(42)), aug(x, gen(42))
    assert torch.equal(a, b)
    assert not torch.equal(aug(x, gen(43)), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aug", all_augs(), ids=lambda a: type(a).__name__)
def test_dtype_shape_and_mixed_batch(aug, dtype):
    x = mixed_batch(dtype)
    y = aug(x, gen(1))
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    assert torch.isfinite(y.float()).all()
    if not isinstance(aug, NoiseResample):
        assert float(y[2].float().abs().max()) < 1e-3  # an empty stamp stays empty


@pytest.mark.parametrize("aug", all_augs(), ids=lambda a: type(a).__name__)
def test_channels_last_preserved(aug):
    x = mixed_batch().contiguous(memory_format=torch.channels_last)
    y = aug(x, gen(2))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, aug(x.contiguous(), gen(2)), rtol=1e-5, atol=1e-6)


def test_samples_are_independent_of_batch_mates():
    x = mixed_batch()
    for aug in (PSFDegrade([3.0, 3.5, 4.0], 1.6, 1.6), GalacticReddening([3.0, 2.0, 1.0], 0.2, 0.2),
                RedshiftDimming(0.05, 0.1, 0.1), RandomRotation(0.0)):
        whole = aug(x, gen(0))
        for i in range(len(x)):
            torch.testing.assert_close(whole[i:i + 1], aug(x[i:i + 1], gen(0)), rtol=1e-5, atol=1e-6)


def test_compose_passes_context_and_checks_order():
    x = mixed_batch()
    ivar = torch.full_like(x, 100.0)
    pipeline = Compose([
        NoiseResample(factor_range=(1.0, 1.5)),
        PSFDegrade([3.0, 3.5, 4.0], 1.5),
        GalacticReddening([3.0, 2.0, 1.0], 0.1),
        RandomRot90Flip(),
        RandomShift(0.5),
        RedshiftDimming(0.05, 0.1),
    ])
    a = pipeline(x, gen(3), ivar=ivar, redshift=torch.full((4,), 0.08))
    b = pipeline(x, gen(3), ivar=ivar, redshift=torch.full((4,), 0.08))
    assert torch.equal(a, b) and a.shape == x.shape
    assert "RandomShift" in repr(pipeline)
    with pytest.raises(Sim2ObsValueError, match="before every geometric"):
        Compose([RandomRot90Flip(), NoiseResample()])
    with pytest.raises(Sim2ObsValueError, match=r"\(N, B, H, W\)"):
        RandomRot90Flip()(torch.zeros(3, 8, 8), gen(0))


def test_global_rng_when_no_generator():
    torch.manual_seed(7)
    a = RandomRotation()(mixed_batch())
    torch.manual_seed(7)
    b = RandomRotation()(mixed_batch())
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_cpu_and_cuda_generators():
    x = mixed_batch().cuda()
    ivar = torch.full_like(x, 100.0)
    for g in (gen(0), torch.Generator(device="cuda").manual_seed(0)):
        for aug in all_augs():
            aug = aug.cuda()
            kw = {"ivar": ivar} if isinstance(aug, NoiseResample) else {}
            y = aug(x, g, **kw)
            assert y.is_cuda and y.shape == x.shape and torch.isfinite(y).all()
    # CPU generator: same numbers as on the CPU
    cpu = RandomRotation()(mixed_batch(), gen(5))
    gpu = RandomRotation()(mixed_batch().cuda(), gen(5))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(gpu.sum()))
