"""Built-in real example: galaxies of the Hubble (eXtreme) Deep Field image shipped with
scikit-image (``skimage.data.hubble_deep_field``, no network), as an **uncalibrated** 3-band set.

Sources are detected with photutils (segmentation of the smoothed, background-subtracted sum of
the channels); stars and compact artefacts are rejected by size (half-light radius) and
concentration (C = 5 log10 r80/r20), sources whose stamp would leave the image are rejected, and
a stamp is cut around each remaining galaxy. The image is an 8-bit press-release colour composite
(STScI-2012-37): pixel values are display levels, not fluxes, so the shards have
``flux_unit='uncalibrated'`` and ``config['calibrated'] = False``; anything that needs calibrated
nanomaggies refuses them (:func:`sim2obs.data.ingest.require_calibrated`). Bands are the
composite's ``blue``, ``green``, ``red`` channels. The pixel scale (~0.138"/pixel: the ~2.3'
XDF field over 1000 pixels) is approximate; the PSF is a Gaussian of the median FWHM of the
point-like sources. ivar is a per-band constant from the sigma-clipped background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sim2obs.data.ingest import IngestOptions, write_ingested

PIXEL_SCALE_APPROX = 0.138
BANDS = ("blue", "green", "red")


def detect_galaxies(lum: np.ndarray, stamp: int, min_area: int = 80, min_r50: float = 2.5,
                    max_concentration: float = 3.0) -> tuple[list[dict], dict]:
    """Galaxy positions in a 2-D image: list of dicts (x, y, area, r50, concentration, label),
    and a record of the cuts with the numbers rejected by each."""
    from astropy.convolution import Gaussian2DKernel, convolve
    from astropy.stats import sigma_clipped_stats
    from photutils.segmentation import SourceCatalog, detect_sources

    _, med, std = sigma_clipped_stats(lum, sigma=3.0)
    sm = convolve(lum - med, Gaussian2DKernel(1.5))
    segm = detect_sources(sm, 3.0 * std, n_pixels=20)
    cat = SourceCatalog(lum - med, segm, convolved_data=sm)
    r20, r50, r80 = (np.asarray(cat.flux_radius(f).value) for f in (0.2, 0.5, 0.8))
    with np.errstate(divide="ignore", invalid="ignore"):
        conc = 5 * np.log10(r80 / r20)
    area = np.asarray(cat.area.value)
    x, y = np.asarray(cat.x_centroid), np.asarray(cat.y_centroid)
    h, w = lum.shape
    half = stamp // 2
    edge = ((x < half) | (y < half) | (x > w - half - 1) | (y > h - half - 1)
            | (np.asarray(cat.bbox_xmin) == 0) | (np.asarray(cat.bbox_ymin) == 0)
            | (np.asarray(cat.bbox_xmax) == w - 1) | (np.asarray(cat.bbox_ymax) == h - 1))
    small = area < min_area
    point = ~small & ((r50 < min_r50) | ~(conc < max_concentration))
    keep = ~small & ~point & ~edge
    stars_fwhm = np.asarray(cat.fwhm.value)[point & ~edge]
    rec = {"detected": int(len(area)), "rejected_small": int(small.sum()),
           "rejected_point_like": int(point.sum()), "rejected_edge": int((edge & ~small & ~point).sum()),
           "kept": int(keep.sum()), "background_median": float(med), "background_std": float(std),
           "cuts": {"min_area_px": min_area, "min_r50_px": min_r50, "max_concentration": max_concentration},
           "point_like_fwhm_px": float(np.median(stars_fwhm)) if stars_fwhm.size else None}
    rows = [{"x": float(x[i]), "y": float(y[i]), "area": float(area[i]), "r50": float(r50[i]),
             "concentration": float(conc[i]), "label": int(cat.labels[i])} for i in np.flatnonzero(keep)]
    return rows, rec


def make_hdf_example(out: str | Path, stamp: int = 64, opts: IngestOptions | None = None,
                     log=None) -> list[Path]:
    """Write the Hubble Deep Field galaxy stamps as uncalibrated shards in ``out``."""
    import galsim
    from astropy.stats import sigma_clipped_stats
    from skimage import data

    from sim2obs.data.ingest import BandData, RawObject
    from sim2obs.forward_models.psf import psf_image

    opts = opts or IngestOptions()
    stamp = opts.stamp or stamp
    rgb = data.hubble_deep_field().astype(np.float64)      # (872, 1000, 3) uint8 -> float
    planes = [rgb[..., 2], rgb[..., 1], rgb[..., 0]]       # blue, green, red
    rows, rec = detect_galaxies(sum(planes), stamp)
    stds = []
    for p in planes:
        _, _, s = sigma_clipped_stats(p, sigma=3.0)
        stds.append(max(float(s), 0.5))                    # 8-bit quantisation floor
    fwhm_px = rec["point_like_fwhm_px"] or 2.0
    psf = psf_image(galsim.Gaussian(fwhm=fwhm_px * PIXEL_SCALE_APPROX), PIXEL_SCALE_APPROX, opts.psf_stamp)
    objects, prov = [], []
    half = stamp // 2
    for r in rows:
        cx, cy = int(round(r["x"])), int(round(r["y"]))
        o = RawObject(key=str(r["label"]), object_id=r["label"], files=["skimage.data.hubble_deep_field()"])
        for band, p, s in zip(BANDS, planes, stds, strict=True):
            cut = p[cy - half:cy - half + stamp, cx - half:cx - half + stamp]
            o.bands[band] = BandData(image=cut, pixel_scale=PIXEL_SCALE_APPROX, where=band,
                                     ivar=np.full(cut.shape, 1.0 / s**2), psf=psf)
        o.labels = {"x_pixel": r["x"], "y_pixel": r["y"], "r50_pixel": r["r50"],
                    "concentration": r["concentration"]}
        o.label_units = {"x_pixel": "pix", "y_pixel": "pix", "r50_pixel": "pix", "concentration": ""}
        objects.append(o)
        prov.append({"object": o.key, "centre_xy": [cx, cy], "segment_label": r["label"]})
    arr = {"bands": list(BANDS), "scale": PIXEL_SCALE_APPROX, "stamp": stamp, "objects": objects,
           "images": np.stack([np.stack([o.bands[b].image for b in BANDS]) for o in objects]),
           "ivar": np.stack([np.stack([o.bands[b].ivar for b in BANDS]) for o in objects]),
           "psf": np.broadcast_to(np.stack([psf] * 3)[None], (len(objects), 3) + psf.shape),
           "prov": prov, "survey": "hdf-example"}
    base = {"ingest": {"kind": "example", "example": "hdf",
                       "input": "skimage.data.hubble_deep_field() (HubbleSite STScI-2012-37 colour image)",
                       "detection": rec, "background_std_per_band": dict(zip(BANDS, stds, strict=True))},
            "calibration_note": ("8-bit colour composite: pixel values are display levels (0-255), "
                                 "not fluxes; do not use where calibrated nanomaggies are needed"),
            "pixel_scale_note": "approximate (~2.3 arcmin XDF field over 1000 pixels)",
            "psf_note": f"Gaussian, FWHM {fwhm_px:.2f} px = median of point-like sources (approximate)",
            "bands_note": "channels of the colour composite, not photometric bands"}
    opts.source = "hubble-deep-field (scikit-image)"
    opts.name = opts.name or "hdf"
    paths = write_ingested(arr, opts, out, base, calibrated=False, log=log)
    if log:
        log(f"Hubble Deep Field: {rec['detected']} sources, {rec['kept']} galaxies kept "
            f"({rec['rejected_point_like']} point-like, {rec['rejected_edge']} at edges, "
            f"{rec['rejected_small']} too small)")
    return paths
