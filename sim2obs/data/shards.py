"""The shard file format shared by every stage (DESIGN.md, "Shard format").

One HDF5 file per shard, ``NAME-00000.h5``::

    /images      float32 (N, B, H, W)  calibrated flux per pixel, nanomaggies (AB ZP 22.5)
    /ivar        float32 (N, B, H, W)  inverse variance, nmgy^-2 (optional for real data)
    /psf         float32 (N|1, B, P, P) PSF image per band at the cutout pixel scale, sums to 1
    /noiseless   float32 (N, B, H, W)  mocks only, optional
    /spectra     float32 (N, L)        optional, 1e-17 erg/s/cm^2/Å, with /wavelength_angstrom
    /labels/NAME float (N,)            attr 'unit'; NaN where unknown
    /labels/object_id int64 (N,)

File attributes: survey, bands, pixel_scale_arcsec, flux_unit='nanomaggy', domain ('sim' or
'real'), source, seed, config (JSON), sim2obs_version.

Writes go to a temporary file in the same folder that is renamed into place, so a shard either
exists complete or not at all; files are written without HDF5 timestamps so that the same input
gives the same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim2obs._atomic import atomic_output
from sim2obs.errors import Sim2ObsDataError, Sim2ObsFileNotFoundError

SHARD_PATTERN = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})\.h5$")
FLUX_UNIT = "nanomaggy"
_DOMAINS = ("sim", "real")


def shard_filename(name: str, index: int) -> str:
    """``NAME-00000.h5`` for shard ``index``."""
    return f"{name}-{index:05d}.h5"


@dataclass(frozen=True)
class ShardAttrs:
    """File-level attributes of a shard."""

    survey: str
    bands: tuple[str, ...]
    pixel_scale_arcsec: float
    domain: str
    source: str
    seed: int | None = None
    config: dict = field(default_factory=dict)
    flux_unit: str = FLUX_UNIT
    sim2obs_version: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(str(b) for b in self.bands))
        if not self.bands:
            raise Sim2ObsDataError("shard attribute 'bands' is empty")
        if self.domain not in _DOMAINS:
            raise Sim2ObsDataError(f"shard attribute 'domain' must be one of {_DOMAINS}, got '{self.domain}'")
        if not (self.pixel_scale_arcsec > 0):
            raise Sim2ObsDataError("shard attribute 'pixel_scale_arcsec' must be positive")
        if not self.sim2obs_version:
            from sim2obs import __version__

            object.__setattr__(self, "sim2obs_version", __version__)


@dataclass(frozen=True)
class Shard:
    """The content of one shard, validated on construction.

    ``labels`` maps names to (N,) arrays and must contain ``object_id``; ``label_units`` gives
    each label's unit string.
    """

    images: np.ndarray
    psf: np.ndarray
    labels: dict[str, np.ndarray]
    attrs: ShardAttrs
    ivar: np.ndarray | None = None
    noiseless: np.ndarray | None = None
    spectra: np.ndarray | None = None
    wavelength_angstrom: np.ndarray | None = None
    label_units: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def __post_init__(self) -> None:
        where = self.path or "shard"
        img = np.asarray(self.images)
        if img.ndim != 4:
            raise Sim2ObsDataError(f"{where}: /images must be (N, B, H, W), got shape {img.shape}")
        n, b, h, w = img.shape
        if b != len(self.attrs.bands):
            raise Sim2ObsDataError(
                f"{where}: /images has {b} bands but attribute 'bands' lists {list(self.attrs.bands)}"
            )
        for name in ("ivar", "noiseless"):
            arr = getattr(self, name)
            if arr is not None and np.shape(arr) != img.shape:
                raise Sim2ObsDataError(f"{where}: /{name} shape {np.shape(arr)} != /images shape {img.shape}")
        psf = np.asarray(self.psf)
        if psf.ndim != 4 or psf.shape[0] not in (1, n) or psf.shape[1] != b or psf.shape[2] != psf.shape[3]:
            raise Sim2ObsDataError(f"{where}: /psf must be (N or 1, {b}, P, P), got {psf.shape}")
        if self.ivar is not None:
            ivar = np.asarray(self.ivar)
            if np.any(~np.isfinite(ivar)) or np.any(ivar < 0):
                raise Sim2ObsDataError(f"{where}: /ivar has negative or non-finite values")
            bad = ~np.isfinite(img) & (ivar > 0)
        else:
            bad = ~np.isfinite(img)
        if np.any(bad):
            raise Sim2ObsDataError(
                f"{where}: /images has {int(bad.sum())} NaN/inf pixels that are not masked "
                "(set ivar = 0 there, or clean the input)"
            )
        if not np.all(np.isfinite(psf)):
            raise Sim2ObsDataError(f"{where}: /psf has NaN/inf values")
        if self.spectra is not None and self.wavelength_angstrom is not None:
            spec = np.asarray(self.spectra)
            wave = np.asarray(self.wavelength_angstrom)
            if spec.ndim != 2 or spec.shape[0] != n or wave.shape != (spec.shape[1],):
                raise Sim2ObsDataError(
                    f"{where}: /spectra must be (N={n}, L) with /wavelength_angstrom (L,), got "
                    f"{spec.shape} and {wave.shape}"
                )
        if "object_id" not in self.labels:
            raise Sim2ObsDataError(f"{where}: /labels/object_id is required")
        labels = {}
        for key, val in self.labels.items():
            arr = np.asarray(val)
            if arr.shape != (n,):
                raise Sim2ObsDataError(f"{where}: /labels/{key} has shape {arr.shape}, expected ({n},)")
            if key == "object_id":
                if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
                    raise Sim2ObsDataError(f"{where}: /labels/object_id must hold integers (got NaN or fractions)")
                if arr.dtype.kind not in "iuf":
                    raise Sim2ObsDataError(f"{where}: /labels/object_id must be integers, got {arr.dtype}")
                labels[key] = arr.astype(np.int64)
            else:
                try:
                    labels[key] = arr.astype(np.float64)
                except (TypeError, ValueError) as exc:
                    raise Sim2ObsDataError(f"{where}: /labels/{key} must be numeric ({exc})") from exc
        object.__setattr__(self, "labels", labels)
        if (self.spectra is None) != (self.wavelength_angstrom is None):
            raise Sim2ObsDataError(f"{where}: /spectra and /wavelength_angstrom go together")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def bands(self) -> tuple[str, ...]:
        return self.attrs.bands


def write_shard(path: str | Path, shard: Shard) -> Path:
    """Write ``shard`` atomically to ``path`` (temporary file in the same folder, then rename)."""
    import h5py

    path = Path(path)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            opts = dict(track_times=False)
            f.create_dataset("images", data=np.asarray(shard.images, dtype=np.float32), **opts)
            if shard.ivar is not None:
                f.create_dataset("ivar", data=np.asarray(shard.ivar, dtype=np.float32), **opts)
            f.create_dataset("psf", data=np.asarray(shard.psf, dtype=np.float32), **opts)
            if shard.noiseless is not None:
                f.create_dataset("noiseless", data=np.asarray(shard.noiseless, dtype=np.float32), **opts)
            if shard.spectra is not None:
                f.create_dataset("spectra", data=np.asarray(shard.spectra, dtype=np.float32), **opts)
                f.create_dataset("wavelength_angstrom",
                                 data=np.asarray(shard.wavelength_angstrom, dtype=np.float32), **opts)
            grp = f.create_group("labels", track_order=True)
            for key in sorted(shard.labels):
                ds = grp.create_dataset(key, data=shard.labels[key], **opts)
                ds.attrs["unit"] = shard.label_units.get(key, "")
            a = shard.attrs
            f.attrs["survey"] = a.survey
            f.attrs["bands"] = list(a.bands)
            f.attrs["pixel_scale_arcsec"] = float(a.pixel_scale_arcsec)
            f.attrs["flux_unit"] = a.flux_unit
            f.attrs["domain"] = a.domain
            f.attrs["source"] = a.source
            if a.seed is not None:
                f.attrs["seed"] = int(a.seed)
            f.attrs["config"] = json.dumps(a.config, sort_keys=True)
            f.attrs["sim2obs_version"] = a.sim2obs_version
            f.attrs["n_objects"] = len(shard)
    return path


_REQUIRED = ("images", "psf", "labels")


def _text(value) -> str:
    """HDF5 string attributes may come back as bytes (files written by other tools)."""
    return value.decode() if isinstance(value, bytes | np.bytes_) else str(value)
_REQUIRED_ATTRS = ("survey", "bands", "pixel_scale_arcsec", "domain", "source")


def read_shard(path: str | Path, with_noiseless: bool = True) -> Shard:
    """Read a whole shard into memory, checking its layout (errors name file and field)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise Sim2ObsFileNotFoundError(f"shard file '{path}' does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise Sim2ObsDataError(
            f"'{path}' is not a readable HDF5 shard ({exc}); it may be truncated: delete it and rerun"
        ) from exc
    with f:
        for key in _REQUIRED:
            if key not in f:
                raise Sim2ObsDataError(f"'{path}' has no '/{key}': not a sim2obs shard (DESIGN.md format)")
        for key in _REQUIRED_ATTRS:
            if key not in f.attrs:
                raise Sim2ObsDataError(f"'{path}' lacks file attribute '{key}'")
        seed = f.attrs.get("seed")
        try:
            config = json.loads(f.attrs.get("config", "{}"))
        except json.JSONDecodeError as exc:
            raise Sim2ObsDataError(f"'{path}': attribute 'config' is not valid JSON") from exc
        attrs = ShardAttrs(
            survey=str(f.attrs["survey"]),
            bands=tuple(_text(b) for b in f.attrs["bands"]),
            pixel_scale_arcsec=float(f.attrs["pixel_scale_arcsec"]),
            domain=str(f.attrs["domain"]),
            source=str(f.attrs["source"]),
            seed=None if seed is None else int(seed),
            config=config,
            flux_unit=str(f.attrs.get("flux_unit", FLUX_UNIT)),
            sim2obs_version=str(f.attrs.get("sim2obs_version", "unknown")),
        )
        labels = {k: f["labels"][k][()] for k in f["labels"]}
        units = {k: str(f["labels"][k].attrs.get("unit", "")) for k in f["labels"]}
        return Shard(
            images=f["images"][()],
            psf=f["psf"][()],
            labels=labels,
            attrs=attrs,
            ivar=f["ivar"][()] if "ivar" in f else None,
            noiseless=f["noiseless"][()] if (with_noiseless and "noiseless" in f) else None,
            spectra=f["spectra"][()] if "spectra" in f else None,
            wavelength_angstrom=f["wavelength_angstrom"][()] if "wavelength_angstrom" in f else None,
            label_units=units,
            path=str(path),
        )


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a readable shard (temporary files are never visible as shards)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "images" in f and "n_objects" in f.attrs
    except OSError:
        return False


def list_shards(folder: str | Path) -> list[Path]:
    """Shard files in ``folder`` sorted by name; raises if the folder is missing or empty."""
    folder = Path(folder)
    if folder.is_file():
        raise Sim2ObsFileNotFoundError(
            f"'{folder}' is a file; commands take shard folders: pass its folder '{folder.parent}'"
        )
    if not folder.is_dir():
        raise Sim2ObsFileNotFoundError(f"shard folder '{folder}' does not exist")
    paths = sorted(p for p in folder.iterdir() if SHARD_PATTERN.match(p.name))
    if not paths:
        raise Sim2ObsFileNotFoundError(
            f"no shard files (NAME-00000.h5) in '{folder}'; create some with `sim2obs render`"
        )
    return paths


def read_folder(folder: str | Path, with_noiseless: bool = True) -> Shard:
    """All shards of a folder concatenated (for small sets: plots, tests, gap metrics)."""
    shards = [read_shard(p, with_noiseless=with_noiseless) for p in list_shards(folder)]
    first = shards[0]
    for s in shards[1:]:
        differ = [
            f"{what} {mine} vs {theirs}"
            for what, mine, theirs in (
                ("bands", s.bands, first.bands),
                ("stamp", s.images.shape[2:], first.images.shape[2:]),
                ("psf size", s.psf.shape[2:], first.psf.shape[2:]),
                *((key, getattr(s.attrs, key), getattr(first.attrs, key))
                  for key in ("survey", "pixel_scale_arcsec", "flux_unit", "domain")),
            )
            if mine != theirs
        ]
        if (s.spectra is not None and first.spectra is not None
                and not np.array_equal(s.wavelength_angstrom, first.wavelength_angstrom)):
            differ.append("/wavelength_angstrom grids")
        if differ:
            raise Sim2ObsDataError(
                f"'{s.path}' and '{first.path}' differ in {'; '.join(differ)}: a folder must hold "
                "one survey setting"
            )

    def cat(name):
        vals = [getattr(s, name) for s in shards]
        return None if any(v is None for v in vals) else np.concatenate(vals)

    spectra = cat("spectra")

    psf = np.concatenate([np.broadcast_to(s.psf, (len(s),) + s.psf.shape[1:]) for s in shards]) \
        if len(shards) > 1 else first.psf
    keys = set.intersection(*(set(s.labels) for s in shards))
    return Shard(
        images=cat("images"), psf=psf,
        labels={k: np.concatenate([s.labels[k] for s in shards]) for k in sorted(keys)},
        attrs=first.attrs, ivar=cat("ivar"), noiseless=cat("noiseless"),
        spectra=spectra,
        wavelength_angstrom=first.wavelength_angstrom if spectra is not None else None,
        label_units=first.label_units, path=str(folder),
    )
