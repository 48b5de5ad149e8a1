"""Shards -> per-object FITS cutouts (``sim2obs export --fits``), readable back by ``sim2obs ingest``.

Each object becomes ``OUT/NAME_<object_id>.fits``:

* ``layout='cube'`` (default): primary HDU = image cube (B, H, W) with ``BANDS = 'g,r,i'``;
  extensions ``IVAR`` (cube, nmgy^-2) and ``PSF`` (cube);
* ``layout='per-band'``: empty primary, then ``IMAGE_<band>``, ``IVAR_<band>``, ``PSF_<band>``
  per band (each with ``FILTER``);

plus a binary table ``LABELS`` with one row (every label, units as column units). Image headers
carry ``BUNIT='nanomaggy'``, ``MAGZERO=22.5`` and a TAN WCS whose ``CD`` matrix is the pixel scale
(north up, east left); the sky position is a placeholder (``CRVAL1/2`` = 0, 0 unless a
``ra``/``dec`` label exists), flagged by ``RADECSRC='placeholder'``. Uncalibrated shards are refused
unless ``allow_uncalibrated`` (then ``BUNIT='uncalibrated'`` and no ``MAGZERO``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError


def _wcs_header(pixel_scale_arcsec: float, shape: tuple[int, int], ra: float, dec: float, placeholder: bool):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    d = pixel_scale_arcsec / 3600.0
    w.wcs.cd = [[-d, 0.0], [0.0, d]]
    w.wcs.cunit = ["deg", "deg"]
    hdr = w.to_header()
    hdr["RADECSRC"] = ("placeholder" if placeholder else "labels",
                       "placeholder sky position" if placeholder else "ra/dec from the labels")
    return hdr


def export_fits(folder: str | Path, out: str | Path, layout: str = "cube", name: str | None = None,
                allow_uncalibrated: bool = False) -> list[Path]:
    """Write one FITS file per object of the shard folder (or file) ``folder`` into ``out``."""
    from astropy import units as u
    from astropy.io import fits
    from astropy.table import Table

    from sim2obs.data.ingest import require_calibrated
    from sim2obs.data.shards import read_folder, read_shard

    if layout not in ("cube", "per-band"):
        raise Sim2ObsValueError(f"layout must be 'cube' or 'per-band', got '{layout}'")
    folder = Path(folder)
    shard = read_shard(folder) if folder.is_file() else read_folder(folder, with_noiseless=False)
    calibrated = True
    try:
        require_calibrated(shard)
    except Sim2ObsDataError:
        if not allow_uncalibrated:
            raise
        calibrated = False
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = name or shard.attrs.survey
    bands = list(shard.bands)
    ids = shard.labels["object_id"]
    if len(set(ids.tolist())) != len(ids):
        raise Sim2ObsDataError(f"{folder}: object ids are not unique; cannot name one file per object")
    paths = []
    for i in range(len(shard)):
        oid = int(ids[i])
        has_pos = "ra" in shard.labels and "dec" in shard.labels and np.isfinite(shard.labels["ra"][i])
        ra, dec = (float(shard.labels["ra"][i]), float(shard.labels["dec"][i])) if has_pos else (0.0, 0.0)
        wcs = _wcs_header(shard.attrs.pixel_scale_arcsec, shard.images.shape[2:], ra, dec, not has_pos)

        def header(kind, band=None, wcs=wcs, oid=oid):
            h = fits.Header()
            h.extend(wcs)
            if kind == "image":
                h["BUNIT"] = "nanomaggy" if calibrated else "uncalibrated"
                if calibrated:
                    h["MAGZERO"] = (22.5, "AB magnitude of 1 nanomaggy")
            elif kind == "ivar":
                h["BUNIT"] = "nanomaggy-2" if calibrated else ""
            h["OBJID"] = oid
            h["SURVEY"] = shard.attrs.survey
            h["PIXSCALE"] = (shard.attrs.pixel_scale_arcsec, "arcsec/pixel")
            if band is None:
                h["BANDS"] = ",".join(bands)
            else:
                h["FILTER"] = band
            return h

        hdus = []
        psf = shard.psf[i if shard.psf.shape[0] > 1 else 0]
        if layout == "cube":
            hdus.append(fits.PrimaryHDU(shard.images[i], header=header("image")))
            if shard.ivar is not None:
                hdus.append(fits.ImageHDU(shard.ivar[i], header=header("ivar"), name="IVAR"))
            ph = header("psf")
            for k in list(wcs.keys()):
                ph.remove(k, ignore_missing=True)
            hdus.append(fits.ImageHDU(psf, header=ph, name="PSF"))
        else:
            prim = fits.Header()
            prim["OBJID"] = oid
            prim["SURVEY"] = shard.attrs.survey
            hdus.append(fits.PrimaryHDU(header=prim))
            for b, band in enumerate(bands):
                hdus.append(fits.ImageHDU(shard.images[i, b], header=header("image", band), name=f"IMAGE_{band}"))
                if shard.ivar is not None:
                    hdus.append(fits.ImageHDU(shard.ivar[i, b], header=header("ivar", band), name=f"IVAR_{band}"))
                hdus.append(fits.ImageHDU(psf[b], header=fits.Header([("FILTER", band)]), name=f"PSF_{band}"))
        table = Table()
        for key in sorted(shard.labels):
            if key == "object_id":
                continue
            table[key] = np.asarray(shard.labels[key][i:i + 1], dtype=np.float64)
            unit = shard.label_units.get(key, "")
            if unit:
                table[key].unit = u.Unit(unit, parse_strict="silent")  # unknown units kept as text
        table["object_id"] = np.asarray([oid], np.int64)
        hdus.append(fits.BinTableHDU(table, name="LABELS"))
        path = out / f"{prefix}_{oid}.fits"
        tmp = path.with_name(f".{path.name}.tmp")
        fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="exception")
        tmp.replace(path)
        paths.append(path)
    return paths
