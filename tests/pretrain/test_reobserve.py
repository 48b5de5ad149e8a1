"""Reobserve: the view's noise variance is s^2 / ivar at every pixel whatever the blur and dust;
flux, FWHM and colours change as the separate augmentations change them."""

from __future__ import annotations

import math

import pytest
import torch

from sim2obs.errors import Sim2ObsValueError
from sim2obs.pretrain.augment import FWHM_PER_SIGMA, Compose, NoiseResample, PSFDegrade
from sim2obs.pretrain.reobserve import Reobserve

S = 48
FWHM = [4.7, 4.5, 3.6]  # HSC g, r, i seeing in 0.168" pixels (0.79", 0.75", 0.61")
R = [3.6, 2.6, 1.9]  # extinction coefficients of the order of HSC g, r, i


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def white_noise(n=256, b=3, sigma=0.05, seed=1):
    x = sigma * torch.randn(n, b, S, S, generator=gen(seed))
    return x, torch.full_like(x, sigma**-2)


def point_source(n, b, fwhm_pix, flux=1.0):
    """(n, b, S, S) sampled circular Gaussians of the given FWHM (pixels) and total flux."""
    c = (S - 1) / 2
    y, x = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64),
                          indexing="ij")
    s = fwhm_pix / FWHM_PER_SIGMA
    img = torch.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * s**2))
    return (flux * img / img.sum()).expand(n, b, S, S).float().clone()


def fwhm_of(img):
    """FWHM from second moments (circular Gaussian), per (n, b)."""
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64),
                            indexing="ij")
    w = img.double()
    f = w.sum((2, 3))
    mx, my = (w * xx).sum((2, 3)) / f, (w * yy).sum((2, 3)) / f
    var = ((w * ((xx - mx[..., None, None]) ** 2 + (yy - my[..., None, None]) ** 2)).sum((2, 3)) / f) / 2
    return FWHM_PER_SIGMA * var.sqrt()


@pytest.mark.parametrize("s", [1.0, 1.5])
def test_noise_level_is_the_target_at_every_pixel(s):
    """White noise in: the view's pixel sigma is s x the input's, in the centre and at the edges
    (where the zero-padded blur keeps less variance), in every band, after worse seeing and dust
    -- where PSFDegrade alone leaves about a quarter of it."""
    x, ivar = white_noise()
    aug = Reobserve(FWHM, R, seeing_factor=(1.3, 1.3), ebv_max=0.1, noise_factor=(s, s))
    y = aug(x, gen(2), ivar=ivar)
    # 256 x 48 x 48 samples per band: relative error of a std ~ 1/sqrt(2 x 589824) ~ 0.1 %
    torch.testing.assert_close(y.std(dim=(0, 2, 3)) / 0.05, torch.full((3,), s), rtol=0.01, atol=0)
    edge = y[..., :, :2].std() / 0.05  # within 2 px of a border: the blur keeps ~half the variance there
    assert edge == pytest.approx(s, rel=0.02)
    smoothed = PSFDegrade(FWHM, max_factor=1.3, min_factor=1.3)(x, gen(2)).std() / 0.05
    assert smoothed < 0.35  # what the view would have without the top-up


def test_signal_is_blurred_dimmed_and_flux_kept():
    """Noise-free pixels (ivar = 0 gets no noise): the galaxy part of the view is the blurred
    and dimmed input -- FWHM f x the input's, band flux ratios 10^(-0.4 (R_b - R_c) E(B-V))."""
    n = 64
    x = point_source(n, 3, 4.0, flux=10.0)
    fwhm = [4.0, 4.0, 4.0]
    y = Reobserve(fwhm, R, seeing_factor=(1.5, 1.5), ebv_max=0.2)(x, gen(3), ivar=torch.zeros_like(x))
    torch.testing.assert_close(fwhm_of(y), torch.full((n, 3), 6.0, dtype=torch.float64), rtol=2e-3, atol=0)
    flux = y.double().sum((2, 3))
    ebv = -2.5 * torch.log10(flux / 10.0) / torch.tensor(R, dtype=torch.float64)
    torch.testing.assert_close(ebv, ebv[:, :1].expand_as(ebv), rtol=1e-4, atol=1e-7)  # one E(B-V) per galaxy
    assert (ebv >= -1e-6).all() and (ebv <= 0.2 + 1e-6).all() and ebv.std() > 0.02
    # without dust and blur tables only noise is added: the mean of many views is the input
    y = Reobserve(noise_factor=(1.5, 1.5))(x[:1].expand(4096, 3, S, S), gen(4), ivar=torch.full_like(x[:1], 400.0))
    torch.testing.assert_close(y.mean(0), x[0], rtol=0, atol=4 * 1.5 * 0.05 * math.sqrt(1.25) / 64)


def test_masked_pixels_get_no_noise_and_draws_are_reproducible():
    x, ivar = white_noise(n=4)
    ivar[:, :, :5] = 0.0
    aug = Reobserve(None, None, noise_factor=(1.5, 2.0))  # noise only: the blur would mix rows
    y = aug(x, gen(5), ivar=ivar)
    assert torch.equal(y[:, :, :5], x[:, :, :5])
    assert torch.equal(aug(x, gen(5), ivar=ivar), y)
    assert not torch.equal(aug(x, gen(6), ivar=ivar), y)
    # without blur or dust Reobserve is NoiseResample (same draws)
    torch.testing.assert_close(y, NoiseResample(factor_range=(1.5, 2.0))(x, gen(5), ivar=ivar), rtol=0, atol=1e-7)


def centroid(img):
    """(x, y) flux-weighted centroids (pixels), per (n, b)."""
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64),
                            indexing="ij")
    w = img.double()
    f = w.sum((2, 3))
    return (w * xx).sum((2, 3)) / f, (w * yy).sum((2, 3)) / f


def test_folded_shift_moves_the_galaxy_and_keeps_its_flux_and_shape():
    """max_shift: a band-limited sub-pixel translation inside the blur's matrices. Noise-free
    (ivar = 0), no extra seeing: every band of a galaxy moves by the same (dx, dy) in
    [-1, 1]^2, spread uniformly over samples; flux is kept and the output is the sampled
    Gaussian at its new centre (a 5 px FWHM source is well sampled, so sinc interpolation is
    exact to ~1e-6 of the peak)."""
    n, fwhm = 256, 5.0
    x = point_source(n, 3, fwhm, flux=10.0)
    aug = Reobserve([fwhm] * 3, None, seeing_factor=(1.0, 1.0), max_shift=1.0)
    y = aug(x, gen(11), ivar=torch.zeros_like(x))
    torch.testing.assert_close(y.double().sum((2, 3)), torch.full((n, 3), 10.0, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    cx, cy = centroid(y)
    c = (S - 1) / 2
    dx, dy = cx - c, cy - c
    torch.testing.assert_close(dx, dx[:, :1].expand_as(dx), rtol=0, atol=1e-5)  # one shift per galaxy
    torch.testing.assert_close(dy, dy[:, :1].expand_as(dy), rtol=0, atol=1e-5)
    # the draws, rebuilt from the same generator in Reobserve's order (noise factor, seeing
    # factor, then the shift): content moves by +dx along x (the last axis) and +dy along y
    g = gen(11)
    aug.noise.draw_factor(n, 3, g, x.device, torch.float32)
    aug.psf.draw_sigma(n, g, x.device, torch.float32)
    drawn = -1.0 + 2.0 * torch.rand((n, 2), generator=g)
    torch.testing.assert_close(dx[:, 0], drawn[:, 0].double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(dy[:, 0], drawn[:, 1].double(), rtol=0, atol=1e-5)
    for d in (dx[:, 0], dy[:, 0]):
        assert d.abs().max() <= 1.0 + 1e-5
        assert d.std() == pytest.approx(1 / math.sqrt(3), rel=0.12)  # U(-1, 1): sigma 0.577
    assert torch.corrcoef(torch.stack([dx[:, 0], dy[:, 0]]))[0, 1].abs() < 0.2  # independent axes
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64),
                            indexing="ij")
    sig = fwhm / FWHM_PER_SIGMA
    model = torch.exp(-((xx - cx[:, :1, None, None]) ** 2 + (yy - cy[:, :1, None, None]) ** 2) / (2 * sig**2))
    model = 10.0 * model / (2 * math.pi * sig**2)
    assert (y.double() - model).abs().max() < 1e-5 * model.max()
    # with worse seeing too: the FWHM still reaches f x the input's
    y = Reobserve([fwhm] * 3, None, seeing_factor=(1.4, 1.4), max_shift=1.0)(x, gen(12), ivar=torch.zeros_like(x))
    torch.testing.assert_close(fwhm_of(y), torch.full((n, 3), 1.4 * fwhm, dtype=torch.float64), rtol=2e-3, atol=0)
    with pytest.raises(Sim2ObsValueError, match="max_shift"):
        Reobserve(FWHM, R, max_shift=-1.0)
    with pytest.raises(Sim2ObsValueError, match="after the geometric transform Reobserve"):
        Compose([aug, NoiseResample()])  # the stamp moved against the ivar map the next one reads


@pytest.mark.parametrize("fwhm", [None, FWHM])
def test_folded_shift_keeps_the_noise_level_at_every_pixel(fwhm):
    """The interpolation of the shift smooths the noise (half-way between pixels a band-limited
    shift of a zero-padded stamp keeps less variance near its edges); the top-up brings every
    pixel back to s^2 / ivar, with or without the blur."""
    x, ivar = white_noise(n=1024)
    aug = Reobserve(fwhm, R, seeing_factor=(1.3, 1.3), noise_factor=(1.2, 1.2), max_shift=1.0)
    y = aug(x, gen(13), ivar=ivar)
    per_pixel = y.std(dim=0) / 0.05  # (3, S, S) from 1024 views: ~2.2 % scatter per pixel
    assert per_pixel.mean().item() == pytest.approx(1.2, rel=0.005)
    for edge in (per_pixel[..., :, 0], per_pixel[..., 0, :], per_pixel[..., :, -1], per_pixel[..., -1, :]):
        assert edge.mean().item() == pytest.approx(1.2, rel=0.01)
    assert (per_pixel - 1.2).abs().max() < 0.12  # ~5 sigma of the per-pixel scatter


@pytest.mark.parametrize("n_pad", [27, 28])
def test_toeplitz_matrices_are_the_zero_padded_fft_map(n_pad):
    """toeplitz(gaussian_kernel(sigma, n_pad, shift), n) @ x equals multiplying the FFT of the
    zero-padded x by the transfer function and cropping (for an even n_pad the real part of the
    phase on the Nyquist frequency); toeplitz_row_power is the rows' sum of squares."""
    from sim2obs.pretrain.augment import gaussian_kernel, toeplitz, toeplitz_row_power

    n = 20
    sigma = torch.tensor([[0.0, 0.7], [1.3, 2.0]], dtype=torch.float64)
    shift = torch.tensor([0.4, -0.9], dtype=torch.float64)
    k = gaussian_kernel(sigma, n_pad, shift)
    m = toeplitz(k, n)
    assert m.shape == (2, 2, n, n)
    x = torch.randn(2, 2, n, 1, generator=gen(14), dtype=torch.float64)
    freq = torch.fft.rfftfreq(n_pad, dtype=torch.float64)
    transfer = torch.polar(torch.exp(-2 * math.pi**2 * sigma[..., None] ** 2 * freq**2),
                           -2 * math.pi * shift[:, None, None] * freq)
    ref = torch.fft.irfft(torch.fft.rfft(torch.nn.functional.pad(x[..., 0], (0, n_pad - n))) * transfer, n=n_pad)
    torch.testing.assert_close((m @ x)[..., 0], ref[..., :n], rtol=0, atol=1e-12)
    torch.testing.assert_close(toeplitz_row_power(k, n), m.square().sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(k.sum(-1), torch.ones(2, 2, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(Sim2ObsValueError, match="wrap"):
        toeplitz(k, n_pad + 1)


def test_noise_map_that_varies_within_a_stamp():
    """ivar steps by 16x across the stamp (a depth step) and a masked stripe: the view's noise
    sigma follows s / sqrt(ivar) pixel by pixel, also next to the step, where a formula that
    assumes the pixel's own noise level all around is 12 % high; masked pixels get no noise."""
    n = 2048
    sig = torch.full((1, 1, S, S), 0.05)
    sig[..., S // 2:] = 0.2  # right half four times as noisy
    x = sig * torch.randn(n, 1, S, S, generator=gen(30))
    ivar = (1.0 / sig**2).expand(n, 1, S, S).clone()
    ivar[..., 10:14, :] = 0.0  # a masked stripe (no data, no noise in the input)
    x[..., 10:14, :] = 0.0
    # an extra blur of sigma 0.8 px keeps ~1/5 of the input variance: neighbours across the step matter
    y = Reobserve([4.5], None, seeing_factor=(1.1, 1.1), noise_factor=(1.2, 1.2))(x, gen(31), ivar=ivar)
    ratio = y.std(0)[0] / (1.2 * sig[0, 0])
    # 2048 samples: one pixel's std is good to ~1.6 %, a mean over 20 rows to ~0.4 %
    torch.testing.assert_close(ratio[20:40], torch.ones(20, S), rtol=0, atol=0.07)
    torch.testing.assert_close(ratio[20:40].mean(0), torch.ones(S), rtol=0, atol=0.02)
    torch.testing.assert_close(ratio[14:17].mean(1), torch.ones(3), rtol=0, atol=0.02)  # next to the mask
    # masked rows: only the blurred noise of their neighbours reaches them, none is added
    assert float(y.std(0)[0, 11:13].max()) < 0.5 * 1.2 * 0.2


def test_noise_map_that_varies_with_the_shift_and_the_rotation():
    """The exact path (ivar varying within a stamp) with the folded shift, and with rotation:
    the depth step keeps its place (no rotation) or turns with the galaxy, and the view's noise
    follows s / sqrt(ivar) of the pixel it came from."""
    n = 2048
    sig = torch.full((1, 1, S, S), 0.05)
    sig[..., S // 2:] = 0.2
    x = sig * torch.randn(n, 1, S, S, generator=gen(40))
    ivar = (1.0 / sig**2).expand(n, 1, S, S)
    y = Reobserve([4.5], None, seeing_factor=(1.1, 1.1), noise_factor=(1.2, 1.2), max_shift=1.0)(
        x, gen(41), ivar=ivar)
    ratio = y.std(0)[0] / (1.2 * sig[0, 0])
    # away from the step by more than the shift: each half at its own level (~0.4 % per column mean)
    torch.testing.assert_close(ratio[:, 2:S // 2 - 3].mean(0), torch.ones(S // 2 - 5), rtol=0, atol=0.02)
    torch.testing.assert_close(ratio[:, S // 2 + 3:].mean(0), torch.ones(S // 2 - 3), rtol=0, atol=0.02)
    # a column map (1, W): the same step, given as one row per stamp band, through the rotation
    col = (1.0 / sig[0, 0, :1, :] ** 2)  # (1, S)
    r = Reobserve(None, None, noise_factor=(1.0, 1.0), rotate=True, max_shift=0.0)(x, gen(42), ivar=col)
    # noise only: per sample the noisy half is wherever the step turned (the rotation's top-up
    # follows it), so over many samples every pixel inside the inscribed circle has the mean of
    # the two variances -- with an unturned map the two halves would differ 16x
    var = r.square().mean(0)[0]
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    inner = ((xx - (S - 1) / 2) ** 2 + (yy - (S - 1) / 2) ** 2).sqrt() < S / 2 - 2
    expected = (0.05**2 + 0.2**2) / 2
    assert var[inner].mean().item() == pytest.approx(expected, rel=0.03)
    left, right = var[:, : S // 2 - 4][inner[:, : S // 2 - 4]].mean(), var[:, S // 2 + 4:][inner[:, S // 2 + 4:]].mean()
    assert float(left / right) == pytest.approx(1.0, abs=0.1)  # not 16: the map turned with the stamp


@pytest.mark.parametrize("ivar_shape", ["scalar", "per band", "per column"])
def test_ivar_of_any_broadcastable_shape(ivar_shape):
    """A scalar, a (B, 1, 1) per-band value or a (W,) column map broadcast like a full map."""
    x, full = white_noise(n=8, sigma=0.05)
    ivar = {"scalar": torch.tensor(400.0), "per band": torch.full((3, 1, 1), 400.0),
            "per column": torch.full((S,), 400.0)}[ivar_shape]
    aug = Reobserve(FWHM, R, max_shift=1.0)
    torch.testing.assert_close(aug(x, gen(50), ivar=ivar), aug(x, gen(50), ivar=full), rtol=0, atol=1e-6)


def test_float64_in_float64_out():
    """float64 stays float64 (its noise drawn in float64) at the target noise level."""
    x, ivar = white_noise()
    y = Reobserve(FWHM, R, seeing_factor=(1.3, 1.3), noise_factor=(1.5, 1.5), max_shift=1.0)(
        x.double(), gen(51), ivar=ivar.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.std(dim=(0, 2, 3)) / 0.05, torch.full((3,), 1.5, dtype=torch.float64),
                               rtol=0.01, atol=0)


def test_per_survey_tables_and_errors():
    x, ivar = white_noise(n=6)
    survey = torch.tensor([0, 1, 0, 1, 1, 0])
    tables = ([FWHM, [3.0, 3.0, 3.0]], [R, [3.2, 2.2, 1.6]])
    aug = Reobserve(*tables, seeing_factor=(1.2, 1.3))
    y = Compose([aug])(x, gen(7), ivar=ivar, survey=survey)
    for row in (0, 1):  # each sample as its own survey's single-row Reobserve makes it (same draws)
        ref = Reobserve(tables[0][row], tables[1][row], seeing_factor=(1.2, 1.3))(x, gen(7), ivar=ivar)
        # the table pads for its widest row: edge pixels differ by < 4e-4 of the noise sigma
        torch.testing.assert_close(y[survey == row], ref[survey == row], rtol=0, atol=2e-5)
    with pytest.raises(Sim2ObsValueError, match="pass survey="):
        aug(x, gen(7), ivar=ivar)
    with pytest.raises(Sim2ObsValueError, match="inverse variance"):
        Reobserve(FWHM, R)(x, gen(0))
    with pytest.raises(Sim2ObsValueError, match="3 bands but the batch has 2"):
        Reobserve(FWHM, None)(x[:, :2], gen(0), ivar=ivar[:, :2])
    with pytest.raises(Sim2ObsValueError, match="broadcast"):
        Reobserve(FWHM, R)(x, gen(0), ivar=torch.ones(5, 7))
    with pytest.raises(Sim2ObsValueError, match="sharper"):
        Reobserve(FWHM, R, seeing_factor=(0.8, 1.2))
    with pytest.raises(Sim2ObsValueError, match="removed"):
        Reobserve(FWHM, R, noise_factor=(0.5, 1.0))
    # half precision in, half precision out (computed in float32)
    h = Reobserve(FWHM, R)(x.to(torch.bfloat16), gen(8), ivar=ivar)
    assert h.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ rotation

def test_bilinear_kept_variance_matches_resampled_white_noise():
    """The predicted per-pixel variance of a bilinear resampling equals that of 3000 resampled
    unit white-noise images (sampling error of a variance: sqrt(2/3000) ~ 2.6 %)."""
    import torch.nn.functional as F

    from sim2obs.pretrain.augment import RandomRotation
    from sim2obs.pretrain.reobserve import bilinear_kept_variance

    h, w = 24, 30
    theta = RandomRotation(180.0).draw_theta(1, h, w, gen(9), torch.device("cpu"))
    x = torch.randn(3000, 1, h, w, generator=gen(10))
    for mode in ("zeros", "reflection", "border"):
        grid = F.affine_grid(theta.expand(3000, 2, 3), [3000, 1, h, w], align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode=mode, align_corners=False)
        pred = bilinear_kept_variance(theta, h, w, mode)[0, 0]
        # 1/4 (half-way between pixels on both axes) to 1; 0 outside the stamp with zeros padding
        assert pred.min() >= (0.0 if mode == "zeros" else 0.25 - 1e-6) and pred.max() <= 1.0 + 1e-6
        torch.testing.assert_close(y.var(0)[0], pred, rtol=0, atol=0.12)  # max of 720 pixels: ~4.5 sigma
        assert abs(float((y.var(0)[0] - pred).mean())) < 0.01
    with pytest.raises(Sim2ObsValueError, match="padding_mode"):
        bilinear_kept_variance(theta, h, w, "wrap")


@pytest.mark.parametrize("s", [1.0, 1.5])
def test_rotated_views_keep_the_noise_level(s):
    """reobserve-rotate: after an arbitrary rotation (which alone leaves ~0.67 of the noise
    sigma) and worse seeing, the view's noise is s x the input's within 3 %, corners included."""
    x, ivar = white_noise()
    y = Reobserve(FWHM, R, seeing_factor=(1.0, 1.3), noise_factor=(s, s), rotate=True)(x, gen(11), ivar=ivar)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)) / 0.05, torch.full((3,), s), rtol=0.03, atol=0)
    assert float(y[..., :6, :6].std() / 0.05) == pytest.approx(s, rel=0.03)


def test_rotation_turns_the_galaxy_and_keeps_its_flux_and_size():
    n, c = 64, (S - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64),
                            indexing="ij")
    img = torch.exp(-((xx - c) ** 2 / (2 * 5.0**2) + (yy - c) ** 2 / (2 * 2.0**2)))  # elongated along x
    x = (100.0 * img / img.sum()).expand(n, 1, S, S).float().clone()
    y = Reobserve(noise_factor=(1.0, 1.0), rotate=True)(x, gen(12), ivar=torch.zeros_like(x)).double()
    flux = y.sum((2, 3))
    torch.testing.assert_close(flux, torch.full_like(flux, 100.0), rtol=3e-3, atol=0)  # bilinear: ~1e-3
    m = [(y * q).sum((2, 3)) / flux for q in (xx, yy)]
    vx = (y * (xx - m[0][..., None, None]) ** 2).sum((2, 3)) / flux
    vy = (y * (yy - m[1][..., None, None]) ** 2).sum((2, 3)) / flux
    # trace of the second moments (size) is kept; its split between x and y (orientation) is not
    # (sampled Gaussian: 5^2 + 2^2; bilinear smoothing adds f(1 - f) <= 1/4 px^2 per axis)
    torch.testing.assert_close(vx + vy, torch.full_like(vx, 5.0**2 + 2.0**2 + 0.25), rtol=0.01, atol=0)
    assert (vx < vy).any() and (vx > vy).any()
    torch.testing.assert_close(torch.stack(m), torch.full_like(torch.stack(m), c), rtol=0, atol=0.05)


def test_rotation_turns_the_ivar_map_and_is_a_geometric_first_step():
    """ivar = 0 in a central disc: no noise is added inside the (rotation-invariant) disc; an
    ivar reader after the rotation is refused by Compose."""
    x = torch.zeros(8, 2, S, S)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    r = ((xx - (S - 1) / 2) ** 2 + (yy - (S - 1) / 2) ** 2).sqrt()
    ivar = torch.where(r < 8, 0.0, 400.0).expand(8, 2, S, S).clone()
    y = Reobserve(noise_factor=(1.2, 1.2), rotate=True)(x, gen(13), ivar=ivar)
    assert torch.equal(y[..., r < 6], torch.zeros_like(y[..., r < 6]))
    assert (y[..., r > 10] != 0).all()
    aug = Reobserve(noise_factor=(1.2, 1.2), rotate=True)
    Compose([aug])(x, gen(0), ivar=ivar)  # reads ivar at its own input: fine
    with pytest.raises(Sim2ObsValueError, match="after the geometric transform Reobserve"):
        Compose([aug, NoiseResample()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rotate", [False, True])
def test_on_cuda_with_cpu_and_cuda_generators(rotate):
    """On the GPU: a CPU generator gives the CPU's views (to float32 rounding of the matrix
    products), a CUDA generator gives views at the target noise level."""
    x, ivar = white_noise()
    aug = Reobserve(FWHM, R, noise_factor=(1.2, 1.2), rotate=rotate, max_shift=1.0)
    cpu = aug(x, gen(60), ivar=ivar)
    gpu = aug.cuda()(x.cuda(), gen(60), ivar=ivar.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
    own = aug(x.cuda(), torch.Generator(device="cuda").manual_seed(60), ivar=ivar.cuda())
    assert own.is_cuda
    assert own.std().item() / 0.05 == pytest.approx(1.2, rel=0.03)
