"""Resampling and recentring of real cutouts onto a survey's pixel grid, conserving flux.

The image is a ``galsim.InterpolatedImage`` (``normalization='flux'``) recentred on the brightest
source near the centre and drawn at the target pixel scale (method 'no_pixel' when upsampling,
'auto' -- integrated over the new pixel -- when downsampling), so total flux is conserved. The
variance map is resampled the same way (noise per unit area conserved; the pixel correlations
this introduces are ignored, so the new ivar is approximate); pixels fed by masked input pixels,
or outside the input footprint, get ivar = 0. Same-scale stamps of another size are cropped or
padded by whole pixels (exact).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sim2obs.data.ingest import BandData



def brightest_near_centre(image: np.ndarray, radius_frac: float = 0.25) -> tuple[int, int]:
    """(y, x) of the brightest smoothed pixel within ``radius_frac`` of the stamp size of the centre."""
    from scipy.ndimage import gaussian_filter

    sm = gaussian_filter(np.nan_to_num(image), 1.5)
    h, w = sm.shape
    r = max(2, int(radius_frac * min(h, w)))
    cy, cx = h // 2, w // 2
    sub = sm[max(0, cy - r):cy + r + 1, max(0, cx - r):cx + r + 1]
    iy, ix = np.unravel_index(np.argmax(sub), sub.shape)
    return int(iy + max(0, cy - r)), int(ix + max(0, cx - r))


def _crop(arr: np.ndarray, centre: tuple[int, int], stamp: int, fill: float = 0.0) -> np.ndarray:
    out = np.full((stamp, stamp), fill, dtype=np.float64)
    y0, x0 = centre[0] - stamp // 2, centre[1] - stamp // 2
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(arr.shape[0], y0 + stamp), min(arr.shape[1], x0 + stamp)
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = arr[ys:ye, xs:xe]
    return out


def resample_flux(arr: np.ndarray, scale_in: float, scale_out: float, stamp: int,
                  centre: tuple[float, float], interpolant: str = "quintic") -> np.ndarray:
    """Flux-conserving resampling with ``galsim.InterpolatedImage``: pixel ``centre`` (y, x) of
    ``arr`` lands on pixel (stamp//2, stamp//2) of the output."""
    import galsim

    h, w = arr.shape
    ii = galsim.InterpolatedImage(galsim.Image(np.ascontiguousarray(arr, dtype=np.float64), scale=scale_in),
                                  normalization="flux", x_interpolant=interpolant,
                                  calculate_stepk=False, calculate_maxk=False)
    dx = (centre[1] - (w - 1) / 2) * scale_in
    dy = (centre[0] - (h - 1) / 2) * scale_in
    method = "auto" if scale_out > scale_in else "no_pixel"
    img = ii.shift(-dx, -dy).drawImage(nx=stamp, ny=stamp, scale=scale_out, method=method,
                                       use_true_center=False)
    return img.array.astype(np.float64)


def _regrid_band(bd: BandData, scale_out: float, stamp: int, centre, psf_stamp: int) -> None:
    area = (scale_out / bd.pixel_scale) ** 2
    if abs(bd.pixel_scale - scale_out) <= 1e-4 * scale_out:
        bd.image = _crop(bd.image, centre, stamp)
        bd.ivar = _crop(bd.ivar, centre, stamp)  # outside the input: ivar 0
        bd.prov["regrid"] = {"kind": "crop/pad (whole pixels)", "centre_yx": list(centre), "stamp": stamp}
        return
    bad = bd.ivar <= 0
    var = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, bd.ivar))
    if np.any(~bad):
        var[bad] = np.median(var[~bad])
    img = resample_flux(bd.image, bd.pixel_scale, scale_out, stamp, centre)
    var_out = resample_flux(var, bd.pixel_scale, scale_out, stamp, centre)
    bad_out = resample_flux(bad.astype(float), bd.pixel_scale, scale_out, stamp, centre) / area
    cover = resample_flux(np.ones_like(var), bd.pixel_scale, scale_out, stamp, centre) / area
    ok = (bad_out < 1e-3) & (cover > 0.999) & (var_out > 0)
    bd.ivar = np.where(ok, 1.0 / np.where(ok, var_out, 1.0), 0.0)
    bd.image = np.where(cover > 1e-3, img, 0.0)
    rec = {"kind": "galsim.InterpolatedImage(normalization='flux')", "from_arcsec": bd.pixel_scale,
           "to_arcsec": scale_out, "stamp": stamp, "centre_yx": [int(c) for c in centre],
           "ivar": "variance resampled flux-conservingly like the image (noise per area kept; correlations ignored)"}
    if bd.psf is not None:
        p = resample_flux(bd.psf, bd.pixel_scale, scale_out, psf_stamp,
                          ((bd.psf.shape[0] - 1) / 2, (bd.psf.shape[1] - 1) / 2))
        bd.psf = p / p.sum()
    bd.prov["regrid"] = rec
    bd.pixel_scale = scale_out
