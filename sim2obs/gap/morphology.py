"""Pixel- and morphology-space statistics of a set of cutouts, and their comparison between sets.

Per galaxy (:func:`measure_galaxy`):

* a segmentation map of the detection band (``photutils.segmentation.detect_sources`` above
  ``nsigma`` times the background noise after a Gaussian smoothing, then ``deblend_sources``);
  the central source is the segment under the stamp centre (else the one nearest to it);
* per band, the flux summed over the central segment, as an AB magnitude
  ``m = 22.5 - 2.5 log10(flux / nmgy)`` (the shard zeropoint), and colours of adjacent bands;
* ``statmorph.source_morphology`` (Rodriguez-Gomez et al. 2019, MNRAS 483, 4140) on the
  detection band: half-light radius (``rhalf_ellip``, arcsec), concentration C, asymmetry A,
  smoothness S (Conselice 2003), Gini and M20 (Lotz et al. 2004), and the Sérsic index and
  half-light radius of its PSF-convolved Sérsic fit;
* per band, the background noise (1.4826 MAD of the pixels outside every dilated segment) and
  its spatial correlation: the Pearson correlation of horizontally and vertically adjacent
  background pixels (0 for white noise, > 0 after resampling or co-adding).

Between two sets (:func:`compare_sets`): the two-sample Kolmogorov-Smirnov test
(``scipy.stats.ks_2samp``), the k-sample Anderson-Darling test (Scholz & Stephens 1987,
``scipy.stats.anderson_ksamp``; its p-value is capped to [0.001, 0.25] by scipy), Cohen's d
(difference of means over the pooled standard deviation) and the 1-Wasserstein distance over the
pooled standard deviation.

Real sets flagged uncalibrated (shard config ``calibrated: false``) get no flux-based statistic
(magnitudes, colours, noise level); shape statistics are still measured.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from sim2obs.data.dataset import MAD_TO_SIGMA, outer_frame
from sim2obs.data.shards import Shard
from sim2obs.errors import Sim2ObsValueError

ZEROPOINT_NMGY = 22.5

#: statmorph attribute -> statistic name (radii converted to arcsec)
SHAPE_STATS = {
    "rhalf_ellip": "r_half_arcsec",
    "concentration": "concentration",
    "asymmetry": "asymmetry",
    "smoothness": "smoothness",
    "gini": "gini",
    "m20": "m20",
    "sersic_n": "sersic_n",
    "sersic_rhalf": "sersic_rhalf_arcsec",
}
_RADII = ("rhalf_ellip", "sersic_rhalf")


def is_calibrated(shard: Shard) -> bool:
    """False when the shard's config says ``calibrated: false`` or its flux unit is not
    nanomaggies (flux scale unknown)."""
    cfg = shard.attrs.config if isinstance(shard.attrs.config, dict) else {}
    return bool(cfg.get("calibrated", True)) and shard.attrs.flux_unit == "nanomaggy"


def detection_band(bands) -> int:
    """Index of the band used for segmentation and shapes: r, then i, then the middle band."""
    bands = list(bands)
    for name in ("r", "i", "HSC-R", "HSC-I"):
        if name in bands:
            return bands.index(name)
    return (len(bands) - 1) // 2


def _robust_sigma(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(v - np.median(v))))


def segment_central(image: np.ndarray, sigma: float | None = None, nsigma: float = 1.5,
                    npixels: int = 5, smooth_fwhm: float = 2.0, deblend: bool = True
                    ) -> tuple[np.ndarray, int, np.ndarray]:
    """Segmentation of one stamp and the label of its central source.

    Returns ``(segmap (H, W) int, central_label, background_mask (H, W) bool)``;
    ``central_label`` is 0 when nothing is detected. The background mask excludes every
    segment dilated by 3 pixels.
    """
    from astropy.convolution import Gaussian2DKernel, convolve
    from photutils.segmentation import deblend_sources, detect_sources
    from scipy import ndimage

    image = np.where(np.isfinite(image), image, 0.0)
    h, w = image.shape
    if sigma is None or not sigma > 0:
        sigma = _robust_sigma(image[outer_frame(h, w)])
    if not sigma > 0:
        sigma = 1e-3 * max(float(np.abs(image).max()), 1e-30)
    sigma_k = smooth_fwhm / 2.3548
    kernel = Gaussian2DKernel(sigma_k)
    smoothed = convolve(image, kernel, normalize_kernel=True)
    # a unit-sum Gaussian of width sigma_k lowers white noise by 1 / (2 sqrt(pi) sigma_k)
    thresh = nsigma * sigma * min(1.0, 1.0 / (2 * math.sqrt(math.pi) * sigma_k))
    segm = detect_sources(smoothed, thresh, npixels)  # positional: renamed n_pixels in 3.0
    if segm is None:
        return np.zeros((h, w), int), 0, np.ones((h, w), bool)
    if deblend and len(segm.labels) >= 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                segm = deblend_sources(smoothed, segm, npixels, nlevels=16, contrast=0.01,
                                       progress_bar=False)
            except Exception:  # deblending is a refinement; keep the plain map if it fails
                pass
    seg = np.asarray(segm.data)
    cy, cx = (h - 1) // 2, (w - 1) // 2
    label = int(seg[cy, cx])
    if label == 0:
        yy, xx = np.nonzero(seg)
        i = int(np.argmin((yy - cy) ** 2 + (xx - cx) ** 2))
        label = int(seg[yy[i], xx[i]])
    background = ~ndimage.binary_dilation(seg > 0, iterations=3)
    return seg, label, background


def neighbour_correlation(image: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of horizontally and vertically adjacent pixels both in ``mask``."""
    pairs_a, pairs_b = [], []
    m_h = mask[:, :-1] & mask[:, 1:]
    pairs_a.append(image[:, :-1][m_h])
    pairs_b.append(image[:, 1:][m_h])
    m_v = mask[:-1, :] & mask[1:, :]
    pairs_a.append(image[:-1, :][m_v])
    pairs_b.append(image[1:, :][m_v])
    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 10 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def measure_galaxy(images: np.ndarray, bands, pixel_scale: float, ivar: np.ndarray | None = None,
                   psf: np.ndarray | None = None, calibrated: bool = True,
                   shapes: bool = True) -> dict[str, float]:
    """All statistics of one galaxy. images: (B, H, W) nanomaggies; ivar, psf per band or None.

    Returns a flat ``{name: value}`` with NaN where a measurement failed (statmorph flag >= 2,
    no detection, non-positive flux).
    """
    bands = list(bands)
    det = detection_band(bands)
    img = np.asarray(images, dtype=np.float64)
    out: dict[str, float] = {}
    sig = None
    if ivar is not None:
        good = ivar[det] > 0
        if good.any():
            sig = float(np.median(1 / np.sqrt(ivar[det][good])))
    seg, label, background = segment_central(img[det], sigma=sig)
    central = seg == label if label else np.zeros(seg.shape, bool)
    for b, name in enumerate(bands):
        bg = background & np.isfinite(img[b])
        if ivar is not None:
            bg &= ivar[b] > 0
        if calibrated:
            flux = float(img[b][central].sum()) if label else float("nan")
            out[f"mag_{name}"] = ZEROPOINT_NMGY - 2.5 * math.log10(flux) if flux > 0 else float("nan")
            out[f"noise_{name}"] = _robust_sigma(img[b][bg])
        out[f"noise_corr_{name}"] = neighbour_correlation(img[b], bg)
    if calibrated:
        for b1, b2 in zip(bands[:-1], bands[1:], strict=True):
            out[f"{b1}-{b2}"] = out[f"mag_{b1}"] - out[f"mag_{b2}"]
    if shapes:
        out.update(_statmorph_shapes(img[det], seg, label, pixel_scale,
                                     None if ivar is None else ivar[det],
                                     None if psf is None else psf[det]))
    return out


def _statmorph_shapes(image, seg, label, pixel_scale, ivar, psf) -> dict[str, float]:
    import statmorph

    out = {name: float("nan") for name in SHAPE_STATS.values()}
    if not label:
        return out
    image = np.where(np.isfinite(image), image, 0.0)
    segmap = np.where(seg == label, label, 0).astype(int)
    mask = (seg > 0) & (seg != label)
    if ivar is not None and np.any(ivar > 0):
        good = ivar > 0
        weight = np.where(good, 1 / np.sqrt(np.where(good, ivar, 1.0)), np.inf)
        mask |= ~good
        weight[~good] = np.median(weight[good])
    else:
        weight = np.full(image.shape, max(_robust_sigma(image[seg == 0]), 1e-12))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            morph = statmorph.source_morphology(image, segmap, weightmap=weight, mask=mask,
                                                psf=psf)[0]
    except Exception:  # statmorph raises on degenerate sources; those galaxies get NaN
        return out
    if morph.flag >= 2:
        return out
    for attr, name in SHAPE_STATS.items():
        v = float(getattr(morph, attr, float("nan")))
        if attr.startswith("sersic") and getattr(morph, "flag_sersic", 0) >= 2:
            v = float("nan")
        if attr in _RADII:
            v *= pixel_scale
        out[name] = v
    return out


def measure_shard(shard: Shard, n_max: int | None = None, shapes: bool = True,
                  rng: np.random.Generator | None = None, progress: bool = False
                  ) -> dict[str, np.ndarray]:
    """Statistics of (up to ``n_max`` randomly chosen) galaxies of ``shard``.

    Returns ``{name: (n,) array}`` plus ``object_id``. Flux-based statistics are left out for
    uncalibrated sets (:func:`is_calibrated`).
    """
    from tqdm.auto import tqdm

    n = len(shard)
    idx = np.arange(n)
    if n_max is not None and n > n_max:
        rng = rng if rng is not None else np.random.default_rng(0)
        idx = np.sort(rng.choice(n, n_max, replace=False))
    calibrated = is_calibrated(shard)
    rows = []
    for i in tqdm(idx, desc="morphology", disable=not progress):
        psf = shard.psf[i if shard.psf.shape[0] > 1 else 0]
        rows.append(measure_galaxy(shard.images[i], shard.bands, shard.attrs.pixel_scale_arcsec,
                                   None if shard.ivar is None else shard.ivar[i], psf,
                                   calibrated=calibrated, shapes=shapes))
    keys = list(rows[0]) if rows else []
    out = {k: np.array([r.get(k, np.nan) for r in rows], dtype=np.float64) for k in keys}
    out["object_id"] = shard.labels["object_id"][idx]
    return out


def compare_distributions(a, b) -> dict:
    """KS and Anderson-Darling tests and effect sizes between two samples (finite values only).

    ``cohen_d = (mean_b - mean_a) / s_pooled``,
    ``s_pooled = sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2))``;
    ``wasserstein_std = W_1(a, b) / s_pooled`` (scale-free, >= |cohen_d| for shifts).
    """
    from scipy.stats import anderson_ksamp, ks_2samp, wasserstein_distance

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = {"n": [int(a.size), int(b.size)],
           "median": [float(np.median(a)) if a.size else None,
                      float(np.median(b)) if b.size else None]}
    if a.size < 3 or b.size < 3:
        out["note"] = "too few finite measurements to compare"
        return out
    ks = ks_2samp(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ad = anderson_ksamp([a, b])
            ad_stat, ad_p = float(ad.statistic), float(ad.pvalue)
        except (ValueError, ZeroDivisionError):  # all values identical
            ad_stat, ad_p = float("nan"), float("nan")
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1))
                       / (a.size + b.size - 2))
    d = (b.mean() - a.mean()) / pooled if pooled > 0 else float("nan")
    w = wasserstein_distance(a, b) / pooled if pooled > 0 else float("nan")
    out.update(ks_statistic=float(ks.statistic), ks_p_value=float(ks.pvalue),
               ad_statistic=ad_stat, ad_p_value=ad_p, cohen_d=float(d), wasserstein_std=float(w))
    return out


def compare_sets(stats_a: dict, stats_b: dict, refused: dict | None = None) -> dict:
    """``{statistic: compare_distributions(a, b)}`` for every statistic of both sets, plus
    ``{"refused": {name: reason}}`` for statistics that were not measured."""
    out: dict = {}
    for key in stats_a:
        if key == "object_id" or key not in stats_b:
            continue
        out[key] = compare_distributions(stats_a[key], stats_b[key])
    if refused:
        out["refused"] = dict(refused)
    return out


def morphology_gap(shard_a: Shard, shard_b: Shard, n_max: int | None = 300,
                   rng: np.random.Generator | None = None, progress: bool = False,
                   shapes: bool = True) -> tuple[dict, dict, dict]:
    """Measure both sets and compare them. Returns ``(comparison, stats_a, stats_b)``.

    When either set is uncalibrated, flux-based statistics are measured for neither (a
    comparison needs both) and the reason is recorded under ``comparison["refused"]``.
    """
    if tuple(shard_a.bands) != tuple(shard_b.bands):
        raise Sim2ObsValueError(
            f"band lists differ: {list(shard_a.bands)} vs {list(shard_b.bands)}"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    cal = {"A": is_calibrated(shard_a), "B": is_calibrated(shard_b)}
    refused = {}
    if not all(cal.values()):
        which = [f"set {k} ('{s.path}')" for k, s in (("A", shard_a), ("B", shard_b)) if not cal[k]]
        reason = (f"{' and '.join(which)} is flagged uncalibrated (config calibrated: false): "
                  "magnitudes, colours and noise levels in nanomaggies would compare arbitrary "
                  "flux scales; only shape and noise-correlation statistics are compared")
        refused = {"magnitudes": reason, "colours": reason, "noise_level": reason}
    both_cal = all(cal.values())

    def run(shard):
        if both_cal or not is_calibrated(shard):
            return measure_shard(shard, n_max, shapes, rng, progress)
        # a calibrated set compared with an uncalibrated one: drop its flux statistics too
        stats = measure_shard(shard, n_max, shapes, rng, progress)
        return {k: v for k, v in stats.items()
                if not (k.startswith("mag_") or k.startswith("noise_") and not
                        k.startswith("noise_corr_") or "-" in k)}

    sa, sb = run(shard_a), run(shard_b)
    return compare_sets(sa, sb, refused), sa, sb
