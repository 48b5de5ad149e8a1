"""GalSim RealGalaxyCatalog files -> shards (``sim2obs ingest --galsim-catalog FILE``).

Reads the COSMOS training samples that ``galsim_download_cosmos`` fetches (and any other file in
the ``galsim.RealGalaxyCatalog`` format) through GalSim itself: ``galsim.RealGalaxyCatalog(
file_name, dir=...)``, ``getGalImage(i)``, ``getPSFImage(i)``, ``getNoiseProperties(i)``,
``pixel_scale``, ``ident``, ``band``, ``mag``, ``weight``. The catalogue table needs the columns
GalSim reads: ``ident``, ``gal_filename``, ``PSF_filename``, ``gal_hdu``, ``PSF_hdu``,
``pixel_scale``, ``noise_variance`` (``noise_filename``, ``mag``, ``band``, ``weight``,
``stamp_flux`` optional here).

Flux calibration. The COSMOS training-sample images are count rates (counts/s) of the HST/ACS
F814W single-orbit COSMOS mosaic; GalSim normalises them with an AB zeropoint of 25.94 (an object
of mag 25.94 gives 1 count/s): GalSim ``galsim/galaxy_sample.py``, ``COSMOSCatalog.getBandpass``
(comment on "the nominal COSMOS zeropoint ... is supposedly 25.94 ... normalized to count rate")
and the ``makeGalaxy`` docstring ("drawing into an image with the COSMOS bandpass, zeropoint of
25.94, and pixel scale should give the right pixel values to mimic the actual COSMOS science
images"). So for band F814W: f[nmgy] = f[counts/s] x 10^(-0.4 (25.94 - 22.5)). Other bands use
the AB zeropoint GalSim lists for them in ``galsim.real.real_galaxy_bandpasses`` (assuming count
rates as for COSMOS; its F814W entry is 25.94333, 0.3 % from 25.94); ``--zeropoint`` overrides.

ivar: 1 / (noise_variance x multiplier^2) -- after a resampling, the variance each new pixel gets
from independent native pixels (:func:`~sim2obs.data.resample.resample_variance`) -- (the
COSMOS noise is correlated -- GalSim gives a noise correlation image via ``noise_filename`` --
but only the variance enters the ivar; recorded). Pixels padded outside the native stamp, and after an
interpolation those whose interpolant reaches past the native edge, get ivar = 0; NaN pixels get
image 0 and ivar 0.

Geometry. GalSim treats the galaxy as centred on the image's true centre ((n - 1) / 2, 0-based),
the same convention as the mocks. Each image is cut/padded to ``--stamp`` (default 64) keeping
that centre: by whole pixels when the native and target scales match and the size difference is
even (exact), otherwise with the flux-conserving resampler of :mod:`sim2obs.data.ingest`
(:func:`~sim2obs.data.resample.resample_flux`, ``galsim.InterpolatedImage``), which also converts to the survey's pixel
scale when it differs. The PSF image is brought to ``--psf-stamp`` pixels at the survey's scale
the same way and normalised to sum 1 (the fraction of the native PSF flux inside the stamp is
recorded). Everything used is recorded in the shard's ``config``.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from sim2obs.data.calibration import zeropoint_to_nmgy
from sim2obs.data.ingest import (
    BandData,
    IngestError,
    IngestOptions,
    RawObject,
    _opts_record,
    _Skips,
    _survey,
    assemble,
    write_ingested,
)
from sim2obs.data.resample import (
    _crop,
    masked_weight_fraction,
    resample_flux,
    resample_variance,
    true_centre_source,
)
from sim2obs.errors import Sim2ObsFileNotFoundError

COSMOS_F814W_ZEROPOINT = 25.94
DEFAULT_SURVEY = "hst-cosmos"
DEFAULT_BAND = "F814W"
DEFAULT_STAMP = 64
REQUIRED_COLUMNS = ("ident", "gal_filename", "PSF_filename", "gal_hdu", "PSF_hdu", "pixel_scale",
                    "noise_variance")
_HINT = ("download the COSMOS training sample with `galsim_download_cosmos -s 25.2` (or -s 23.5; "
         "it unpacks into GalSim's share folder unless given -d DIR) and pass the catalogue and its "
         "folder (--galsim-dir)")


def catalog_zeropoint(band: str, zeropoint: float | None = None) -> tuple[float, dict]:
    """(AB zeropoint of the catalogue's pixel values, record) for ``band``."""
    if zeropoint is not None:
        return float(zeropoint), {"method": "user zeropoint", "zeropoint": float(zeropoint)}
    if band.upper() == "F814W":
        return COSMOS_F814W_ZEROPOINT, {
            "method": "COSMOS F814W count rate, AB zeropoint 25.94 (GalSim galaxy_sample.py, "
                      "COSMOSCatalog.getBandpass)", "zeropoint": COSMOS_F814W_ZEROPOINT}
    from galsim.real import real_galaxy_bandpasses

    entry = real_galaxy_bandpasses.get(band.upper())
    if entry is None:
        raise LookupError(f"no known zeropoint for band '{band}' (GalSim knows "
                          f"{sorted(real_galaxy_bandpasses)}); pass --zeropoint")
    return float(entry[1]), {"method": "galsim.real.real_galaxy_bandpasses (count rate assumed)",
                             "zeropoint": float(entry[1]), "bandpass_file": entry[0]}


def _catalog_path(file_name, image_dir) -> tuple[Path, Path]:
    """(catalogue path, image folder) as GalSim resolves them."""
    if image_dir is None:
        full = Path(file_name)
        return full, full.parent
    return Path(os.path.join(str(image_dir), str(file_name))), Path(image_dir)


def open_catalog(file_name, image_dir=None):
    """``galsim.RealGalaxyCatalog`` with errors that name the file and say how to get it."""
    import galsim

    full, folder = _catalog_path(file_name, image_dir)
    if image_dir is None and not full.is_file() and not Path(file_name).parent.parts:
        # where galsim_download_cosmos puts it by default: <galsim share>/COSMOS_<sample>_training_sample
        from galsim import meta_data

        sample = "25.2" if "25.2" in str(file_name) else "23.5" if "23.5" in str(file_name) else None
        shared = Path(meta_data.share_dir) / f"COSMOS_{sample}_training_sample"
        if sample and (shared / str(file_name)).is_file():
            image_dir, full, folder = shared, shared / str(file_name), shared
    if image_dir is not None and not folder.is_dir():
        raise Sim2ObsFileNotFoundError(f"GalSim catalogue folder '{folder}' does not exist; {_HINT}")
    if not full.is_file():
        raise Sim2ObsFileNotFoundError(f"GalSim RealGalaxyCatalog '{full}' does not exist; {_HINT}")
    try:
        cat = galsim.RealGalaxyCatalog(str(file_name), dir=None if image_dir is None else str(image_dir))
    except Exception as exc:  # noqa: BLE001 -- pyfits/GalSim raise many kinds for bad files
        raise IngestError(str(full), f"not a readable RealGalaxyCatalog FITS table ({exc})") from exc
    names = {n.lower() for n in cat.cat.columns.names}
    missing = [c for c in REQUIRED_COLUMNS if c.lower() not in names]
    if missing:
        raise IngestError(str(full), f"not a RealGalaxyCatalog: columns {missing} are missing "
                                     f"(has {list(cat.cat.columns.names)})")
    return cat


def _optional(cat, attr):
    try:
        return getattr(cat, attr)
    except (KeyError, OSError):
        return None


def _to_stamp(arr: np.ndarray, scale_in: float, scale_out: float, stamp: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image, coverage 0..1, record): ``arr`` on a ``stamp`` grid at ``scale_out`` with the
    input's true centre on the output's true centre, flux conserved."""
    h, w = arr.shape
    to = _grid_scale(scale_in, scale_out)
    same = to == scale_in
    # the input point that lands on pixel stamp//2 (sim2obs < 0.2.3 put it half an *input* pixel
    # past the centre of even stamps: resampled galaxies sat 0.5 (1 - scale_in / scale_out) px off)
    cy, cx = true_centre_source(h, stamp, scale_in, to), true_centre_source(w, stamp, scale_in, to)
    if same and float(cy).is_integer() and float(cx).is_integer():
        centre = (int(cy), int(cx))
        return (_crop(arr, centre, stamp), _crop(np.ones_like(arr), centre, stamp),
                {"kind": "crop/pad (whole pixels)", "centre_yx": [cy, cx], "stamp": stamp})
    out = resample_flux(arr, scale_in, to, stamp, (cy, cx))
    area = (to / scale_in) ** 2
    cover = resample_flux(np.ones_like(arr), scale_in, to, stamp, (cy, cx)) / area
    kind = ("half-pixel shift" if same else "resampled") + " with galsim.InterpolatedImage(normalization='flux')"
    return out, cover, {"kind": kind, "from_arcsec": scale_in, "to_arcsec": scale_out,
                        "centre_yx": [cy, cx], "stamp": stamp}


def _grid_scale(scale_in: float, scale_out: float) -> float:
    """The scale the native image is resampled to: its own where the target differs by at most
    1e-4 (a whole- or half-pixel shift, no change of scale), else the target's."""
    return scale_in if abs(scale_in - scale_out) <= 1e-4 * scale_out else scale_out


def _resampling(record: dict) -> tuple[float, float, int, tuple[float, float]]:
    """(scale_in, scale, stamp, centre) of :func:`_to_stamp`'s resampling, from its ``record``."""
    return (record["from_arcsec"], _grid_scale(record["from_arcsec"], record["to_arcsec"]),
            record["stamp"], tuple(record["centre_yx"]))


def _stamp_masked_fraction(bad: np.ndarray, record: dict) -> np.ndarray:
    """Share of each stamp pixel's absolute weight from the native pixels ``bad`` (1 where bad)
    under :func:`_to_stamp`'s geometry ``record`` (negative interpolant lobes count too)."""
    if record["kind"].startswith("crop"):
        return _crop(bad.astype(np.float64), tuple(int(c) for c in record["centre_yx"]), record["stamp"])
    return masked_weight_fraction(bad.astype(np.float64), *_resampling(record))


def _stamp_variance(shape: tuple[int, int], var: float, record: dict) -> np.ndarray | float:
    """Per-pixel noise variance of :func:`_to_stamp`'s image for independent native pixels of
    variance ``var``: unchanged by a whole-pixel cut, else propagated through the resampling
    weights (:func:`~sim2obs.data.resample.resample_variance`)."""
    if record["kind"].startswith("crop"):
        return var
    return resample_variance(np.full(shape, float(var)), *_resampling(record))


def _read_object(cat, i: int, scale_out: float, stamp: int, psf_stamp: int, opts: IngestOptions,
                 default_band: str) -> RawObject:
    ident = cat.ident[i]
    gal_file, psf_file = cat.gal_file_name[i], cat.psf_file_name[i]
    where = f"{gal_file}[{cat.gal_hdu[i]}] (ident {ident})"
    for role, f in (("galaxy image", gal_file), ("PSF image", psf_file)):
        if not os.path.isfile(f):
            raise IngestError(where, f"{role} file '{f}' does not exist; {_HINT}")
    bands = _optional(cat, "band")
    band = str(bands[i]).strip() if bands is not None else default_band
    try:
        gal = cat.getGalImage(i)
        psf = cat.getPSFImage(i)
        noise_im, noise_scale, var = cat.getNoiseProperties(i)
    except Exception as exc:  # noqa: BLE001 -- pyfits errors for truncated files, bad HDU numbers
        raise IngestError(where, f"cannot read the galaxy/PSF/noise images ({type(exc).__name__}: {exc})") from exc
    scale_in = float(cat.pixel_scale[i])
    if not (scale_in > 0 and math.isfinite(scale_in)):
        raise IngestError(where, f"pixel_scale = {scale_in} is not a positive number")
    var = float(var)
    if not (var > 0 and math.isfinite(var)):
        raise IngestError(where, f"noise_variance = {var} is not a positive number")
    try:
        zp, cal = catalog_zeropoint(band, opts.zeropoint)
    except LookupError as exc:
        raise IngestError(where, str(exc)) from exc
    mult = zeropoint_to_nmgy(zp)
    img = gal.array.astype(np.float64)
    bad = ~np.isfinite(img)
    n_nan = int(bad.sum())
    if n_nan > opts.max_nan_fraction * img.size:
        raise IngestError(where, f"{n_nan} of {img.size} pixels are NaN/inf (more than "
                                 f"--max-nan-fraction {opts.max_nan_fraction})")
    img[bad] = 0.0
    out, cover, regrid = _to_stamp(img, scale_in, scale_out, stamp)
    from_bad = _stamp_masked_fraction(bad, regrid) if n_nan else 0.0
    var_out = _stamp_variance(img.shape, var, regrid)  # per output pixel (correlations ignored)
    ok = (np.abs(cover - 1.0) < 1e-3) & (from_bad < 1e-3) & (var_out > 0)  # edges, NaN pixels -> 0
    ivar = np.where(ok, 1.0 / np.where(ok, var_out * mult**2, 1.0), 0.0)
    p = psf.array.astype(np.float64)
    p_total = float(p.sum())
    if not (p_total > 0 and np.all(np.isfinite(p))):
        raise IngestError(f"{psf_file}[{cat.psf_hdu[i]}] (ident {ident})",
                          f"PSF image sums to {p_total} or has NaNs")
    p_out, _, p_rec = _to_stamp(p / p_total, scale_in, scale_out, psf_stamp)
    p_rec["flux_fraction_in_stamp"] = float(p_out.sum())
    p_out = p_out / p_out.sum()
    noise_file = cat.noise_file_name[i] if cat.noise_file_name is not None else None
    prov = {"gal_file": gal_file, "gal_hdu": int(cat.gal_hdu[i]), "psf_file": psf_file,
            "psf_hdu": int(cat.psf_hdu[i]), "native_shape": list(img.shape),
            "pixel_scale_arcsec": scale_in, "pixel_scale_from": "catalogue pixel_scale",
            "noise_variance": var, "noise_file": noise_file,
            "ivar": "1 / (noise_variance x multiplier^2)"
                    + ("" if regrid["kind"].startswith("crop") else
                       " propagated per pixel through the resampling weights") + "; "
                    + ("noise correlations (noise_file) ignored" if noise_im is not None
                       else "uncorrelated noise"),
            "calibration": dict(cal, band=band, multiplier=mult), "n_nan_native": n_nan,
            "regrid": regrid, "psf": dict(p_rec, source="catalogue PSF image"),
            "_scale": mult}
    bd = BandData(image=out, pixel_scale=scale_out, where=where, ivar=ivar, psf=p_out, prov=prov)
    o = RawObject(key=ident, files=[gal_file, psf_file] + ([noise_file] if noise_file else []))
    o.bands[band] = bd
    try:
        o.object_id = int(ident)
    except ValueError:
        o.object_id = None
    for name, attr, unit, conv in (("mag", "mag", f"mag (AB, {band}, catalogue)", 1.0),
                                   ("weight", "weight", "", 1.0),
                                   ("stamp_flux", "stamp_flux", "nanomaggy", mult)):
        vals = _optional(cat, attr)
        if vals is not None:
            o.labels[name] = float(vals[i]) * conv
            o.label_units[name] = unit
    return o


def ingest_galsim_catalog(file_name, out, opts: IngestOptions, image_dir=None, n: int | None = None,
                          log=None) -> tuple[list[Path], list[dict]]:
    """A ``galsim.RealGalaxyCatalog`` (first ``n`` objects, or all) -> shards in ``out``.
    Returns (shard paths, skipped objects)."""
    import galsim

    opts = replace(opts, survey=opts.survey or DEFAULT_SURVEY, stamp=int(opts.stamp or DEFAULT_STAMP),
                   source=opts.source or "galsim.RealGalaxyCatalog")
    cat = open_catalog(file_name, image_dir)
    scale_out = _survey(opts).pixel_scale_arcsec
    stamp = opts.stamp
    total = len(cat)
    count = total if n is None else min(int(n), total)
    if count < 1:
        raise IngestError(str(cat.file_name), "the catalogue has no objects" if total == 0
                          else f"--n {n} selects no object")
    default_band = (opts.bands[0] if opts.bands and len(opts.bands) == 1 else DEFAULT_BAND)
    skips = _Skips(opts.skip_bad)
    objects = []
    try:
        for i in range(count):
            try:
                objects.append(_read_object(cat, i, scale_out, stamp, opts.psf_stamp, opts, default_band))
            except IngestError as err:
                skips(err)
    finally:
        cat.close()
    if log and skips.items:
        log(f"{len(skips.items)} object(s) of {cat.file_name} skipped")
    arr = assemble(objects, opts, skips, log=log)
    base = {"ingest": {"kind": "galsim.RealGalaxyCatalog", "inputs": [str(cat.file_name)],
                       "catalog": str(cat.file_name), "image_dir": str(cat.image_dir),
                       "n_in_catalog": total, "n_read": count, "galsim_version": galsim.__version__,
                       "options": _opts_record(opts), "skipped": skips.items,
                       "flux_units": "count rate (counts/s) x 10^(-0.4 (ZP - 22.5)) -> nanomaggy"}}
    paths = write_ingested(arr, opts, out, base, calibrated=True, log=log)
    return paths, skips.items
