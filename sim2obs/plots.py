"""Figures of shard content: galaxy image grids with colour composites.

Colour composites follow Lupton et al. (2004, PASP 116, 133) through
:func:`astropy.visualization.make_lupton_rgb`: the mean intensity ``I`` of the three bands is
mapped with ``asinh(Q I / stretch)`` and every band is scaled by the same ``f(I) / I``, so colours
are preserved where the image saturates. The stretch is set from the noise level, so mock and
real shards drawn with the defaults look alike at the same depth: the asinh turns from linear to
logarithmic at one noise sigma (``stretch = Q * sigma``).

Figures are drawn with matplotlib's Agg canvas (never a GUI backend, never ``pyplot``) and
written atomically: a temporary file in the target folder is renamed into place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sim2obs._atomic import atomic_output
from sim2obs.data.dataset import MAD_TO_SIGMA, outer_frame
from sim2obs.data.shards import Shard
from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError

#: Effective wavelengths (nm) the default composite aims at for blue, green and red: SDSS g, r, i
#: (Fukugita et al. 1996, AJ 111, 1748), the bands of the Lupton et al. (2004) composites.
RGB_TARGET_NM = (477.0, 623.0, 763.0)


_PANEL_INCH = 1.7


def band_wavelengths_nm(shard: Shard) -> tuple[float, ...] | None:
    """Effective wavelength of every band from the shard's survey spec, or None if unknown."""
    try:
        from sim2obs.forward_models.surveys import get_survey

        spec = get_survey(shard.attrs.survey)
        waves = tuple(spec.band(b).effective_wavelength_nm for b in shard.bands)
    except Exception:  # unknown survey (e.g. real data), missing filter package: keep list order
        return None
    if any(w is None or not math.isfinite(w) for w in waves):
        return None
    return tuple(float(w) for w in waves)


def default_rgb_bands(bands: Sequence[str], wavelengths_nm: Sequence[float] | None = None
                      ) -> tuple[str, ...]:
    """Bands for the composite, ordered red -> blue (1 to 3 names).

    With 3 or more bands, the bands nearest to :data:`RGB_TARGET_NM` (each used once; i, r, g
    for ugriz/grizy surveys); without wavelengths the list is taken as ordered blue -> red and
    its first, middle and last bands are used. With 2 bands both are returned red first, with 1
    the single band.
    """
    bands = tuple(bands)
    if not bands:
        raise Sim2ObsValueError("a shard with no bands has nothing to draw")
    if wavelengths_nm is None:
        order = list(range(len(bands)))
        if len(bands) >= 3:
            order = [0, (len(bands) - 1) // 2, len(bands) - 1]
    else:
        waves = np.asarray(wavelengths_nm, dtype=np.float64)
        if waves.shape != (len(bands),):
            raise Sim2ObsValueError(f"{len(bands)} bands but {waves.size} wavelengths")
        if len(bands) < 3:
            order = list(range(len(bands)))
        else:
            order, free = [], set(range(len(bands)))
            for target in RGB_TARGET_NM:
                best = min(free, key=lambda i: (abs(waves[i] - target), i))
                order.append(best)
                free.discard(best)
        order.sort(key=lambda i: (waves[i], i))
    return tuple(bands[i] for i in reversed(order))


def noise_sigma(images: np.ndarray, ivar: np.ndarray | None = None) -> np.ndarray:
    """Per-band noise sigma of ``images`` (N, B, H, W), in the image unit.

    The median of ``1/sqrt(ivar)`` over pixels with ``ivar > 0`` where inverse variances are
    given; otherwise a robust estimate, ``1.4826 * MAD`` of the pixels in the outer frame of the
    stamps (the border of width H/8, at least 2 pixels, away from the central galaxy; galaxies
    whose wings reach the border bias it high, which only softens the display). A band
    without noise (noiseless mocks) gets 1e-3 of its brightest pixel so the stretch stays defined.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise Sim2ObsValueError(f"images must be (N, B, H, W), got shape {images.shape}")
    n_bands, h, w = images.shape[1:]
    sigma = np.full(n_bands, np.nan)
    if ivar is not None:
        ivar = np.asarray(ivar, dtype=np.float64)
        for b in range(n_bands):
            good = ivar[:, b] > 0
            if np.any(good):
                sigma[b] = float(np.median(1.0 / np.sqrt(ivar[:, b][good])))
    frame = outer_frame(h, w)
    for b in range(n_bands):
        if math.isfinite(sigma[b]) and sigma[b] > 0:
            continue
        pix = images[:, b][:, frame]
        pix = pix[np.isfinite(pix)]
        mad = float(np.median(np.abs(pix - np.median(pix)))) if pix.size else 0.0
        sigma[b] = MAD_TO_SIGMA * mad
        if not sigma[b] > 0:
            finite = np.abs(images[:, b][np.isfinite(images[:, b])])
            peak = float(finite.max()) if finite.size else 0.0
            sigma[b] = 1e-3 * peak if peak > 0 else 1.0
    return sigma


def _clean(images: np.ndarray, ivar: np.ndarray | None) -> np.ndarray:
    """Float copy with masked (ivar = 0) and non-finite pixels set to 0 for display."""
    out = np.array(images, dtype=np.float64, copy=True)
    bad = ~np.isfinite(out)
    if ivar is not None:
        bad |= np.asarray(ivar) <= 0
    out[bad] = 0.0
    return out


def lupton_composite(planes: Sequence[np.ndarray], sigmas: Sequence[float] | None = None,
                     stretch: float | None = None, q: float = 8.0) -> np.ndarray:
    """(H, W, 3) uint8 Lupton et al. (2004, PASP 116, 133) colour composite of 1-3 images.

    ``planes`` are ordered red -> blue (one plane: grey; two: green is their mean). The asinh
    stretch is ``stretch`` (flux units of the planes) or, when None, ``q`` times the noise sigma
    of the mean intensity I = (r + g + b) / 3, propagated from the per-plane ``sigmas`` (required
    then). astropy's ``make_lupton_rgb`` does the mapping, with minimum 0 and softening ``Q = q``.
    """
    from astropy.visualization import make_lupton_rgb

    planes = [np.asarray(p) for p in planes]
    if not 1 <= len(planes) <= 3:
        raise Sim2ObsValueError(f"lupton_composite takes 1 to 3 planes, got {len(planes)}")
    if stretch is None and sigmas is None:
        raise Sim2ObsValueError("lupton_composite: give stretch=... or the planes' noise sigmas=...")
    if sigmas is not None and len(sigmas) != len(planes):
        raise Sim2ObsValueError(f"lupton_composite: {len(sigmas)} sigmas for {len(planes)} planes")
    sigmas = list(sigmas) if sigmas is not None else [0.0] * len(planes)
    if len(planes) == 1:
        r = g = b = planes[0]
        sigma_i = sigmas[0]
    elif len(planes) == 2:
        r, b = planes
        g = 0.5 * (r + b)
        # I = (r + (r + b) / 2 + b) / 3 = (r + b) / 2
        sigma_i = math.sqrt(sigmas[0] ** 2 + sigmas[1] ** 2) / 2.0
    else:
        r, g, b = planes
        sigma_i = math.sqrt(sum(s * s for s in sigmas)) / 3.0  # noise of (r + g + b) / 3
    s = stretch if stretch is not None else q * sigma_i
    with np.errstate(invalid="ignore", divide="ignore"):  # f(I)/I at I = 0 is masked by astropy
        return make_lupton_rgb(r, g, b, minimum=0.0, stretch=s, Q=q)


def _label_text(shard: Shard, index: int, label_keys: Sequence[str]) -> str:
    lines = [f"id {int(shard.labels['object_id'][index])}"]
    for key in label_keys:
        if key == "object_id" or key not in shard.labels:
            continue
        value = float(shard.labels[key][index])
        if not math.isfinite(value):
            continue
        lines.append(f"{key} {value:.2f}" if abs(value) >= 1 else f"{key} {value:.3g}")
    return "\n".join(lines)


def image_grid_figure(shard: Shard, n: int = 16, rgb_bands: Sequence[str] | None = None,
                      label_keys: Sequence[str] = ("log_mstar", "redshift"),
                      per_band: bool = True, title: str | None = None,
                      stretch: float | None = None, q: float = 8):
    """The :func:`image_grid` figure as a :class:`matplotlib.figure.Figure` (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(shard, Shard):
        raise Sim2ObsValueError(f"image_grid needs a Shard, got {type(shard).__name__}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise Sim2ObsValueError(f"n must be an integer >= 1, got {n!r}")
    if not (isinstance(q, int | float) and math.isfinite(q) and q > 0):
        raise Sim2ObsValueError(f"q (the asinh softening Q) must be > 0, got {q!r}")
    if stretch is not None and not (math.isfinite(stretch) and stretch > 0):
        raise Sim2ObsValueError(f"stretch must be > 0 (nanomaggies), got {stretch!r}")
    if len(shard) == 0:
        raise Sim2ObsValueError(f"{shard.path or 'shard'} holds no galaxies to draw")
    bands = shard.bands
    if rgb_bands is None:
        rgb_bands = default_rgb_bands(bands, band_wavelengths_nm(shard))
    rgb_bands = tuple(rgb_bands)
    unknown = [b for b in rgb_bands if b not in bands]
    if unknown or not 1 <= len(rgb_bands) <= 3:
        raise Sim2ObsKeyError(
            f"rgb_bands {list(rgb_bands)}: give 1 to 3 of the shard's bands {list(bands)} "
            "(ordered red, green, blue)"
        )
    count = min(int(n), len(shard))
    ivar = None if shard.ivar is None else np.asarray(shard.ivar[:count])
    images = _clean(shard.images[:count], ivar)
    sigma = noise_sigma(shard.images[:count], ivar)
    rgb_idx = [bands.index(b) for b in rgb_bands]

    if per_band:
        rows, cols = count, 1 + len(bands)
    else:
        cols = math.ceil(math.sqrt(count))
        rows = math.ceil(count / cols)
    head = 0.55 if per_band else 0.35  # inches for the title (and the band names)
    height = _PANEL_INCH * rows + head + 0.05
    fig = Figure(figsize=(_PANEL_INCH * cols + 0.1, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(wspace=0.03, hspace=0.03))
    fig.subplots_adjust(left=0.05 / (_PANEL_INCH * cols + 0.1), right=1 - 0.05 / (_PANEL_INCH * cols + 0.1),
                        bottom=0.05 / height, top=1 - head / height)
    for ax in axes.ravel():
        ax.set_axis_off()
    rgb_name = ",".join(rgb_bands) if len(rgb_bands) > 1 else f"{rgb_bands[0]} (asinh)"
    for i in range(count):
        ax = axes[i, 0] if per_band else axes[i // cols, i % cols]
        rgb = lupton_composite([images[i, k] for k in rgb_idx], [sigma[k] for k in rgb_idx], stretch, q)
        ax.imshow(rgb, origin="lower", interpolation="nearest")
        ax.text(0.03, 0.97, _label_text(shard, i, label_keys), transform=ax.transAxes,
                va="top", ha="left", fontsize=6.5, color="white", family="monospace",
                bbox=dict(facecolor="black", alpha=0.45, pad=1.5, edgecolor="none"))
        if per_band:
            for b in range(len(bands)):
                grey = lupton_composite([images[i, b]], [sigma[b]], stretch, q)
                axes[i, 1 + b].imshow(grey, origin="lower", interpolation="nearest")
    if per_band:
        axes[0, 0].set_title(rgb_name, fontsize=8)
        for b, name in enumerate(bands):
            axes[0, 1 + b].set_title(name, fontsize=8)
    a = shard.attrs
    fig.suptitle(title if title is not None else
                 f"{a.source} - {a.survey} ({a.domain}), {count} of {len(shard)} | "
                 f"colour: {rgb_name}", fontsize=9, y=1 - 0.08 / height, va="top")
    return fig


def image_grid(shard: Shard, out_png, n: int = 16, rgb_bands: Sequence[str] | None = None,
               label_keys: Sequence[str] = ("log_mstar", "redshift"), per_band: bool = True,
               title: str | None = None, stretch: float | None = None, q: float = 8) -> Path:
    """Draw the first ``n`` galaxies of ``shard`` to the PNG ``out_png``; returns its path.

    Each galaxy gets a Lupton et al. (2004) colour composite of ``rgb_bands`` (red, green, blue;
    default from :func:`default_rgb_bands`: 1 band -> greyscale asinh, 2 bands -> their mean as
    green) annotated with its ``object_id`` and the ``label_keys`` it has (missing or NaN labels
    are skipped). ``per_band`` adds one asinh panel per band (one row per galaxy); otherwise
    the composites fill a compact grid. ``stretch`` is the linear range of the asinh in
    nanomaggies (astropy's ``stretch``); by default ``q`` times the noise sigma of
    :func:`noise_sigma`. ``q`` is the asinh softening ``Q``.
    """
    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise Sim2ObsValueError(f"out_png must end in .png, got '{out}'")
    fig = image_grid_figure(shard, n=n, rgb_bands=rgb_bands, label_keys=label_keys,
                            per_band=per_band, title=title, stretch=stretch, q=q)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
