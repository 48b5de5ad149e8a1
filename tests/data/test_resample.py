"""Resampling real cutouts onto a survey grid: flux conserved, source recentred, crops exact."""

import numpy as np
import pytest

from sim2obs.data.resample import _crop, brightest_near_centre, resample_flux


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
