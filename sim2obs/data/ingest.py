"""Real cutouts into the shard format (DESIGN.md): FITS cutouts, flux calibration, resampling,
catalogue joins, provenance.

Entry points: :func:`ingest_fits` (FITS files), :func:`sim2obs.data.ingest_hdf5.ingest_hdf5`
(HDF5 arrays), :func:`sim2obs.data.examples.make_hdf_example` (built-in Hubble Deep Field set),
:func:`require_calibrated` (guard for anything that needs fluxes in nanomaggies).

FITS layouts understood (per file):

* a cube ``(B, H, W)`` in one image HDU, band names from ``BANDS`` (``'g,r,z'`` or ``'g r z'``),
  ``FILTER1..n`` / ``BAND1..n`` keywords, or ``--bands``;
* one 2-D image HDU per band, band from the EXTNAME (``IMAGE_G``, ``G``, ``SCI_F814W``) or the
  ``FILTER``/``BAND`` keyword, or ``--bands`` in HDU order;
* one file per band: files are grouped into objects with ``group_pattern``, a regular expression
  with a named group ``id`` (and optionally ``band``) searched in the file name, e.g.
  ``'(?P<id>\\d+)-HSC-(?P<band>[A-Z])'``.

Auxiliary HDUs are recognised by EXTNAME tokens: ``IVAR``/``INVVAR``/``WHT``/``WEIGHT`` (inverse
variance), ``VAR``/``VARIANCE``, ``ERR``/``SIGMA``/``RMS``/``NOISE`` (standard deviation),
``MASK``/``BITMASK``/``DQ``/``FLAGS`` (non-zero & ``mask_bits`` -> ivar = 0), ``PSF``; a binary
table with EXTNAME ``LABELS`` gives the object's labels (one row, column units kept).

Flux calibration (first that applies; the values used are recorded in the shard's provenance):
``zeropoint`` given by the user; ``BUNIT`` nanomaggy (x1), nJy (/3631), uJy (x1000/3631), Jy
(x1e9/3631); ``MAGZERO``/``MAGZP``/``ZEROPNT`` (f = counts 10^(-0.4 (ZP - 22.5)));
``FLUXMAG0`` (ZP = 2.5 log10 FLUXMAG0); HST ``PHOTFLAM`` with ``PHOTPLAM`` (AB ZP =
-2.5 log10 PHOTFLAM + PHOTZPT - 5 log10 PHOTPLAM + 18.692, PHOTZPT = -21.10 by default).
Without any of these the file is refused unless ``uncalibrated=True``
(:mod:`sim2obs.data.calibration`, with the constants' sources).

Resampling (:mod:`sim2obs.data.resample`; when the pixel scale differs from the target survey's, or the stamp size differs): the
image is the quintic ``galsim.InterpolatedImage`` (normalization='flux') surface recentred on the
brightest source near the centre, sampled at the new pixel centres when they are finer and
integrated over each new pixel when they are coarser (flux conserved exactly for sources inside
the cutout; the new pixels then carry the input's pixel response convolved with their own, as in
drizzling). The ivar is each new pixel's exact noise variance for independent input pixels
(:func:`~sim2obs.data.resample.resample_variance`; the resampled noise is correlated between
neighbours, which a per-pixel ivar cannot say). Masked input pixels are zeroed first; new
pixels that draw 1e-3 or more of their absolute weight from them, or whose interpolant reaches
past the input footprint, get ivar = 0. Same-scale stamps of another size are
cropped/padded by whole pixels around the brightest source (exact). Everything is recorded.
"""

from __future__ import annotations

import glob
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim2obs.data.calibration import (  # noqa: F401  (re-exported: the 0.2 import path)
    NJY_PER_NMGY,
    flux_scale,
    hst_ab_zeropoint,
    zeropoint_to_nmgy,
)
from sim2obs.data.resample import (  # noqa: F401  (re-exported: the 0.2 import path)
    _crop,
    _regrid_band,
    brightest_near_centre,
    resample_flux,
)
from sim2obs.data.shards import Shard, ShardAttrs, shard_filename, write_shard
from sim2obs.errors import Sim2ObsDataError, Sim2ObsFileNotFoundError

_ROLE_TOKENS = {
    "IVAR": "ivar", "INVVAR": "ivar", "WHT": "ivar", "WEIGHT": "ivar", "WEIGHTS": "ivar",
    "VAR": "var", "VARIANCE": "var",
    "ERR": "sigma", "SIGMA": "sigma", "RMS": "sigma", "NOISE": "sigma", "STD": "sigma",
    "MASK": "mask", "BITMASK": "mask", "DQ": "mask", "FLAGS": "mask",
    "PSF": "psf",
    "SCI": "image", "IMAGE": "image", "IMG": "image", "DATA": "image", "FLUX": "image",
    "PRIMARY": "image",
}
_LABEL_HDU = "LABELS"
_ID_KEYS = ("OBJID", "OBJECT_ID", "OBJ_ID", "ID")


class IngestError(Sim2ObsDataError):
    """A bad input: ``where`` is the file (or object) and the message says what is wrong."""

    def __init__(self, where: str, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def require_calibrated(obj) -> None:
    """Raise a clear error unless ``obj`` holds calibrated fluxes in nanomaggies.

    ``obj``: a :class:`Shard`, :class:`ShardAttrs`, a shard file or a shard folder.
    """
    from sim2obs.data.shards import list_shards, read_shard

    where = ""
    if isinstance(obj, str | Path):
        path = Path(obj)
        first = list_shards(path)[0] if path.is_dir() else path
        obj = read_shard(first, with_noiseless=False)
        where = str(path)
    attrs = obj.attrs if isinstance(obj, Shard) else obj
    where = where or getattr(obj, "path", "") or "these shards"
    calibrated = attrs.config.get("calibrated", True) if isinstance(attrs.config, dict) else True
    if attrs.flux_unit != "nanomaggy" or calibrated is False:
        note = attrs.config.get("calibration_note", "") if isinstance(attrs.config, dict) else ""
        raise Sim2ObsDataError(
            f"{where}: fluxes are not calibrated (flux_unit='{attrs.flux_unit}', calibrated="
            f"{calibrated}); this step needs calibrated nanomaggies. {note}".strip()
        )


# ----------------------------------------------------------------------------------------------
# options and intermediate objects
# ----------------------------------------------------------------------------------------------

@dataclass
class IngestOptions:
    """Options of ``sim2obs ingest`` (see its --help)."""

    survey: str | None = None
    bands: tuple[str, ...] | None = None
    pixel_scale: float | None = None
    zeropoint: float | None = None
    uncalibrated: bool = False
    group_pattern: str | None = None
    stamp: int | None = None
    resample: bool = True
    psf_fwhm: float | None = None
    psf_stamp: int = 25
    mask_bits: int | None = None
    max_nan_fraction: float = 0.5
    catalog: str | None = None
    id_column: str = "object_id"
    skip_bad: bool = False
    shard_size: int = 1000
    name: str | None = None
    overwrite: bool = False
    source: str = ""


@dataclass
class BandData:
    image: np.ndarray                     # (H, W) nanomaggies (or raw when uncalibrated)
    pixel_scale: float
    where: str
    ivar: np.ndarray | None = None
    psf: np.ndarray | None = None
    prov: dict = field(default_factory=dict)


@dataclass
class RawObject:
    key: str
    bands: dict[str, BandData] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    labels: dict[str, float] = field(default_factory=dict)
    label_units: dict[str, str] = field(default_factory=dict)
    object_id: int | None = None


class _Skips:
    """Bad inputs: raised at once, or collected with --skip-bad."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.items: list[dict] = []

    def __call__(self, err: IngestError) -> None:
        if not self.skip_bad:
            raise err
        self.items.append({"input": err.where, "problem": err.problem})


# ----------------------------------------------------------------------------------------------
# reading FITS files
# ----------------------------------------------------------------------------------------------

def expand_inputs(inputs) -> list[Path]:
    """Paths from file names, folders (their *.fits*) and glob patterns, sorted, unique."""
    out: list[Path] = []
    for item in inputs:
        text = str(item)
        p = Path(text)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if re.search(r"\.(fits|fit|fts)(\.gz|\.fz)?$", q.name, re.I))
        elif p.exists():
            out.append(p)
        elif any(c in text for c in "*?["):
            hits = sorted(glob.glob(text))
            if not hits:
                raise Sim2ObsFileNotFoundError(f"no file matches '{text}'")
            out += [Path(h) for h in hits]
        else:
            raise Sim2ObsFileNotFoundError(f"input file '{text}' does not exist")
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    return uniq


def _tokens(extname: str) -> tuple[str | None, str | None]:
    """(role, band) from an EXTNAME such as 'IVAR_g', 'G', 'SCI', 'image-r'."""
    role, band = None, None
    for tok in re.split(r"[_\-\s.]+", extname.strip()):
        if not tok:
            continue
        if tok.upper() in _ROLE_TOKENS and role is None:
            role = _ROLE_TOKENS[tok.upper()]
        elif band is None:
            band = tok
    return role, band


def _cube_bands(header, n: int, opts: IngestOptions, where: str) -> list[str]:
    if "BANDS" in header:
        names = [b for b in re.split(r"[,\s]+", str(header["BANDS"]).strip()) if b]
        if len(names) != n:
            raise IngestError(where, f"BANDS = '{header['BANDS']}' lists {len(names)} bands but the cube has {n} planes")
        return names
    for prefix in ("FILTER", "BAND"):
        if all(f"{prefix}{i + 1}" in header for i in range(n)):
            return [str(header[f"{prefix}{i + 1}"]).strip() for i in range(n)]
    if opts.bands and len(opts.bands) == n:
        return list(opts.bands)
    raise IngestError(where, f"a cube of {n} planes with no BANDS or FILTER1..{n} keywords: pass --bands with {n} names")


def _pixel_scale(header, fallback_header, opts: IngestOptions, where: str) -> tuple[float, str]:
    if opts.pixel_scale is not None:
        return float(opts.pixel_scale), "--pixel-scale"
    from astropy.wcs import WCS, FITSFixedWarning
    from astropy.wcs.utils import proj_plane_pixel_scales

    for hdr in (header, fallback_header):
        if hdr is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            try:
                w = WCS(hdr, naxis=2)
            except Exception:  # noqa: BLE001 -- any malformed WCS counts as absent
                continue
        if not w.has_celestial:
            continue
        scales = proj_plane_pixel_scales(w.celestial) * 3600.0
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            continue
        if abs(scales[0] - scales[1]) > 0.01 * scales.max():
            raise IngestError(where, f"non-square pixels ({scales[0]:.4g}\" x {scales[1]:.4g}\"): not supported")
        return float(np.sqrt(scales[0] * scales[1])), "WCS"
    raise IngestError(where, "no celestial WCS in the header and no --pixel-scale given")


def _open_fits(path: Path):
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*truncat.*")
            hdul = fits.open(path, memmap=False)
            for hdu in hdul:
                _ = hdu.data  # read now: a truncated file fails here, not later
        return hdul
    except (OSError, ValueError, TypeError, IndexError, Warning) as exc:
        raise IngestError(str(path), f"not a readable FITS file ({exc}); it may be truncated") from exc


def _object_key(path: Path, primary_header, opts: IngestOptions) -> tuple[str, str | None]:
    if opts.group_pattern:
        m = re.search(opts.group_pattern, path.name)
        if not m or "id" not in m.groupdict() or m.group("id") is None:
            raise IngestError(str(path), f"file name does not match --group-pattern '{opts.group_pattern}' "
                                         "(which needs a named group (?P<id>...))")
        return m.group("id"), m.groupdict().get("band")
    for key in _ID_KEYS:
        if key in primary_header:
            return str(primary_header[key]).strip(), None
    return path.name.split(".")[0], None


def read_fits_file(path: Path, opts: IngestOptions) -> tuple[str, dict[str, BandData], dict, dict]:
    """(object key, {band: BandData}, labels, label units) of one FITS file (one object or one
    band of one object). Raises :class:`IngestError` naming the file."""
    from astropy.io import fits

    where = str(path)
    hdul = _open_fits(path)
    with hdul:
        primary = hdul[0].header
        key, name_band = _object_key(path, primary, opts)
        images, aux, labels, units = [], [], {}, {}
        for i, hdu in enumerate(hdul):
            extname = str(hdu.header.get("EXTNAME", "PRIMARY" if i == 0 else ""))
            if isinstance(hdu, fits.BinTableHDU | fits.TableHDU):
                if extname.upper() == _LABEL_HDU and len(hdu.data):
                    for col in hdu.columns:
                        if col.name == "object_id":
                            continue
                        val = np.asarray(hdu.data[col.name][0])
                        if val.ndim == 0 and val.dtype.kind in "iuf":
                            labels[col.name] = float(val)
                            units[col.name] = str(col.unit or "")
                continue
            if hdu.data is None or hdu.data.ndim not in (2, 3):
                continue
            role, band = _tokens(extname)
            band = hdu.header.get("FILTER") or hdu.header.get("BAND") or band
            entry = (i, extname, role or "image", None if band is None else str(band).strip(), hdu)
            (images if entry[2] == "image" else aux).append(entry)
        if not images:
            raise IngestError(where, "no image HDU (2-D or 3-D) found")
        out: dict[str, BandData] = {}
        order: list[str] = []
        for i, extname, _, band, hdu in images:
            hwhere = f"{where}[{extname or i}]"
            data = np.asarray(hdu.data, dtype=np.float64)
            if data.ndim == 3:
                names = _cube_bands(hdu.header, data.shape[0], opts, hwhere)
                planes = list(zip(names, data, strict=True))
            else:
                if band is None:
                    band = name_band
                if band is None and len(images) == 1 and opts.bands and len(opts.bands) == 1:
                    band = opts.bands[0]
                if band is None and opts.bands and len(opts.bands) == len(images):
                    band = opts.bands[len(order)]
                if band is None:
                    raise IngestError(hwhere, "no band name (EXTNAME, FILTER/BAND keyword, the "
                                              "file name pattern's 'band' group or --bands)")
                planes = [(band, data)]
            scale, scale_src = _pixel_scale(hdu.header, primary, opts, hwhere)
            for b, plane in planes:
                if b in out:
                    raise IngestError(hwhere, f"band '{b}' appears twice in the file")
                out[b] = BandData(image=plane, pixel_scale=scale, where=hwhere,
                                  prov={"hdu": extname or i, "pixel_scale_from": scale_src,
                                        "pixel_scale_arcsec": scale})
                order.append(b)
            _calibrate(out, [b for b, _ in planes], hdu.header, primary, opts, hwhere)
        _attach_aux(out, order, aux, where, opts)
    return key, out, labels, units


def _calibrate(out, bands, header, primary, opts, where) -> None:
    def lookup(k):
        return header.get(k, primary.get(k))

    if opts.uncalibrated:
        scale, rec = 1.0, {"method": "none (--uncalibrated)"}
    else:
        try:
            scale, rec = flux_scale(lookup, opts.zeropoint)
        except LookupError as exc:
            raise IngestError(where, str(exc)) from exc
    for b in bands:
        out[b].prov["calibration"] = dict(rec, multiplier=scale)
        out[b].prov["_scale"] = scale


def _attach_aux(out: dict[str, BandData], order: list[str], aux, where: str, opts: IngestOptions) -> None:
    by_role: dict[str, list] = {}
    for entry in aux:
        by_role.setdefault(entry[2], []).append(entry)
    masks: dict[str, np.ndarray] = {}
    for role, entries in by_role.items():
        for k, (i, extname, _, band, hdu) in enumerate(entries):
            hwhere = f"{where}[{extname or i}]"
            data = np.asarray(hdu.data, dtype=np.float64)
            if data.ndim == 3:
                if data.shape[0] != len(order):
                    raise IngestError(hwhere, f"{role} cube has {data.shape[0]} planes for {len(order)} bands")
                pairs = list(zip(order, data, strict=True))
            else:
                b = band if band in out else None
                if b is None and len(order) == 1:
                    b = order[0]
                if b is None and len(entries) == len(order):
                    b = order[k]
                if b is None:
                    raise IngestError(hwhere, f"cannot tell which band this {role} HDU belongs to "
                                              "(name it e.g. IVAR_g or set FILTER)")
                pairs = [(b, data)]
            for b, plane in pairs:
                bd = out[b]
                if role != "psf" and plane.shape != bd.image.shape:
                    raise IngestError(hwhere, f"{role} shape {plane.shape} != image shape {bd.image.shape}")
                s = bd.prov["_scale"]
                if role == "psf":
                    bd.psf = plane
                    bd.prov["psf"] = f"HDU {extname or i}"
                    continue
                if role == "mask":
                    bits = opts.mask_bits
                    m = (plane.astype(np.int64) & bits) != 0 if bits is not None else plane != 0
                    masks[b] = masks.get(b, np.zeros(plane.shape, bool)) | m
                    bd.prov["mask"] = f"HDU {extname or i}" + (f" & {bits}" if bits is not None else " != 0")
                    continue
                with np.errstate(divide="ignore", invalid="ignore"):
                    if role == "ivar":
                        ivar = plane / s**2
                    elif role == "var":
                        ivar = np.where(plane > 0, 1.0 / (plane * s**2), 0.0)
                    else:  # sigma
                        ivar = np.where(plane > 0, 1.0 / (plane * s) ** 2, 0.0)
                ivar[~np.isfinite(ivar) | (ivar < 0)] = 0.0
                bd.ivar = ivar
                bd.prov["ivar"] = f"{role} HDU {extname or i}"
    for b, m in masks.items():
        out[b].prov["n_masked"] = int(m.sum())
        out[b].prov["_mask"] = m


def _finish_band(bd: BandData, opts: IngestOptions, where: str) -> None:
    """Apply the flux scale, NaN and mask handling, and the ivar estimate if none was given."""
    from astropy.stats import sigma_clipped_stats

    s = bd.prov.pop("_scale", 1.0)
    mask = bd.prov.pop("_mask", None)
    img = bd.image * s
    bad = ~np.isfinite(img)
    n_nan = int(bad.sum())
    if n_nan > opts.max_nan_fraction * img.size:
        raise IngestError(where, f"{n_nan} of {img.size} pixels are NaN/inf (more than "
                                 f"--max-nan-fraction {opts.max_nan_fraction})")
    bd.prov["n_nan"] = n_nan
    if mask is not None:
        bad |= mask
    img[~np.isfinite(img)] = 0.0
    if bd.ivar is None:
        good = ~bad
        _, med, std = sigma_clipped_stats(img[good], sigma=3.0, maxiters=10)
        if not (std > 0 and np.isfinite(std)):
            raise IngestError(where, "no ivar/weight HDU and the background noise cannot be "
                                     "estimated (constant image?)")
        bd.ivar = np.full(img.shape, 1.0 / std**2)
        bd.prov["ivar"] = "estimated: sigma-clipped (3 sigma) background std, constant"
        bd.prov["background_std"] = float(std)
        bd.prov["background_median"] = float(med)
        bd.prov["ivar_estimated"] = True
    bd.ivar = np.where(bad, 0.0, bd.ivar)
    bd.image = img


# ----------------------------------------------------------------------------------------------
# objects -> shards
# ----------------------------------------------------------------------------------------------

def _match_band(name: str, wanted: list[str]) -> str | None:
    if name in wanted:
        return name
    low = {w.lower(): w for w in wanted}
    if name.lower() in low:
        return low[name.lower()]
    tail = re.split(r"[-_\s]", name)[-1].lower()
    return low.get(tail)


def _survey(opts: IngestOptions):
    if not opts.survey:
        return None
    from sim2obs.forward_models.surveys import get_survey

    return get_survey(opts.survey)


def assemble(objects: list[RawObject], opts: IngestOptions, skips: _Skips, log=None) -> dict:
    """Validate, calibrate, regrid and stack objects; returns arrays and provenance."""
    spec = _survey(opts)
    if opts.bands:
        bands = list(opts.bands)
    elif spec is not None:
        found = {_match_band(b, list(spec.band_names)) for o in objects for b in o.bands}
        bands = [b for b in spec.band_names if b in found]
    else:
        bands = list(objects[0].bands) if objects else []
    if not bands:
        raise Sim2ObsDataError(f"none of the input bands match the survey bands {list(spec.band_names)}; "
                               "pass --bands")
    kept: list[RawObject] = []
    for o in objects:
        renamed = {}
        for b, bd in o.bands.items():
            m = _match_band(b, bands)
            if m is not None:
                bd.prov["input_band"] = b
                renamed[m] = bd
        missing = [b for b in bands if b not in renamed]
        if missing:
            skips(IngestError(f"object '{o.key}' ({', '.join(o.files)})",
                              f"lacks band(s) {missing} (has {sorted(o.bands)})"))
            continue
        try:
            for b in bands:
                _finish_band(renamed[b], opts, renamed[b].where)
        except IngestError as err:
            skips(err)
            continue
        o.bands = {b: renamed[b] for b in bands}
        kept.append(o)
    if not kept:
        raise Sim2ObsDataError("no object left to ingest" + (
            f"; skipped: {[s['input'] for s in skips.items]}" if skips.items else ""))
    first = kept[0].bands[bands[0]]
    scale_out = spec.pixel_scale_arcsec if spec is not None else first.pixel_scale
    if spec is None and opts.pixel_scale is None:
        scales = {round(bd.pixel_scale, 6) for o in kept for bd in o.bands.values()}
        if len(scales) > 1 and log:
            log(f"inputs have pixel scales {sorted(scales)} arcsec; resampling all to the first "
                f"({scale_out:.4g}\"); pass --survey to choose the target")
    stamp = opts.stamp or int(round(min(first.image.shape) * first.pixel_scale / scale_out))
    psf_sizes = {bd.psf.shape for o in kept for bd in o.bands.values() if bd.psf is not None}
    images, ivars, psfs, prov = [], [], [], []
    for o in kept:
        needs = [bd for bd in o.bands.values()
                 if abs(bd.pixel_scale - scale_out) > 1e-4 * scale_out or bd.image.shape != (stamp, stamp)]
        if needs and not opts.resample:
            bd = needs[0]
            raise IngestError(bd.where, f"pixel scale {bd.pixel_scale:.4g}\" / shape {bd.image.shape} "
                                        f"differ from the target {scale_out:.4g}\" / {stamp}x{stamp} "
                                        "and --no-resample was given")
        if needs:
            shapes = {bd.image.shape for bd in o.bands.values()}
            # masked pixels (cosmic rays, saturated stars: ivar 0) must not decide the centre
            clean = [np.where(bd.ivar > 0, bd.image, 0.0) if bd.ivar is not None else bd.image
                     for bd in o.bands.values()]
            centre = brightest_near_centre(sum(clean) if len(shapes) == 1 else clean[0])
            for bd in o.bands.values():
                _regrid_band(bd, scale_out, stamp, centre, opts.psf_stamp)
        for b, bd in o.bands.items():
            if bd.psf is None:
                bd.psf = _model_psf(spec, b, scale_out, opts, bd.where)
                bd.prov["psf"] = "modelled: " + ("survey median FWHM" if opts.psf_fwhm is None
                                                 else f"Gaussian FWHM {opts.psf_fwhm}\"")
        images.append(np.stack([o.bands[b].image for b in bands]))
        ivars.append(np.stack([o.bands[b].ivar for b in bands]))
        psfs.append([o.bands[b].psf for b in bands])
        prov.append({"object": o.key, "files": o.files,
                     "bands": {b: o.bands[b].prov for b in bands}})
    p_out = _common_psf_size(psfs, psf_sizes, opts)
    psf_arr = np.stack([np.stack([_pad_psf(p, p_out) for p in row]) for row in psfs])
    return {"bands": bands, "scale": scale_out, "stamp": stamp, "objects": kept,
            "images": np.stack(images), "ivar": np.stack(ivars), "psf": psf_arr, "prov": prov,
            "survey": spec.name if spec is not None else "custom"}


def _model_psf(spec, band, scale, opts, where) -> np.ndarray:
    import galsim

    from sim2obs.forward_models.psf import psf_image, psf_profile

    if opts.psf_fwhm is not None:
        return psf_image(galsim.Gaussian(fwhm=opts.psf_fwhm), scale, opts.psf_stamp)
    if spec is not None and band in spec.band_names:
        return psf_image(psf_profile(spec, spec.band(band)), scale, opts.psf_stamp)
    raise IngestError(where, f"no PSF HDU for band '{band}' and nothing to model it from: pass "
                             "--survey (median PSF of that band) or --psf-fwhm ARCSEC")


def _common_psf_size(psfs, sizes, opts) -> int:
    all_sizes = {p.shape for row in psfs for p in row}
    if len(all_sizes) == 1:
        return next(iter(all_sizes))[0]
    return opts.psf_stamp


def _pad_psf(p: np.ndarray, size: int) -> np.ndarray:
    if p.shape == (size, size):
        return p
    out = _crop(p, (p.shape[0] // 2, p.shape[1] // 2), size)
    return out / out.sum()


def assign_ids(objects: list[RawObject]) -> tuple[np.ndarray, dict | None]:
    """int64 ids: the objects' own integer ids when all have one (unique), else 0..N-1 with the
    names recorded."""
    ids = []
    for o in objects:
        if o.object_id is not None:
            ids.append(o.object_id)
        elif re.fullmatch(r"[+-]?\d+", o.key.strip()):
            ids.append(int(o.key))
        else:
            ids = None
            break
    if ids is not None and len(set(ids)) == len(ids):
        return np.asarray(ids, np.int64), None
    if ids is not None:
        dup = sorted({i for i in ids if ids.count(i) > 1})[:10]
        raise Sim2ObsDataError(f"duplicate object ids {dup} in the inputs")
    return np.arange(len(objects), dtype=np.int64), {str(i): o.key for i, o in enumerate(objects)}


def join_catalog(keys: list[str], ids: np.ndarray, path: str | Path, id_column: str,
                 log=None) -> tuple[dict, dict, dict]:
    """Labels from a CSV/FITS/ECSV table, matched on ``id_column`` (to the object ids, or to the
    object names from file names). Duplicate ids are refused; objects absent from the table get
    NaN and are listed. Returns (labels, units, record)."""
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise Sim2ObsFileNotFoundError(f"catalogue '{path}' does not exist")
    try:
        fmt = "ascii.csv" if path.suffix.lower() == ".csv" else None
        table = Table.read(path, format=fmt)
    except Exception as exc:  # noqa: BLE001 -- astropy raises many kinds for bad tables
        raise IngestError(str(path), f"cannot read the catalogue ({exc})") from exc
    if id_column not in table.colnames:
        raise IngestError(str(path), f"no id column '{id_column}' (columns: {table.colnames}); pass --id-column")

    def norm(v) -> str:
        if isinstance(v, bytes | np.bytes_):
            v = v.decode()
        if isinstance(v, float | np.floating) and float(v).is_integer():
            v = int(v)
        return str(v).strip()

    cat_keys = [norm(v) for v in table[id_column]]
    seen: dict[str, int] = {}
    dups = set()
    for i, k in enumerate(cat_keys):
        if k in seen:
            dups.add(k)
        seen[k] = i
    if dups:
        raise IngestError(str(path), f"duplicate ids in column '{id_column}': {sorted(dups)[:10]}")
    rows, missing = [], []
    for k, oid in zip(keys, ids, strict=True):
        r = seen.get(str(int(oid)), seen.get(k))
        rows.append(r)
        if r is None:
            missing.append(k)
    labels, units, skipped_cols = {}, {}, []
    for name in table.colnames:
        if name == id_column:
            continue
        col = table[name]
        if col.ndim != 1 or col.dtype.kind not in "iufb":
            skipped_cols.append(name)
            continue
        vals = np.asarray(col.filled(np.nan) if hasattr(col, "filled") else col, dtype=np.float64)
        labels[name] = np.array([vals[r] if r is not None else np.nan for r in rows])
        units[name] = str(col.unit) if col.unit is not None else ""
    if missing and log:
        log(f"catalogue {path}: {len(missing)} object(s) not found, labels NaN: {missing[:20]}")
    rec = {"catalog": str(path), "id_column": id_column, "columns": sorted(labels),
           "missing_ids": missing, "non_numeric_columns_skipped": skipped_cols}
    return labels, units, rec


def write_ingested(arr: dict, opts: IngestOptions, out: str | Path, base_config: dict,
                   calibrated: bool = True, log=None, extra_labels=None) -> list[Path]:
    """Join labels, assign ids, and write the shards (refusing to overwrite unless asked)."""
    out = Path(out)
    objects = arr["objects"]
    keys = [o.key for o in objects]
    ids, names = assign_ids(objects)
    labels: dict[str, np.ndarray] = {"object_id": ids}
    units: dict[str, str] = {"object_id": ""}
    own = sorted({k for o in objects for k in o.labels})
    for k in own:
        labels[k] = np.array([o.labels.get(k, np.nan) for o in objects], dtype=np.float64)
        units[k] = next((o.label_units[k] for o in objects if k in o.label_units), "")
    if extra_labels:
        labels.update(extra_labels[0])
        units.update(extra_labels[1])
    config = dict(base_config)
    config["calibrated"] = bool(calibrated)
    if names:
        config["object_names"] = names
    if opts.catalog:
        cat, cunits, rec = join_catalog(keys, ids, opts.catalog, opts.id_column, log=log)
        labels.update(cat)
        units.update(cunits)
        config["catalog_join"] = rec
    name = opts.name or arr["survey"]
    existing = sorted(out.glob(f"{name}-?????.h5")) if out.is_dir() else []
    if existing and not opts.overwrite:
        raise Sim2ObsDataError(f"'{out}' already holds shards named '{name}-*.h5' ({len(existing)}); "
                               "pass --overwrite or choose another --out/--name")
    paths = []
    n = len(objects)
    size = max(1, int(opts.shard_size))
    for s, start in enumerate(range(0, n, size)):
        sl = slice(start, start + size)
        cfg = dict(config, objects=arr["prov"][sl])
        attrs = ShardAttrs(survey=arr["survey"], bands=tuple(arr["bands"]),
                           pixel_scale_arcsec=float(arr["scale"]), domain="real",
                           source=opts.source or "ingest", config=cfg,
                           flux_unit="nanomaggy" if calibrated else "uncalibrated")
        shard = Shard(images=arr["images"][sl].astype(np.float32),
                      ivar=arr["ivar"][sl].astype(np.float32), psf=arr["psf"][sl].astype(np.float32),
                      labels={k: v[sl] for k, v in labels.items()}, attrs=attrs, label_units=units)
        paths.append(write_shard(out / shard_filename(name, s), shard))
    for old in existing[len(paths):]:
        old.unlink()
    from sim2obs.data.manifest import update_manifest

    update_manifest(out, on_error="skip", log=log)  # manifest.json: counts, ids, checksums
    return paths


def ingest_fits(inputs, out: str | Path, opts: IngestOptions, log=None) -> tuple[list[Path], list[dict]]:
    """FITS cutouts -> shards in ``out``. Returns (shard paths, skipped inputs)."""
    files = expand_inputs(inputs)
    if not files:
        raise Sim2ObsFileNotFoundError("no input files")
    skips = _Skips(opts.skip_bad)
    objects: dict[str, RawObject] = {}
    for path in files:
        try:
            key, bands, labels, units = read_fits_file(path, opts)
        except IngestError as err:
            skips(err)
            continue
        obj = objects.setdefault(key, RawObject(key=key))
        for b, bd in bands.items():
            if b in obj.bands:
                skips(IngestError(str(path), f"band '{b}' of object '{key}' already read from "
                                             f"{obj.bands[b].where}"))
                continue
            obj.bands[b] = bd
        obj.files.append(str(path))
        obj.labels.update(labels)
        obj.label_units.update(units)
    arr = assemble(list(objects.values()), opts, skips, log=log)
    calibrated = not opts.uncalibrated
    base = {"ingest": {"kind": "fits", "inputs": [str(p) for p in files], "options": _opts_record(opts),
                       "skipped": skips.items}}
    if not calibrated:
        base["calibration_note"] = "ingested with --uncalibrated: pixel values are raw, not nanomaggies"
    paths = write_ingested(arr, opts, out, base, calibrated=calibrated, log=log)
    return paths, skips.items


def _opts_record(opts: IngestOptions) -> dict:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}
