"""HDF5 image arrays -> shards (``sim2obs ingest data.h5 --images-key images --bands g r z``).

The images dataset is (N, B, H, W) (channel-first), (N, H, W, B) (channel-last) or (N, H, W)
(one band); the axis order is detected from the number of ``--bands`` (or a ``bands`` attribute)
unless ``--layout`` says it. ``uint8`` images (colour JPEG-like composites such as Galaxy10) are
stored as they are with ``calibrated: false`` and ``flux_unit='uncalibrated'``. Float images are
calibrated from a ``BUNIT``/``unit``/``flux_unit``/``MAGZERO``... attribute of the dataset or the
file (same conventions as FITS headers), or ``--zeropoint``. The pixel scale comes from a
``pixel_scale_arcsec``/``pixel_scale`` attribute, ``--pixel-scale``, or else the ``--survey``'s
(recorded as assumed). Labels: ``--labels-key`` names a group of (N,) datasets (attribute
``unit``) or a compound dataset; ids from ``--ids-key``, a label ``object_id``/``id``/``objid``,
or the row index. Everything is loaded into memory (fine up to a few GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim2obs.data.calibration import flux_scale
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
from sim2obs.errors import Sim2ObsFileNotFoundError


@dataclass
class HDF5Keys:
    images: str = "images"
    ivar: str | None = None
    labels: str | None = None
    ids: str | None = None
    layout: str = "auto"  # auto | channel-first | channel-last


def _attr(obj, *names):
    for n in names:
        if n in obj.attrs:
            v = obj.attrs[n]
            return v.decode() if isinstance(v, bytes) else v
    return None


def _to_nbhw(arr: np.ndarray, nb: int, layout: str, where: str) -> tuple[np.ndarray, str]:
    if arr.ndim == 3:
        if nb != 1:
            raise IngestError(where, f"images are (N, H, W) = {arr.shape} but {nb} bands were named")
        return arr[:, None], "single band"
    if arr.ndim != 4:
        raise IngestError(where, f"images must be (N, B, H, W) or (N, H, W, B), got shape {arr.shape}")
    if layout == "auto":
        first, last = arr.shape[1] == nb, arr.shape[3] == nb
        if first and last:
            raise IngestError(where, f"shape {arr.shape}: both axis 1 and axis 3 have {nb} entries; "
                                     "pass --layout channel-first or channel-last")
        if not (first or last):
            raise IngestError(where, f"shape {arr.shape} has no axis of {nb} bands (named {nb}); "
                                     "check --bands or pass --layout")
        layout = "channel-first" if first else "channel-last"
    out = arr if layout == "channel-first" else np.moveaxis(arr, 3, 1)
    if out.shape[1] != nb:
        raise IngestError(where, f"{layout} images have {out.shape[1]} bands but {nb} were named")
    return out, layout


def ingest_hdf5(path, out, opts: IngestOptions, keys: HDF5Keys | None = None,
                log=None) -> tuple[list[Path], list[dict]]:
    """One HDF5 file of images (+ ivar, labels) -> shards in ``out``."""
    import h5py

    keys = keys or HDF5Keys()
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise Sim2ObsFileNotFoundError(f"input file '{path}' does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise IngestError(where, f"not a readable HDF5 file ({exc}); it may be truncated") from exc
    skips = _Skips(opts.skip_bad)
    with f:
        if keys.images not in f:
            raise IngestError(where, f"no dataset '{keys.images}' (top level has {sorted(f.keys())}); "
                                     "pass --images-key")
        ds = f[keys.images]
        bands = opts.bands or _attr(ds, "bands") or _attr(f, "bands")
        if bands is None:
            if ds.ndim == 3:
                bands = ("band0",)
            else:
                raise IngestError(where, f"images '{keys.images}' {ds.shape}: name the bands with --bands")
        bands = tuple(b.decode() if isinstance(b, bytes) else str(b) for b in bands)
        try:
            raw = ds[()]
        except OSError as exc:
            raise IngestError(where, f"cannot read '{keys.images}' ({exc}); the file may be truncated") from exc
        images, layout = _to_nbhw(raw, len(bands), keys.layout, f"{where}:{keys.images}")
        is_uint8 = raw.dtype == np.uint8
        calibrated = not (is_uint8 or opts.uncalibrated)
        if not calibrated:
            scale, rec = 1.0, {"method": "none: uint8 colour image" if is_uint8 else "none (--uncalibrated)"}
        else:
            def lookup(k):
                alias = {"BUNIT": ("BUNIT", "bunit", "unit", "flux_unit")}.get(k, (k, k.lower()))
                v = _attr(ds, *alias)
                return v if v is not None else _attr(f, *alias)

            try:
                scale, rec = flux_scale(lookup, opts.zeropoint)
            except LookupError as exc:
                raise IngestError(where, str(exc)) from exc
        pix = opts.pixel_scale or _attr(ds, "pixel_scale_arcsec", "pixel_scale") or \
            _attr(f, "pixel_scale_arcsec", "pixel_scale")
        pix_src = "--pixel-scale" if opts.pixel_scale else "HDF5 attribute"
        if pix is None:
            spec = _survey(opts)
            if spec is None:
                raise IngestError(where, "no pixel_scale_arcsec attribute: pass --pixel-scale or --survey")
            pix, pix_src = spec.pixel_scale_arcsec, f"assumed: survey '{spec.name}' pixel scale"
            if log:
                log(f"{where}: no pixel scale in the file; assuming {pix}\" of --survey {spec.name}")
        ivar = None
        if keys.ivar:
            if keys.ivar not in f:
                raise IngestError(where, f"no dataset '{keys.ivar}' for --ivar-key")
            ivar, _ = _to_nbhw(f[keys.ivar][()], len(bands), layout if layout != "single band" else "auto",
                               f"{where}:{keys.ivar}")
            if ivar.shape != images.shape:
                raise IngestError(where, f"ivar shape {ivar.shape} != images shape {images.shape}")
        labels, units = {}, {}
        if keys.labels:
            if keys.labels not in f:
                raise IngestError(where, f"no group/dataset '{keys.labels}' for --labels-key")
            node = f[keys.labels]
            if isinstance(node, h5py.Group):
                for k in node:
                    if node[k].shape == (images.shape[0],) and node[k].dtype.kind in "iufb":
                        labels[k] = node[k][()]
                        units[k] = str(_attr(node[k], "unit") or "")
            elif node.dtype.names:
                for k in node.dtype.names:
                    if node.dtype[k].kind in "iufb":
                        labels[k] = node[k]
                        units[k] = ""
        ids = None
        if keys.ids:
            ids = f[keys.ids][()]
        else:
            for k in ("object_id", "id", "objid"):
                if k in labels:
                    ids = labels.pop(k)
                    units.pop(k, None)
                    break
    n = images.shape[0]
    if ids is not None and len(ids) != n:
        raise IngestError(where, f"{len(ids)} ids for {n} images")
    objects = []
    for i in range(n):
        key = str(int(ids[i])) if ids is not None else str(i)
        o = RawObject(key=key, files=[f"{where}[{i}]"], object_id=int(ids[i]) if ids is not None else i)
        for b, band in enumerate(bands):
            img = images[i, b].astype(np.float64)
            bd = BandData(image=img, pixel_scale=float(pix), where=f"{where}[{i}] band {band}",
                          prov={"pixel_scale_from": pix_src, "calibration": dict(rec, multiplier=scale),
                                "_scale": scale})
            if ivar is not None:
                iv = ivar[i, b].astype(np.float64) / scale**2
                iv[~np.isfinite(iv) | (iv < 0)] = 0.0
                bd.ivar = iv
                bd.prov["ivar"] = f"dataset {keys.ivar}"
            o.bands[band] = bd
        o.labels = {k: float(v[i]) for k, v in labels.items()}
        o.label_units = dict(units)
        objects.append(o)
    arr = assemble(objects, opts, skips, log=log)
    base = {"ingest": {"kind": "hdf5", "inputs": [where], "keys": vars(keys), "layout": layout,
                       "dtype": str(raw.dtype), "options": _opts_record(opts), "skipped": skips.items}}
    if not calibrated:
        base["calibration_note"] = ("uint8 colour images: pixel values are display levels, not fluxes"
                                    if is_uint8 else "ingested with --uncalibrated: raw pixel values")
    paths = write_ingested(arr, opts, out, base, calibrated=calibrated, log=log)
    return paths, skips.items
