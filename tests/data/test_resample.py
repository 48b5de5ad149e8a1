"""Resampling real cutouts onto a survey grid: flux conserved, source recentred, crops exact."""

import numpy as np
import pytest

from sim2obs.data.resample import (
    _crop,
    _resampling_matrix,
    brightest_near_centre,
    resample_flux,
    resample_variance,
)
from sim2obs.errors import Sim2ObsValueError


def _galsim_draw(arr, scale_in, scale_out, stamp, centre, interpolant, method):
    """The reference: ``galsim.InterpolatedImage`` of ``arr`` drawn with ``method`` so that input
    pixel ``centre`` lands on output pixel (stamp // 2, stamp // 2)."""
    import galsim

    h, w = arr.shape
    ii = galsim.InterpolatedImage(galsim.Image(np.ascontiguousarray(arr, dtype=np.float64), scale=scale_in),
                                  normalization="flux", x_interpolant=interpolant,
                                  calculate_stepk=False, calculate_maxk=False)
    dx, dy = (centre[1] - (w - 1) / 2) * scale_in, (centre[0] - (h - 1) / 2) * scale_in
    return ii.shift(-dx, -dy).drawImage(nx=stamp, ny=stamp, scale=scale_out, method=method,
                                        use_true_center=False).array.astype(np.float64)


def _gaussian(n, centre_yx, sigma_pix, flux=100.0):
    y, x = np.mgrid[:n, :n].astype(float)
    img = np.exp(-((y - centre_yx[0]) ** 2 + (x - centre_yx[1]) ** 2) / (2 * sigma_pix**2))
    return flux * img / img.sum()


def _centroid(img):
    y, x = np.mgrid[: img.shape[0], : img.shape[1]].astype(float)
    return (img * y).sum() / img.sum(), (img * x).sum() / img.sum()


@pytest.mark.parametrize("scale_in, scale_out", [(0.1, 0.168), (0.168, 0.1), (0.05, 0.2)])
def test_flux_conserved_and_source_recentred(scale_in, scale_out):
    """A Gaussian of 0.5 arcsec sigma, off centre, drawn onto another pixel scale: total flux kept
    to 0.1 % (normalization='flux'; integrated over the new pixel when coarser), its centroid on
    the output's centre pixel to 0.02 px, and its width in arcsec unchanged to 2 %."""
    n = int(round(8.0 / scale_in))  # an 8 arcsec input stamp
    sigma_pix = 0.5 / scale_in
    centre = (n / 2 + 0.73 / scale_in, n / 2 - 0.46 / scale_in)  # 0.9 arcsec off centre
    img = _gaussian(n, centre, sigma_pix)
    stamp = 48
    out = resample_flux(img, scale_in, scale_out, stamp, centre)
    assert out.shape == (stamp, stamp)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-3)
    cy, cx = _centroid(out)
    assert cy == pytest.approx(stamp // 2, abs=0.02) and cx == pytest.approx(stamp // 2, abs=0.02)
    y, x = np.mgrid[:stamp, :stamp].astype(float)
    var_pix = (out * ((y - cy) ** 2 + (x - cx) ** 2)).sum() / out.sum() / 2
    # the coarser pixel adds its box variance (1/12 px^2) in quadrature when integrated over
    box = 1.0 / 12.0 if scale_out > scale_in else 0.0
    sigma_arcsec = np.sqrt(var_pix - box) * scale_out
    assert sigma_arcsec == pytest.approx(0.5, rel=0.02)


@pytest.mark.parametrize("scale_in, scale_out, centre", [(0.1, 0.168, (12.3, 11.6)), (0.1, 0.3, (12.0, 11.5))])
def test_downsampling_is_galsims_pixel_integrated_drawing(scale_in, scale_out, centre):
    """The separable integration is the same linear map as GalSim drawing the InterpolatedImage
    with the pixel response (method 'auto', an FFT of the fine grid: ~1 s and ~1 GB even for
    these 24-pixel cutouts). Random pixel values in [-1, 1] away from the cutout's edges give the
    same image to GalSim's FFT accuracy (~3e-6 per input pixel, summed over the ~16 x 16 pixels:
    < 2e-4; a single interior pixel's response agrees to < 5e-7). Within the kernel's reach (3 px) of the
    edges GalSim's FFT loses up to ~1e-3 of a pixel's flux; the integral keeps all of it where
    the new grid covers the kernel's reach."""
    n, stamp = 24, 12
    impulse = np.zeros((n, n))
    impulse[12, 11] = 1.0  # one interior pixel's response
    ref = _galsim_draw(impulse, scale_in, scale_out, stamp, centre, "quintic", "auto")
    np.testing.assert_allclose(resample_flux(impulse, scale_in, scale_out, stamp, centre), ref, rtol=0, atol=5e-7)
    rng = np.random.default_rng(7)
    inner = np.zeros((n, n))
    inner[4:-4, 4:-4] = rng.uniform(-1.0, 1.0, (n - 8, n - 8))
    ref = _galsim_draw(inner, scale_in, scale_out, stamp, centre, "quintic", "auto")
    np.testing.assert_allclose(resample_flux(inner, scale_in, scale_out, stamp, centre), ref, rtol=0, atol=2e-4)
    if stamp * scale_out > (n + 8) * scale_in:  # the new grid covers the cutout and the kernel's reach
        edge = np.zeros((n, n))
        edge[0, 0], edge[1, 22], edge[23, 12] = 1.0, 2.0, 4.0
        new = resample_flux(edge, scale_in, scale_out, stamp, centre)
        assert new.sum() == pytest.approx(7.0, abs=1e-12)
        ref = _galsim_draw(edge, scale_in, scale_out, stamp, centre, "quintic", "auto")
        np.testing.assert_allclose(new, ref, rtol=0, atol=1e-2)
        assert ref.sum() == pytest.approx(7.0, abs=1e-2)


@pytest.mark.parametrize("interpolant", ["linear", "cubic", "quintic", "nearest"])
def test_integration_weights_conserve_flux_and_area(interpolant):
    """Each input pixel well inside the footprint sends all its flux to the new pixels (columns
    of A sum to 1: the kernels integrate to 1, exactly for these piecewise polynomials), and a
    new pixel receives ``ratio`` input pixels' worth per axis (rows sum to the scale ratio)."""
    ratio, stamp = 3.3, 40
    a = _resampling_matrix(100, ratio, stamp, 50.2, interpolant)
    np.testing.assert_allclose(a.sum(0)[40:60], 1.0, atol=1e-12)
    np.testing.assert_allclose(a.sum(1)[8:32], ratio, atol=1e-12)  # new pixels inside
    assert not a.flags.writeable  # cached and shared between calls


def test_nearest_integer_ratio_is_an_exact_block_sum_with_noise_variance_ratio_squared():
    """Analytic case: the nearest-pixel surface integrated over new pixels of exactly 4x4 aligned
    input pixels is the 4x4 block sum, so white noise of variance 1 comes out with variance 16,
    uncorrelated -- checked on the weights and on a noise realisation."""
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(64, 64))
    # output pixel 4 (stamp // 2) centred on input coordinate 17.5: it covers input pixels 16..19
    out = resample_flux(noise, 0.05, 0.2, 8, (17.5, 17.5), interpolant="nearest")
    blocks = noise[:32, :32].reshape(8, 4, 8, 4).sum(axis=(1, 3))
    np.testing.assert_allclose(out, blocks, atol=1e-12)
    big = resample_flux(rng.normal(size=(400, 400)), 0.05, 0.2, 100, (201.5, 201.5), interpolant="nearest")
    assert big.var() == pytest.approx(16.0, rel=0.05)  # 1e4 samples: 1.4 % standard error


@pytest.mark.parametrize("scale_out", [0.1, 0.3])  # finer (GalSim) and coarser (integrated)
def test_rectangular_stamps_are_crops_of_the_square_grid(scale_out):
    """A (ny, nx) stamp is the same grid as a square one, cropped about pixel (ny // 2, nx // 2)."""
    img = _gaussian(40, (19.0, 21.3), 3.0) + np.random.default_rng(5).normal(0, 0.01, (40, 40))
    square = resample_flux(img, 0.168, scale_out, 24, (20.0, 20.0))
    rect = resample_flux(img, 0.168, scale_out, (20, 24), (20.0, 20.0))
    np.testing.assert_allclose(rect, square[2:22], rtol=0, atol=1e-12)


@pytest.mark.parametrize("interpolant", ["quintic", "lanczos3", "cubic"])
def test_finer_pixels_are_galsims_no_pixel_drawing(interpolant):
    """Finer (and equal) new pixels sample the surface at their centres times their area: the
    same as GalSim's method 'no_pixel' (to its float32 output), off-centre and half-pixel shifts."""
    img = _gaussian(30, (14.2, 15.7), 2.5) + np.random.default_rng(2).normal(0, 0.05, (30, 30))
    for scale_out, centre in [(0.1, (14.6, 15.1)), (0.168, (14.5, 15.5))]:
        ref = _galsim_draw(img, 0.168, scale_out, 24, centre, interpolant, "no_pixel")
        new = resample_flux(img, 0.168, scale_out, 24, centre, interpolant=interpolant)
        np.testing.assert_allclose(new, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("scale_out", [0.1, 0.2, 0.5])
def test_variance_of_the_resampled_noise_is_exact_per_pixel(scale_out):
    """White noise of a known variance map, resampled 2,000 times: the per-pixel variance of the
    output is (A_y o A_y) V (A_x o A_x)^T -- for finer pixels (a fraction of the input's, varying
    with the sub-pixel phase), slightly coarser ones (smoothed: well below the r^2 V of a plain
    sum) and much coarser ones. Standard error of a variance from 2,000 draws: 3.2 %; checked
    per pixel at 5 sigma and on the mean to 1 %."""
    rng = np.random.default_rng(11)
    n, stamp, centre = 20, 8, (9.7, 9.3)
    var = np.exp(rng.uniform(-0.5, 0.5, (n, n)))  # a non-uniform map
    draws = np.stack([resample_flux(rng.normal(size=(n, n)) * np.sqrt(var), 0.168, scale_out, stamp, centre)
                      for _ in range(2000)])
    predicted = resample_variance(var, 0.168, scale_out, stamp, centre)
    ratio = draws.var(axis=0) / predicted
    assert np.all(np.abs(ratio - 1) < 5 * np.sqrt(2 / 2000))
    assert ratio.mean() == pytest.approx(1.0, abs=0.01)
    if scale_out == 0.2:  # smoothed by the interpolant and both pixel responses: well below the
        # variance resampled like flux (A V A^T ~ r^2 V, sim2obs < 0.2.3's ivar)
        flux_like = resample_flux(var, 0.168, 0.2, stamp, centre)
        assert np.all(predicted[2:-2, 2:-2] < 0.8 * flux_like[2:-2, 2:-2])


def test_resample_rejects_bad_input():
    img = np.ones((10, 10))
    with pytest.raises(Sim2ObsValueError, match="interpolant 'bicubic' unknown"):
        resample_flux(img, 0.1, 0.2, 4, (5, 5), interpolant="bicubic")
    with pytest.raises(Sim2ObsValueError, match="2-D image"):
        resample_flux(np.ones(10), 0.1, 0.2, 4, (5, 5))
    with pytest.raises(Sim2ObsValueError, match="must be > 0"):
        resample_flux(img, 0.0, 0.2, 4, (5, 5))
    with pytest.raises(Sim2ObsValueError, match="no width"):
        resample_flux(img, 0.1, 0.2, 4, (5, 5), interpolant="delta")
    bad = img.copy()
    bad[3, 3] = np.nan
    with pytest.raises(Sim2ObsValueError, match="1 NaN/inf pixels"):
        resample_flux(bad, 0.1, 0.2, 4, (5, 5))


def test_crop_is_exact_and_pads_with_fill():
    arr = np.arange(100.0).reshape(10, 10)
    inner = _crop(arr, (5, 5), 4)
    np.testing.assert_array_equal(inner, arr[3:7, 3:7])
    padded = _crop(arr, (5, 5), 14, fill=-1.0)
    np.testing.assert_array_equal(padded[2:12, 2:12], arr)
    assert (padded[:2] == -1.0).all() and (padded[:, 12:] == -1.0).all()
    edge = _crop(arr, (0, 0), 4)  # half outside: zeros there, the corner inside
    np.testing.assert_array_equal(edge[2:, 2:], arr[:2, :2])
    assert edge[:2].sum() == 0.0


def test_brightest_near_centre_ignores_a_brighter_source_far_away():
    img = _gaussian(64, (36, 28), 2.0, flux=10.0) + _gaussian(64, (3, 60), 2.0, flux=1000.0)
    assert brightest_near_centre(img) == (36, 28)
    img[36, 28] = np.nan  # NaN pixels (unmasked bad data) do not break it
    assert brightest_near_centre(img) in {(35, 28), (36, 27), (36, 28), (36, 29), (37, 28)}


def _band(image, scale, ivar):
    from sim2obs.data.ingest import BandData

    return BandData(image=image.astype(np.float64), pixel_scale=scale, where="test", ivar=ivar.astype(np.float64))


def test_regrid_masked_pixels_do_not_leak_and_are_flagged():
    """A masked pixel (ivar 0) holding a cosmic ray of 1e5 sigma: every new pixel it reaches,
    through the interpolant's negative lobes too, gets ivar 0, and the kept pixels are exactly
    those of the same cutout with the ray zeroed -- nothing of it leaks (coarser and finer)."""
    from sim2obs.data.resample import _regrid_band

    rng = np.random.default_rng(4)
    noise = rng.normal(0.0, 0.01, (60, 60))
    ivar = np.full((60, 60), 1e4)
    ivar[31, 28] = 0.0
    ray = noise.copy()
    ray[31, 28] = 1e3
    for scale_in in (0.084, 0.3):
        a, b = _band(ray, scale_in, ivar), _band(noise, scale_in, ivar)
        for bd in (a, b):
            _regrid_band(bd, 0.168, 24, (30, 30), 25)
        kept = a.ivar > 0
        assert 0 < (~kept).sum() < 24 * 24 / 2  # the ray's neighbourhood (and any edge)
        np.testing.assert_array_equal(a.image[kept], b.image[kept])
        np.testing.assert_array_equal(a.ivar, b.ivar)


def test_regrid_pixels_past_the_cutout_edge_get_no_ivar():
    """A flat cutout of 30 pixels at 0.3" on a wider 64-pixel 0.168" stamp: new pixels whose
    interpolant reaches past the cutout's edge (its mass inside short of 1, or above 1 where the
    missing pixels had negative weights) get ivar 0; every kept one holds the flat level."""
    from sim2obs.data.resample import _regrid_band

    bd = _band(np.ones((30, 30)), 0.3, np.ones((30, 30)))
    _regrid_band(bd, 0.168, 64, (15, 15), 25)
    kept = bd.ivar > 0
    assert kept.sum() > 100
    np.testing.assert_allclose(bd.image[kept], (0.168 / 0.3) ** 2, rtol=1e-3)
    assert np.abs(bd.image[~kept & (bd.image != 0)] / (0.168 / 0.3) ** 2 - 1).max() > 0.05  # ringing there
