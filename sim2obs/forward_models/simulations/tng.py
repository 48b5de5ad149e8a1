"""IllustrisTNG readers: full snapshots through ``illustris_python``, and web-API cutouts.

Units and field meanings follow the TNG public data release (Nelson et al. 2019, Comput.
Astrophys. Cosmol. 6, 2, sec. 2 and the "data specifications" tables of the release):

* ``Coordinates``, ``SubhaloPos``, ``StellarHsml``, ``SubhaloHalfmassRadType``: comoving
  ckpc/h, so physical kpc = x * a / h (a = header ``Time``, h = ``HubbleParam``), with periodic
  boundaries in ``BoxSize`` (ckpc/h);
* ``Masses``, ``GFM_InitialMass``, ``SubhaloMassType``: 1e10 Msun/h;
* ``GFM_StellarFormationTime``: the *scale factor* at birth; entries <= 0 are wind-phase gas
  cells stored with the stars, which we drop;
* ``GFM_Metallicity``: metal mass fraction Z;
* ``SubhaloSFR``: Msun/yr (instantaneous, of the gas cells of the subhalo).

TNG uses the Planck 2015 cosmology (Planck Collaboration 2016, A&A 594, A13; h = 0.6774),
which is astropy's ``Planck15``; stellar ages are t(z_snap) - t(a_form) in it.

``illustris_python`` concatenates strings into paths, so it is always given ``str`` basePaths;
its offset file lives at ``<parent of basePath>/postprocessing/offsets/offsets_SSS.hdf5``.
Every h5py/illustris failure is re-raised as a :mod:`sim2obs.errors` exception naming the file,
the field and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from sim2obs.errors import (
    Sim2ObsDataError,
    Sim2ObsFileNotFoundError,
    Sim2ObsKeyError,
    Sim2ObsValueError,
)
from sim2obs.forward_models.galaxy import Galaxy, StarParticles, truth_labels
from sim2obs.forward_models.simulations.base import (
    DEFAULT_SELECTION,
    GalaxySource,
    InsufficientParticlesError,
    Selection,
    cosmic_time_gyr,
    periodic_offset,
    reading,
    redshift_time_gyr,
    shrinking_sphere_centre,
)

#: Cosmology of IllustrisTNG (Nelson et al. 2019, sec. 2): Planck 2015.
TNG_COSMOLOGY = "Planck15"

#: Mass unit of TNG snapshots and catalogues, in Msun/h.
TNG_MASS_UNIT = 1e10

#: PartType4 fields the readers need; ``StellarHsml`` is used when present.
REQUIRED_STAR_FIELDS = (
    "Coordinates", "Masses", "GFM_InitialMass", "GFM_StellarFormationTime", "GFM_Metallicity",
)
OPTIONAL_STAR_FIELDS = ("StellarHsml",)

#: Subhalo fields the catalogue reader needs.
REQUIRED_SUBHALO_FIELDS = ("SubhaloLenType", "SubhaloMassType", "SubhaloPos", "SubhaloSFR")

#: Written next to ``output/`` by :func:`sim2obs.forward_models.simulations.mini.build_mini_universe`.
MINI_MARKER = "mini_universe.json"

_STARS = 4  # PartType4


def _illustris():
    import illustris_python as il

    return il


# --------------------------------------------------------------------------------------------
# Conversion shared by the snapshot and cutout readers
# --------------------------------------------------------------------------------------------

def stars_from_tng_fields(
    data: dict, centre_ckpc_h, *, scale_factor: float, hubble: float, box_size: float | None,
    redshift: float, source: str, min_particles: int = 1, cosmology: str = TNG_COSMOLOGY,
) -> StarParticles:
    """Convert raw PartType4 arrays (TNG units) into :class:`StarParticles`.

    Drops wind particles (``GFM_StellarFormationTime <= 0``), converts ckpc/h to physical kpc
    relative to ``centre_ckpc_h`` (periodic in ``box_size``), 1e10 Msun/h to Msun and formation
    scale factors to ages at ``redshift``. ``source`` names the file(s) in error messages.
    """
    for field in REQUIRED_STAR_FIELDS:
        if field not in data:
            raise Sim2ObsDataError(f"{source}: PartType4 has no field '{field}'")
    sft = np.asarray(data["GFM_StellarFormationTime"], dtype=np.float64)
    if np.any(~np.isfinite(sft)):
        raise Sim2ObsDataError(
            f"{source}: field 'GFM_StellarFormationTime' has {int(np.count_nonzero(~np.isfinite(sft)))} "
            "NaN/inf values; the file is corrupt -- re-download it"
        )
    star = sft > 0
    n_star = int(np.count_nonzero(star))
    if n_star < min_particles:
        raise InsufficientParticlesError(
            f"{source}: {n_star} star particles after dropping {sft.size - n_star} wind particles "
            f"(GFM_StellarFormationTime <= 0), fewer than min_particles={min_particles}; "
            "lower Selection.min_particles or skip this galaxy"
        )
    arrays = {}
    for field in ("Masses", "GFM_InitialMass", "GFM_Metallicity"):
        arr = np.asarray(data[field], dtype=np.float64)[star]
        bad = ~np.isfinite(arr)
        if np.any(bad):
            raise Sim2ObsDataError(
                f"{source}: field '{field}' has {int(np.count_nonzero(bad))} NaN/inf values among "
                f"the {n_star} star particles; the file is corrupt -- re-download it"
            )
        if np.any(arr < 0) or (field != "GFM_Metallicity" and np.any(arr == 0)):
            what = "negative" if field == "GFM_Metallicity" else "zero or negative"
            raise Sim2ObsDataError(
                f"{source}: field '{field}' has {what} values among the star particles; "
                "the file is corrupt -- re-download it"
            )
        arrays[field] = arr
    a_form = sft[star]
    if np.any(a_form > scale_factor * (1 + 1e-5)):
        raise Sim2ObsDataError(
            f"{source}: field 'GFM_StellarFormationTime' has scale factors after the snapshot's "
            f"a = {scale_factor:.6g}; wrong snapshot header or corrupt file"
        )
    t_snap = redshift_time_gyr(redshift, cosmology)
    age = np.clip(t_snap - cosmic_time_gyr(np.minimum(a_form, scale_factor), cosmology), 0.0, None)
    coords = np.asarray(data["Coordinates"], dtype=np.float64)[star]
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise Sim2ObsDataError(f"{source}: field 'Coordinates' must have shape (N, 3), got {coords.shape}")
    to_kpc = scale_factor / hubble
    pos = periodic_offset(coords, centre_ckpc_h, box_size) * to_kpc
    hsml = None
    if "StellarHsml" in data:
        hsml = np.asarray(data["StellarHsml"], dtype=np.float64)[star] * to_kpc
    mass_unit = TNG_MASS_UNIT / hubble
    return StarParticles(
        position_kpc=pos,
        initial_mass_msun=arrays["GFM_InitialMass"] * mass_unit,
        age_gyr=age,
        metallicity=arrays["GFM_Metallicity"],
        smoothing_length_kpc=hsml,
        current_mass_msun=arrays["Masses"] * mass_unit,
        source=source,
    )


# --------------------------------------------------------------------------------------------
# Full snapshots (illustris_python)
# --------------------------------------------------------------------------------------------

_GROUPS_RE = re.compile(r"^groups_(\d{3,})$")


def _snapshots_in(output: Path) -> list[int]:
    snaps = []
    with contextlib.suppress(OSError):
        for child in output.iterdir():
            m = _GROUPS_RE.match(child.name)
            if m and child.is_dir():
                snaps.append(int(m.group(1)))
    return sorted(snaps)


def resolve_base_path(path) -> Path:
    """The ``output`` folder (illustris_python's basePath) given it or its parent."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise Sim2ObsFileNotFoundError(
            f"IllustrisTNG basePath '{p}' does not exist; pass the simulation's 'output' folder "
            "(e.g. .../TNG100-1/output) or its parent"
        )
    if _snapshots_in(p):
        return p
    if _snapshots_in(p / "output"):
        return p / "output"
    raise Sim2ObsFileNotFoundError(
        f"no IllustrisTNG group catalogues (folders groups_SSS/) in '{p}' or '{p / 'output'}'; "
        "pass the simulation's 'output' folder (illustris_python's basePath) or its parent"
    )


def available_snapshots(path) -> list[int]:
    """Snapshot numbers that have a group catalogue under ``path``."""
    return _snapshots_in(resolve_base_path(path))


def _snapshot_num_part(header: dict) -> np.ndarray:
    total = np.asarray(header["NumPart_Total"], dtype=np.int64)
    if "NumPart_Total_HighWord" in header:
        total = total | (np.asarray(header["NumPart_Total_HighWord"], dtype=np.int64) << 32)
    return total


class TNGSource(GalaxySource):
    """Galaxies of one IllustrisTNG snapshot, read with ``illustris_python``.

    Parameters
    ----------
    base_path : the ``output`` folder of a TNG run (illustris_python's basePath) or its parent
        (which also holds ``postprocessing/offsets``).
    snapshot : snapshot number; default the latest one with a group catalogue.
    selection : which subhalos :meth:`ids` returns.
    name : overrides the simulation name (default: the run folder, e.g. ``TNG100-1``; ``mini``
        for a built-in mini-universe).

    The constructor checks the layout (group catalogue, offsets, snapshot, required fields) so
    that a wrong path fails at once; :meth:`load` reads only one subhalo's star particles.
    """

    cosmology = TNG_COSMOLOGY

    def __init__(self, base_path, snapshot: int | None = None, selection: Selection = DEFAULT_SELECTION,
                 name: str | None = None) -> None:
        il = _illustris()
        output = resolve_base_path(base_path)
        snaps = _snapshots_in(output)
        if snapshot is None:
            snapshot = snaps[-1]
        snapshot = int(snapshot)
        if snapshot not in snaps:
            raise Sim2ObsFileNotFoundError(
                f"snapshot {snapshot} has no group catalogue in '{output}' "
                f"(no groups_{snapshot:03d}/); available snapshots: {snaps}"
            )
        if not isinstance(selection, Selection):
            raise Sim2ObsValueError(f"selection must be a Selection, got {type(selection).__name__}")
        self.base_path = str(output)
        self.snapshot = snapshot
        self.selection = selection
        self._has_flag = False
        base = self.base_path

        # --- group catalogue ------------------------------------------------------------
        gc0 = il.groupcat.gcPath(base, snapshot, 0)
        if not os.path.isfile(gc0):
            raise Sim2ObsFileNotFoundError(
                f"group catalogue file '{gc0}' is missing; download the groups_{snapshot:03d} "
                "chunks of this snapshot"
            )
        with reading("read the group catalogue header", gc0, "re-download the file"):
            header = il.groupcat.loadHeader(base, snapshot)
        n_key = "Nsubgroups_Total" if "Nsubgroups_Total" in header else "Nsubhalos_Total"
        for key in (n_key, "NumFiles"):
            if key not in header:
                raise Sim2ObsDataError(
                    f"{gc0}: Header has no attribute '{key}'; this is not a Subfind group "
                    "catalogue (fof_subhalo_tab) of IllustrisTNG"
                )
        self.n_subhalos = int(header[n_key])
        self._check_subhalo_fields(il, int(header["NumFiles"]))

        # --- offsets -------------------------------------------------------------------
        offsets = il.groupcat.offsetPath(base, snapshot)
        if not os.path.isfile(offsets):
            raise Sim2ObsFileNotFoundError(
                f"offsets file '{offsets}' is missing; illustris_python needs it to find a "
                "subhalo's particles. Download postprocessing/offsets/offsets_"
                f"{snapshot:03d}.hdf5 of this run into the folder next to '{output.name}/'"
            )
        with reading("read the offsets", offsets, "re-download the offsets file"), \
                h5py.File(offsets, "r") as f:
            for key in ("FileOffsets/Subhalo", "FileOffsets/SnapByType", "Subhalo/SnapByType"):
                if key not in f:
                    raise Sim2ObsDataError(
                        f"{offsets}: dataset '{key}' is missing; re-download the offsets file"
                    )

        # --- snapshot ------------------------------------------------------------------
        snap0 = il.snapshot.snapPath(base, snapshot, 0)
        if not os.path.isfile(snap0):
            raise Sim2ObsFileNotFoundError(
                f"snapshot file '{snap0}' is missing; download snapdir_{snapshot:03d} (or use "
                "tng-cutout: with API cutouts instead of full snapshots)"
            )
        with reading("read the snapshot header", snap0, "re-download the file"), \
                h5py.File(snap0, "r") as f:
            if "Header" not in f:
                raise Sim2ObsDataError(f"{snap0}: no 'Header' group; not a TNG snapshot file")
            sheader = dict(f["Header"].attrs.items())
        for key in ("NumPart_Total", "NumFilesPerSnapshot"):
            if key not in sheader:
                raise Sim2ObsDataError(f"{snap0}: Header has no attribute '{key}'")
        for key in ("Redshift", "HubbleParam", "BoxSize", "Time"):
            if key not in header and key not in sheader:
                raise Sim2ObsDataError(
                    f"{gc0} and {snap0}: Header has no attribute '{key}'; cannot convert units"
                )
        get = lambda k: float(sheader[k] if k in sheader else header[k])  # noqa: E731
        self.redshift = max(get("Redshift"), 0.0)
        self.hubble = get("HubbleParam")
        self.box_size = get("BoxSize")
        self.scale_factor = get("Time")
        self._star_fields = self._check_star_fields(il, sheader)
        self.name = name or _simulation_name(output)
        self._ids: np.ndarray | None = None

    # -- validation helpers ------------------------------------------------------------------

    def _check_subhalo_fields(self, il, num_files: int) -> None:
        base, snap = self.base_path, self.snapshot
        if self.n_subhalos == 0:
            raise Sim2ObsDataError(
                f"{il.groupcat.gcPath(base, snap, 0)}: the group catalogue has no subhalos "
                "(Nsubgroups_Total = 0); use a snapshot with a Subfind catalogue"
            )
        for i in range(num_files):
            path = il.groupcat.gcPath(base, snap, i)
            with reading("read the group catalogue", path, "re-download the file"), \
                    h5py.File(path, "r") as f:
                if "Subhalo" not in f or len(f["Subhalo"].keys()) == 0:
                    if i + 1 < num_files:
                        continue
                    raise Sim2ObsDataError(
                        f"{path}: the group catalogue has no 'Subhalo' fields; download the "
                        "Subfind catalogue (fof_subhalo_tab), not only the FoF groups"
                    )
                missing = [k for k in REQUIRED_SUBHALO_FIELDS if k not in f["Subhalo"]]
                if missing:
                    raise Sim2ObsDataError(
                        f"{path}: group catalogue lacks Subhalo field(s) {missing}; a complete "
                        f"Subfind catalogue has them (needed: {list(REQUIRED_SUBHALO_FIELDS)})"
                    )
                self._has_flag = "SubhaloFlag" in f["Subhalo"]
                return

    def _check_star_fields(self, il, sheader: dict) -> tuple[str, ...]:
        base, snap = self.base_path, self.snapshot
        n_stars = _snapshot_num_part(sheader)[_STARS]
        n_files = int(sheader["NumFilesPerSnapshot"])
        for i in range(n_files):
            path = il.snapshot.snapPath(base, snap, i)
            if not os.path.isfile(path):
                raise Sim2ObsFileNotFoundError(
                    f"snapshot chunk '{path}' is missing ({n_files} chunks expected); download "
                    f"all of snapdir_{snap:03d}"
                )
            with reading("read the snapshot", path, "re-download the file"), \
                    h5py.File(path, "r") as f:
                if "PartType4" not in f:
                    continue
                keys = set(f["PartType4"].keys())
            missing = [k for k in REQUIRED_STAR_FIELDS if k not in keys]
            if missing:
                raise Sim2ObsDataError(
                    f"{path}: PartType4 lacks field(s) {missing}; a full TNG snapshot has them "
                    "(mini snapshots lack some stellar fields -- use a full snapshot such as 99)"
                )
            return REQUIRED_STAR_FIELDS + tuple(k for k in OPTIONAL_STAR_FIELDS if k in keys)
        raise Sim2ObsDataError(
            f"{il.snapshot.snapPath(base, snap, 0)}: no chunk of snapshot {snap} has a "
            f"'PartType4' (star particle) group (header NumPart_Total[4] = {n_stars}); this "
            "snapshot has no stars to render -- use a later snapshot or a full snapshot download"
        )

    # -- GalaxySource --------------------------------------------------------------------

    def ids(self) -> np.ndarray:
        if self._ids is None:
            il = _illustris()
            fields = ["SubhaloMassType", "SubhaloLenType"]
            if getattr(self, "_has_flag", False):
                fields.append("SubhaloFlag")
            path = il.groupcat.gcPath(self.base_path, self.snapshot, 0)
            with reading("load the Subhalo catalogue", path, "re-download the group catalogue"):
                cat = il.groupcat.loadSubhalos(self.base_path, self.snapshot, fields=fields)
            mstar = np.asarray(cat["SubhaloMassType"], dtype=np.float64)[:, _STARS]
            mstar = mstar * TNG_MASS_UNIT / self.hubble
            length = np.asarray(cat["SubhaloLenType"])[:, _STARS]
            ok = np.ones(mstar.size, dtype=bool)
            if "SubhaloFlag" in cat:
                # Flag 0: subhalo of non-cosmological origin (Nelson et al. 2019, sec. 5.2).
                ok = np.asarray(cat["SubhaloFlag"]) != 0
            ids = np.arange(mstar.size, dtype=np.int64)
            self._ids = self.selection.cut(ids[ok], mstar[ok], length[ok])
        return self._ids.copy()

    def _subhalo_row(self, object_id: int, fields) -> dict:
        il = _illustris()
        offsets = il.groupcat.offsetPath(self.base_path, self.snapshot)
        with reading("read the offsets", offsets, "re-download the offsets file"), \
                h5py.File(offsets, "r") as f:
            file_offsets = f["FileOffsets/Subhalo"][()]
        chunk = int(np.max(np.flatnonzero(object_id - file_offsets >= 0)))
        local = int(object_id - file_offsets[chunk])
        path = il.groupcat.gcPath(self.base_path, self.snapshot, chunk)
        with reading(f"read subhalo {object_id}", path, "re-download the file"), \
                h5py.File(path, "r") as f:
            return {k: f["Subhalo"][k][local] for k in fields}

    def _snapshot_files(self, subset: dict) -> str:
        il = _illustris()
        starts = np.asarray(subset["snapOffsets"][_STARS])
        first = int(subset["offsetType"][_STARS])
        last = first + max(int(subset["lenType"][_STARS]) - 1, 0)
        i0 = int(np.max(np.flatnonzero(starts <= first)))
        i1 = int(np.max(np.flatnonzero(starts <= last)))
        return ", ".join(il.snapshot.snapPath(self.base_path, self.snapshot, i)
                         for i in range(i0, i1 + 1))

    def load(self, object_id: int) -> Galaxy:
        il = _illustris()
        object_id = int(object_id)
        if not 0 <= object_id < self.n_subhalos:
            raise Sim2ObsKeyError(
                f"{self.name} snapshot {self.snapshot}: subhalo {object_id} does not exist "
                f"(ids are 0..{self.n_subhalos - 1})"
            )
        row = self._subhalo_row(object_id, ("SubhaloPos", "SubhaloSFR"))
        snapdir = os.path.dirname(il.snapshot.snapPath(self.base_path, self.snapshot, 0))
        with reading(f"find the particles of subhalo {object_id}",
                      il.groupcat.offsetPath(self.base_path, self.snapshot),
                      "re-download the offsets file"):
            subset = il.snapshot.getSnapOffsets(self.base_path, self.snapshot, object_id, "Subhalo")
        files = self._snapshot_files(subset)
        source = f"{self.name} subhalo {object_id} (PartType4 in {files})"
        if int(subset["lenType"][_STARS]) == 0:
            raise InsufficientParticlesError(
                f"{source}: the subhalo has no star particles; select galaxies with "
                "Selection(min_particles >= 1)"
            )
        with reading(f"read the star particles of subhalo {object_id}", files or snapdir,
                      "re-download the snapshot chunk(s)"):
            data = il.snapshot.loadSubset(self.base_path, self.snapshot, "stars",
                                          list(self._star_fields), subset=subset)
        stars = stars_from_tng_fields(
            data, np.asarray(row["SubhaloPos"], dtype=np.float64),
            scale_factor=self.scale_factor, hubble=self.hubble, box_size=self.box_size,
            redshift=self.redshift, source=source, min_particles=self.selection.min_particles,
        )
        sfr = float(row["SubhaloSFR"])
        if not np.isfinite(sfr) or sfr < 0:
            raise Sim2ObsDataError(
                f"{il.groupcat.gcPath(self.base_path, self.snapshot, 0)} (chunks): field "
                f"'SubhaloSFR' of subhalo {object_id} is {sfr}; re-download the group catalogue"
            )
        labels = truth_labels(stars, self.redshift, sfr_msun_per_yr=sfr)
        return Galaxy(object_id=object_id, stars=stars, redshift=self.redshift, labels=labels,
                      source=self.name, cosmology=self.cosmology)

    def describe(self) -> dict:
        root = Path(self.base_path).parent
        out = {
            "kind": "tng",
            "name": self.name,
            "path": self.base_path,
            "snapshot": self.snapshot,
            "redshift": self.redshift,
            "cosmology": self.cosmology,
            "selection": self.selection.to_dict(),
        }
        marker = root / MINI_MARKER
        if marker.is_file():
            out["kind"] = "mini"
            with contextlib.suppress(OSError, ValueError):
                out["mini_universe"] = json.loads(marker.read_text())
        return out


def _simulation_name(output: Path) -> str:
    root = output.parent
    if (root / MINI_MARKER).is_file():
        return "mini"
    return root.name if output.name == "output" else output.name


# --------------------------------------------------------------------------------------------
# Web-API cutouts
# --------------------------------------------------------------------------------------------

_ID_ATTRS = ("SubhaloID", "subhalo_id", "SubfindID", "id")
_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


class TNGCutoutSource(GalaxySource):
    """Single-subhalo HDF5 cutouts as served by the TNG web API (``cutout.hdf5``).

    ``path`` is one file or a folder of them (``*.hdf5``/``*.h5``). Each file needs a ``Header``
    with ``Redshift`` and ``HubbleParam`` (``Time`` and ``BoxSize`` are used when present) and a
    ``PartType4`` group with the usual fields. The object id is, in this order, a header attribute
    (``SubhaloID``, ...), the last integer in the file name (``cutout_123.hdf5``,
    ``subhalo_123.hdf5``), or the file's index in the sorted folder. The centre is the
    mass-weighted shrinking-sphere centre of the star particles (cutouts carry no ``SubhaloPos``);
    with no catalogue, the SFR label is the mass formed in the last 100 Myr.
    """

    cosmology = TNG_COSMOLOGY

    def __init__(self, path, selection: Selection | None = None, name: str = "TNG-cutout") -> None:
        p = Path(os.path.expanduser(str(path)))
        if not p.exists():
            raise Sim2ObsFileNotFoundError(
                f"TNG cutout path '{p}' does not exist; pass a cutout .hdf5 file or a folder of them"
            )
        if p.is_dir():
            files = sorted([*p.glob("*.hdf5"), *p.glob("*.h5")])
            if not files:
                raise Sim2ObsFileNotFoundError(f"no .hdf5/.h5 cutout files in folder '{p}'")
        else:
            files = [p]
        self.path = str(p)
        self.selection = selection
        self.name = name
        self._files: dict[int, str] = {}
        self._headers: dict[int, tuple[float, float, float, float | None]] = {}
        for index, file in enumerate(files):
            object_id, header = self._inspect(file, index)
            if object_id in self._files:
                raise Sim2ObsDataError(
                    f"cutouts '{self._files[object_id]}' and '{file}' both have object id "
                    f"{object_id}; name them cutout_<SubhaloID>.hdf5 or keep one"
                )
            self._files[object_id] = str(file)
            self._headers[object_id] = header
        first = min(self._files)
        self.redshift = self._headers[first][0]
        self._ids: np.ndarray | None = None

    @staticmethod
    def _inspect(file: Path, index: int):
        with reading("read the cutout", file, "re-download it from the TNG API"), \
                h5py.File(file, "r") as f:
            if "Header" not in f:
                raise Sim2ObsDataError(
                    f"{file}: no 'Header' group; not an IllustrisTNG cutout (download it with "
                    "the API's cutout.hdf5 endpoint)"
                )
            attrs = dict(f["Header"].attrs.items())
            for key in ("Redshift", "HubbleParam"):
                if key not in attrs:
                    raise Sim2ObsDataError(
                        f"{file}: Header has no attribute '{key}'; cannot convert units"
                    )
            if "PartType4" not in f:
                raise Sim2ObsDataError(
                    f"{file}: no 'PartType4' group (star particles); request the cutout with "
                    "stars=all (or stars=Coordinates,Masses,GFM_InitialMass,"
                    "GFM_StellarFormationTime,GFM_Metallicity)"
                )
            missing = [k for k in REQUIRED_STAR_FIELDS if k not in f["PartType4"]]
            if missing:
                raise Sim2ObsDataError(
                    f"{file}: PartType4 lacks field(s) {missing}; request them in the cutout query"
                )
            object_id = None
            for key in _ID_ATTRS:
                if key in attrs:
                    object_id = int(np.asarray(attrs[key]).ravel()[0])
                    break
        if object_id is None:
            m = _LAST_INT.search(file.stem)
            object_id = int(m.group(1)) if m else index
        z = max(float(attrs["Redshift"]), 0.0)
        a = float(attrs.get("Time", 1.0 / (1.0 + z)))
        box = float(attrs["BoxSize"]) if "BoxSize" in attrs else None
        return object_id, (z, float(attrs["HubbleParam"]), a, box)

    def _read(self, object_id: int) -> tuple[dict, str]:
        if object_id not in self._files:
            raise Sim2ObsKeyError(
                f"no cutout with object id {object_id} in '{self.path}' "
                f"(ids: {sorted(self._files)[:10]}{' ...' if len(self._files) > 10 else ''})"
            )
        file = self._files[object_id]
        with reading("read the cutout", file, "re-download it from the TNG API"), \
                h5py.File(file, "r") as f:
            group = f["PartType4"]
            fields = [*REQUIRED_STAR_FIELDS, *(k for k in OPTIONAL_STAR_FIELDS if k in group)]
            data = {k: group[k][()] for k in fields}
        return data, file

    def ids(self) -> np.ndarray:
        if self._ids is None:
            ids = np.array(sorted(self._files), dtype=np.int64)
            if self.selection is None:
                self._ids = ids
            else:
                mstar = np.empty(ids.size)
                count = np.empty(ids.size, dtype=np.int64)
                for i, object_id in enumerate(ids):
                    data, _ = self._read(int(object_id))
                    star = np.asarray(data["GFM_StellarFormationTime"]) > 0
                    hubble = self._headers[int(object_id)][1]
                    mstar[i] = np.sum(np.asarray(data["Masses"], dtype=np.float64)[star])
                    mstar[i] *= TNG_MASS_UNIT / hubble
                    count[i] = np.count_nonzero(star)
                self._ids = self.selection.cut(ids, mstar, count)
        return self._ids.copy()

    def load(self, object_id: int) -> Galaxy:
        object_id = int(object_id)
        data, file = self._read(object_id)
        z, hubble, a, box = self._headers[object_id]
        source = f"TNG cutout {file}"
        coords = np.asarray(data["Coordinates"], dtype=np.float64)
        sft = np.asarray(data["GFM_StellarFormationTime"], dtype=np.float64)
        star = np.isfinite(sft) & (sft > 0)
        masses = np.asarray(data["Masses"], dtype=np.float64)
        centre = np.zeros(3)
        if coords.ndim == 2 and coords.shape[1] == 3 and np.any(star):
            sel = star & np.all(np.isfinite(coords), axis=1) & np.isfinite(masses) & (masses > 0)
            if np.any(sel):
                ref = coords[np.flatnonzero(sel)[0]]
                rel = periodic_offset(coords[sel], ref, box)
                centre = ref + shrinking_sphere_centre(rel, masses[sel])
        min_particles = self.selection.min_particles if self.selection is not None else 1
        stars = stars_from_tng_fields(
            data, centre, scale_factor=a, hubble=hubble, box_size=box, redshift=z,
            source=source, min_particles=min_particles,
        )
        labels = truth_labels(stars, z)
        return Galaxy(object_id=object_id, stars=stars, redshift=z, labels=labels,
                      source=self.name, cosmology=self.cosmology)

    def describe(self) -> dict:
        return {
            "kind": "tng-cutout",
            "name": self.name,
            "path": self.path,
            "snapshot": None,
            "redshift": self.redshift,
            "cosmology": self.cosmology,
            "n_files": len(self._files),
            "selection": None if self.selection is None else self.selection.to_dict(),
        }
