"""EAGLE reader: public particle data (Subfind catalogues + bound particles) -> :class:`Galaxy`.

Layout and units follow the EAGLE public releases (McAlpine et al. 2016, Astron. Comput. 15, 72;
The EAGLE team 2017, "The EAGLE simulations of galaxy formation: public release of particle
data", arXiv:1706.09899, secs. 2-3). A simulation folder (e.g. ``RefL0100N1504/`` or its
``data/``) holds, per snapshot ``SSS`` at redshift ``zXXXpXXX``::

    groups_SSS_zXXXpXXX/eagle_subfind_tab_SSS_zXXXpXXX.N.hdf5           Subfind catalogue chunks
    particledata_SSS_zXXXpXXX/eagle_subfind_particles_SSS_zXXXpXXX.N.hdf5  bound particles

Catalogue (``Subhalo/``): ``GroupNumber`` (FoF group, from 1), ``SubGroupNumber`` (0 = central),
``CentreOfPotential``, ``MassType`` (or ``Stars/Mass``), ``SubLengthType``,
``StarFormationRate``; particles (``PartType4/``): ``Coordinates``, ``Mass``, ``InitialMass``,
``StellarFormationTime`` (expansion factor at birth), ``SmoothedMetallicity`` (preferred, as
recommended by Schaye et al. 2015, MNRAS 446, 521; Wiersma et al. 2009, MNRAS 399, 574) or
``Metallicity``, ``SmoothingLength``, ``GroupNumber``, ``SubGroupNumber``.

Units: every converted dataset carries ``h-scale-exponent``, ``aexp-scale-exponent`` and
``CGSConversionFactor``; the physical CGS value is ``raw * h**h_exp * a**aexp_exp * CGS``
(The EAGLE team 2017, sec. 2.3.1), with ``h`` = Header ``HubbleParam`` and ``a`` = Header
``ExpansionFactor``. The exponents are always read from the file, never assumed. CGS values are
turned into kpc / Msun / Msun/yr with the file's own ``Constants`` group (``CM_PER_MPC``,
``SOLAR_MASS``, ``SEC_PER_YEAR``), so e.g. a mass stored as ``1`` with CGS factor ``1.989e43``
is exactly 1e10 Msun; the EAGLE values below are used where the group is absent.

EAGLE uses the Planck 2013 cosmology (Planck Collaboration 2014, A&A 571, A16; h = 0.6777),
astropy's ``Planck13``; stellar ages are t(z_snap) - t(a_form) in it.

Object ids: ``Subhalo/GalaxyID`` when the catalogue has it (the database id of McAlpine et al.
2016), else the composite ``GroupNumber * 10**9 + SubGroupNumber`` (:func:`eagle_object_id`),
readable in decimal: group 12, subgroup 3 -> ``12000000003``.
"""

from __future__ import annotations

import contextlib
import math
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
    GalaxySource,
    InsufficientParticlesError,
    Selection,
    cosmic_time_gyr,
    periodic_offset,
    reading,
    redshift_time_gyr,
)

#: Cosmology of EAGLE (Schaye et al. 2015, table 1): Planck 2013, astropy ``Planck13``.
EAGLE_COSMOLOGY = "Planck13"

#: Composite id factor: ``object_id = GroupNumber * EAGLE_ID_FACTOR + SubGroupNumber``.
EAGLE_ID_FACTOR = 10**9

#: Fallbacks for the file's ``Constants`` group (the values EAGLE used to write its CGS factors).
EAGLE_CONSTANTS = {"CM_PER_MPC": 3.085678e24, "SOLAR_MASS": 1.989e33, "SEC_PER_YEAR": 3.15569e7}

UNIT_ATTRS = ("h-scale-exponent", "aexp-scale-exponent", "CGSConversionFactor")

#: PartType4 datasets :meth:`EagleSource.load` needs (plus one of the metallicities).
REQUIRED_STAR_FIELDS = ("Coordinates", "Mass", "InitialMass", "StellarFormationTime",
                        "GroupNumber", "SubGroupNumber")
METALLICITY_FIELDS = ("SmoothedMetallicity", "Metallicity")

_STARS = 4
_TAG = r"(?P<snap>\d{3})_(?P<z>z\d{3}p\d{3})"
_GROUPS_RE = re.compile(rf"^groups_{_TAG}$")
_PARTICLES_RE = re.compile(rf"^particledata_{_TAG}$")
_CITE = "(The EAGLE team 2017, arXiv:1706.09899, sec. 2)"
_DEFAULT_SELECTION = Selection()



def _reading(what, path, fix="re-download the file"):
    """EAGLE reads default to suggesting a re-download."""
    return reading(what, path, fix)


def eagle_object_id(group_number, subgroup_number) -> np.ndarray:
    """Composite int64 id ``GroupNumber * 10**9 + SubGroupNumber`` (arrays or scalars)."""
    gn = np.asarray(group_number, dtype=np.int64)
    sgn = np.asarray(subgroup_number, dtype=np.int64)
    if np.any(sgn < 0) or np.any(sgn >= EAGLE_ID_FACTOR) or np.any(gn < 0):
        raise Sim2ObsValueError(
            f"cannot form EAGLE ids: need GroupNumber >= 0 and 0 <= SubGroupNumber < "
            f"{EAGLE_ID_FACTOR}"
        )
    return gn * EAGLE_ID_FACTOR + sgn


def split_eagle_object_id(object_id) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`eagle_object_id`: ``(GroupNumber, SubGroupNumber)``."""
    oid = np.asarray(object_id, dtype=np.int64)
    return oid // EAGLE_ID_FACTOR, oid % EAGLE_ID_FACTOR


def _scalar(value) -> float:
    return float(np.asarray(value, dtype=np.float64).ravel()[0])


def cgs_factor(dataset, file, hubble: float, scale_factor: float) -> float:
    """``h**h_exp * a**aexp_exp * CGSConversionFactor`` from the attributes of ``dataset``."""
    attrs = dataset.attrs
    missing = [k for k in UNIT_ATTRS if k not in attrs]
    if missing:
        raise Sim2ObsDataError(
            f"{file}: dataset '{dataset.name}' lacks the unit attribute(s) {missing}; EAGLE "
            f"public files carry {list(UNIT_ATTRS)} on every dataset {_CITE}. Re-download the "
            "file (a copy rewritten by another tool may have dropped its attributes)"
        )
    h_exp, a_exp, cgs = (_scalar(attrs[k]) for k in UNIT_ATTRS)
    factor = hubble**h_exp * scale_factor**a_exp * cgs
    if not (math.isfinite(factor) and factor > 0):
        raise Sim2ObsDataError(
            f"{file}: dataset '{dataset.name}' has unit attributes giving a conversion factor "
            f"{factor} (h-exp {h_exp}, aexp-exp {a_exp}, CGS {cgs}); re-download the file"
        )
    return factor


def _subfolders(root: Path, pattern: re.Pattern) -> dict[int, str]:
    out: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for child in root.iterdir():
            m = pattern.match(child.name)
            if m and child.is_dir():
                out[int(m.group("snap"))] = f"{m.group('snap')}_{m.group('z')}"
    return out


def resolve_simulation_path(path) -> Path:
    """The folder holding ``groups_*``/``particledata_*`` given it or its parent (``data/``)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise Sim2ObsFileNotFoundError(
            f"EAGLE simulation folder '{p}' does not exist; pass the folder holding the "
            "groups_SSS_zXXXpXXX/ and particledata_SSS_zXXXpXXX/ folders (e.g. .../RefL0100N1504)"
        )
    for candidate in (p, p / "data"):
        if _subfolders(candidate, _GROUPS_RE):
            return candidate
    raise Sim2ObsFileNotFoundError(
        f"no EAGLE Subfind catalogues (folders groups_SSS_zXXXpXXX/) in '{p}' or '{p / 'data'}'; "
        "download the group catalogue and particle data of a snapshot (McAlpine et al. 2016; "
        "The EAGLE team 2017) and pass the folder holding them"
    )


def available_snapshots(path) -> list[int]:
    """Snapshot numbers that have both a Subfind catalogue and particle data under ``path``."""
    root = resolve_simulation_path(path)
    return sorted(set(_subfolders(root, _GROUPS_RE)) & set(_subfolders(root, _PARTICLES_RE)))


def _chunk_files(folder: Path, stem: str, what: str) -> list[str]:
    """All chunks ``stem.N.hdf5`` of one output, checking none is missing."""
    first = folder / f"{stem}.0.hdf5"
    if not first.is_file():
        raise Sim2ObsFileNotFoundError(
            f"{what} file '{first}' is missing; download all chunks of '{folder.name}'"
        )
    with _reading(f"read the Header of the {what}", first), h5py.File(first, "r") as f:
        if "Header" not in f:
            raise Sim2ObsDataError(f"{first}: no 'Header' group; not an EAGLE {what} file")
        n = f["Header"].attrs.get("NumFilesPerSnapshot")
    if n is None:  # fall back on the files present
        n = len(list(folder.glob(f"{stem}.*.hdf5")))
    files = [str(folder / f"{stem}.{i}.hdf5") for i in range(int(_scalar(n)))]
    for file in files:
        if not os.path.isfile(file):
            raise Sim2ObsFileNotFoundError(
                f"{what} chunk '{file}' is missing ({len(files)} chunks expected from Header "
                f"'NumFilesPerSnapshot'); download all chunks of '{folder.name}'"
            )
    return files


class EagleSource(GalaxySource):
    """Galaxies of one EAGLE snapshot from the public particle data.

    Parameters
    ----------
    path : the simulation folder holding ``groups_SSS_zXXXpXXX/`` and
        ``particledata_SSS_zXXXpXXX/`` (or its parent holding ``data/``).
    snapshot : snapshot number ``SSS``; default the latest one with both a catalogue and
        particle data (028, z = 0, for a full EAGLE run).
    selection : stellar-mass (``Subhalo/MassType[:, 4]``) and star-particle-count
        (``Subhalo/SubLengthType[:, 4]``, else counted in the particle files) cuts.
    name : overrides the simulation name (default ``'EAGLE <folder>'``).

    The object holds paths, header numbers and, after the first :meth:`ids`/:meth:`load`, a
    small table of the selected subhalos (ids, group numbers, centres, SFRs, star counts) and
    the group-number range of each particle chunk, so that it pickles into worker processes
    without re-reading the catalogue. :meth:`load` opens only the particle chunks whose range
    holds the subhalo's group and reads only the rows of its particles.
    """

    cosmology = EAGLE_COSMOLOGY

    def __init__(self, path, snapshot: int | None = None,
                 selection: Selection = _DEFAULT_SELECTION, name: str | None = None) -> None:
        if not isinstance(selection, Selection):
            raise Sim2ObsValueError(
                f"selection must be a Selection, got {type(selection).__name__}"
            )
        root = resolve_simulation_path(path)
        groups = _subfolders(root, _GROUPS_RE)
        particles = _subfolders(root, _PARTICLES_RE)
        both = sorted(set(groups) & set(particles))
        if snapshot is None:  # the latest snapshot that can be read (as for TNG sources)
            snapshot = both[-1] if both else max(groups)
        snapshot = int(snapshot)
        if snapshot not in groups:
            raise Sim2ObsFileNotFoundError(
                f"snapshot {snapshot} has no Subfind catalogue in '{root}' (no folder "
                f"groups_{snapshot:03d}_zXXXpXXX/); available snapshots: {sorted(groups)}"
                f" (with particle data: {both})"
            )
        tag = groups[snapshot]
        if snapshot not in particles:
            raise Sim2ObsFileNotFoundError(
                f"snapshot {snapshot} has a catalogue but no particle data in '{root}': download "
                f"particledata_{tag}/ (eagle_subfind_particles_{tag}.N.hdf5); snapshots with "
                f"particle data: {both}"
            )
        if particles[snapshot] != tag:
            raise Sim2ObsDataError(
                f"'{root}': groups_{tag}/ and particledata_{particles[snapshot]}/ disagree on the "
                f"redshift of snapshot {snapshot}; remove the stray folder"
            )
        self.path = str(root)
        self.snapshot = snapshot
        self.tag = tag
        self.selection = selection
        self.name = name or f"EAGLE {root.parent.name if root.name == 'data' else root.name}"
        self.tab_files = _chunk_files(root / f"groups_{tag}", f"eagle_subfind_tab_{tag}",
                                      "Subfind catalogue")
        self.particle_files = _chunk_files(root / f"particledata_{tag}",
                                           f"eagle_subfind_particles_{tag}", "particle data")

        with _reading("read the Subhalo catalogue", self.tab_files[0]), \
                h5py.File(self.tab_files[0], "r") as f:
            self.id_scheme = "GalaxyID" if "Subhalo/GalaxyID" in f else "composite"
        header, constants = self._header(self.tab_files[0])
        pheader, pconstants = self._header(self.particle_files[0])
        self.constants = {k: float(constants.get(k, pconstants.get(k, v)))
                          for k, v in EAGLE_CONSTANTS.items()}
        for key in ("HubbleParam", "ExpansionFactor", "Redshift", "BoxSize"):
            if key not in header and key not in pheader:
                raise Sim2ObsDataError(
                    f"{self.tab_files[0]} and {self.particle_files[0]}: Header has no attribute "
                    f"'{key}'; cannot convert units {_CITE}"
                )
        get = lambda k: _scalar(header[k] if k in header else pheader[k])  # noqa: E731
        self.hubble = get("HubbleParam")
        self.scale_factor = get("ExpansionFactor")
        self.redshift = max(get("Redshift"), 0.0)
        self.box_size_raw = get("BoxSize")
        if abs(self.scale_factor * (1.0 + self.redshift) - 1.0) > 1e-4:
            raise Sim2ObsDataError(
                f"{self.tab_files[0]}: Header ExpansionFactor {self.scale_factor} and Redshift "
                f"{self.redshift} disagree; re-download the file"
            )
        self._check_star_layout()
        # Filled by _build_index() (small arrays, kept when pickled).
        self._index: dict[str, np.ndarray] | None = None
        self._chunk_range: np.ndarray | None = None

    # -- file helpers -------------------------------------------------------------------

    @staticmethod
    def _header(file: str) -> tuple[dict, dict]:
        with _reading("read the Header", file), h5py.File(file, "r") as f:
            if "Header" not in f:
                raise Sim2ObsDataError(f"{file}: no 'Header' group; not an EAGLE output file")
            header = dict(f["Header"].attrs.items())
            constants = dict(f["Constants"].attrs.items()) if "Constants" in f else {}
        return header, {k: _scalar(v) for k, v in constants.items() if k in EAGLE_CONSTANTS}

    @staticmethod
    def _n_stars_in_chunk(f) -> int:
        num = f["Header"].attrs.get("NumPart_ThisFile")
        if num is None:
            return -1  # unknown: decided by the presence of PartType4
        return int(np.asarray(num).ravel()[_STARS])

    def _check_star_layout(self) -> None:
        """Fail now if PartType4 is absent, incomplete or lacks unit attributes."""
        for file in self.particle_files:
            with _reading("read PartType4", file), h5py.File(file, "r") as f:
                n = self._n_stars_in_chunk(f)
                if "PartType4" not in f:
                    if n > 0:
                        raise Sim2ObsDataError(
                            f"{file}: Header NumPart_ThisFile[4] = {n} but the file has no "
                            "'PartType4' group (star particles); re-download the file"
                        )
                    continue
                group = f["PartType4"]
                missing = [k for k in REQUIRED_STAR_FIELDS if k not in group]
                if not any(k in group for k in METALLICITY_FIELDS):
                    missing.append(" or ".join(METALLICITY_FIELDS))
                if missing:
                    raise Sim2ObsDataError(
                        f"{file}: PartType4 lacks dataset(s) {missing}; the public particle data "
                        f"(eagle_subfind_particles) has them {_CITE}; re-download the file"
                    )
                self.metallicity_field = next(k for k in METALLICITY_FIELDS if k in group)
                self.has_smoothing_length = "SmoothingLength" in group
                self._coord_factor = cgs_factor(group["Coordinates"], file, self.hubble,
                                                self.scale_factor)
                return
        raise Sim2ObsDataError(
            f"{self.particle_files[0]}: no chunk of particledata_{self.tag}/ has a 'PartType4' "
            "group (star particles); this snapshot has no stars to render -- use a later snapshot"
        )

    @property
    def box_size_kpc(self) -> float:
        """Periodic box side in physical kpc (BoxSize is in the units of ``Coordinates``)."""
        return self.box_size_raw * self._coord_factor / self._cm_per_kpc

    @property
    def _cm_per_kpc(self) -> float:
        return self.constants["CM_PER_MPC"] * 1e-3

    # -- catalogue -----------------------------------------------------------------------

    def _read_catalogue(self) -> dict[str, np.ndarray]:
        """Every subhalo's number, centre (kpc), SFR, stellar mass, star count (or -1)."""
        parts: dict[str, list] = {k: [] for k in ("gn", "sgn", "cop", "sfr", "mstar", "nstar",
                                                  "galaxy_id")}
        msun, kpc = self.constants["SOLAR_MASS"], self._cm_per_kpc
        msun_per_yr = msun / self.constants["SEC_PER_YEAR"]
        h, a = self.hubble, self.scale_factor
        for file in self.tab_files:
            with _reading("read the Subhalo catalogue", file), h5py.File(file, "r") as f:
                if "Subhalo" not in f or "GroupNumber" not in f["Subhalo"]:
                    n_sub = f["Header"].attrs.get("Nsubgroups")
                    if n_sub is not None and int(_scalar(n_sub)) == 0:
                        continue  # an empty chunk
                    raise Sim2ObsDataError(
                        f"{file}: no 'Subhalo' group (or no 'Subhalo/GroupNumber'); download the "
                        "Subfind catalogue (eagle_subfind_tab), not only the FoF groups"
                    )
                sub = f["Subhalo"]
                if "MassType" in sub:
                    mass_ds, col = sub["MassType"], _STARS
                elif "Stars" in sub and "Mass" in sub["Stars"]:
                    mass_ds, col = sub["Stars/Mass"], None
                else:
                    raise Sim2ObsDataError(
                        f"{file}: Subhalo has neither 'MassType' nor 'Stars/Mass'; needed for "
                        "the stellar-mass selection; re-download the catalogue"
                    )
                missing = [k for k in ("SubGroupNumber", "CentreOfPotential", "StarFormationRate")
                           if k not in sub]
                if missing:
                    raise Sim2ObsDataError(
                        f"{file}: Subhalo lacks dataset(s) {missing} {_CITE}; re-download it"
                    )
                gn = np.asarray(sub["GroupNumber"][()], dtype=np.int64)
                mass = np.asarray(mass_ds[()], dtype=np.float64)
                mass = mass[:, col] if col is not None else mass
                parts["gn"].append(gn)
                parts["sgn"].append(np.asarray(sub["SubGroupNumber"][()], dtype=np.int64))
                parts["cop"].append(np.asarray(sub["CentreOfPotential"][()], dtype=np.float64)
                                    * cgs_factor(sub["CentreOfPotential"], file, h, a) / kpc)
                parts["sfr"].append(np.asarray(sub["StarFormationRate"][()], dtype=np.float64)
                                    * cgs_factor(sub["StarFormationRate"], file, h, a)
                                    / msun_per_yr)
                parts["mstar"].append(mass * cgs_factor(mass_ds, file, h, a) / msun)
                if "SubLengthType" in sub:
                    parts["nstar"].append(np.asarray(sub["SubLengthType"][()],
                                                     dtype=np.int64)[:, _STARS])
                if "GalaxyID" in sub:
                    parts["galaxy_id"].append(np.asarray(sub["GalaxyID"][()], dtype=np.int64))
        if not parts["gn"]:
            raise Sim2ObsDataError(
                f"{self.tab_files[0]}: the Subfind catalogue of snapshot {self.snapshot} has no "
                "subhalos; use another snapshot"
            )
        cat = {k: np.concatenate(v) for k, v in parts.items() if v}
        n = cat["gn"].size
        where = f"{self.tab_files[0]} (and chunks)"
        for key in ("nstar", "galaxy_id"):
            if key in cat and cat[key].size != n:
                raise Sim2ObsDataError(
                    f"{where}: only some chunks have Subhalo/"
                    f"{'SubLengthType' if key == 'nstar' else 'GalaxyID'}; re-download the catalogue"
                )
        if cat["cop"].shape != (n, 3):
            raise Sim2ObsDataError(f"{where}: Subhalo/CentreOfPotential must be (N, 3)")
        for key, dataset in (("mstar", "MassType"), ("sfr", "StarFormationRate"),
                             ("cop", "CentreOfPotential")):
            if np.any(~np.isfinite(cat[key])):
                raise Sim2ObsDataError(
                    f"{where}: Subhalo/{dataset} has NaN/inf values; re-download the catalogue"
                )
        self.id_scheme = "GalaxyID" if "galaxy_id" in cat else "composite"
        if "galaxy_id" in cat:
            cat["id"] = cat.pop("galaxy_id")
            if np.unique(cat["id"]).size != n:
                raise Sim2ObsDataError(f"{where}: Subhalo/GalaxyID has duplicate values")
        else:
            try:
                cat["id"] = eagle_object_id(cat["gn"], cat["sgn"])
            except Sim2ObsValueError as exc:
                raise Sim2ObsDataError(f"{where}: Subhalo/GroupNumber, SubGroupNumber: {exc}") \
                    from None
        if "nstar" not in cat:
            cat["nstar"] = np.full(n, -1, dtype=np.int64)
        return cat

    def _scan_chunks(self, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Group-number range of every particle chunk; star counts of ``keys`` (gn, sgn) pairs.

        The range of a chunk is its first and last ``PartType4/GroupNumber`` (two elements read)
        unless ``keys`` is given, in which case whole GroupNumber/SubGroupNumber columns are read
        to count each subhalo's star particles (catalogues without ``SubLengthType``).
        """
        ranges = np.full((len(self.particle_files), 2), -1, dtype=np.int64)
        counts = None if keys is None else np.zeros(len(keys), dtype=np.int64)
        key_ids = None if keys is None else eagle_object_id(keys[:, 0], keys[:, 1])
        for i, file in enumerate(self.particle_files):
            with _reading("read PartType4/GroupNumber", file), h5py.File(file, "r") as f:
                if "PartType4" not in f or f["PartType4/GroupNumber"].shape[0] == 0:
                    continue
                gds = f["PartType4/GroupNumber"]
                ranges[i] = (int(gds[0]), int(gds[-1]))
                if counts is not None:
                    g = np.asarray(gds[()], dtype=np.int64)
                    s = np.asarray(f["PartType4/SubGroupNumber"][()], dtype=np.int64)
                    ok = (g >= 0) & (s >= 0) & (s < EAGLE_ID_FACTOR)
                    uid, n = np.unique(eagle_object_id(g[ok], s[ok]), return_counts=True)
                    if uid.size:
                        pos = np.clip(np.searchsorted(uid, key_ids), 0, uid.size - 1)
                        match = uid[pos] == key_ids
                        counts[match] += n[pos[match]]
        return ranges, counts

    def _build_index(self) -> dict[str, np.ndarray]:
        if self._index is not None:
            return self._index
        cat = self._read_catalogue()
        mass_ok = cat["mstar"] >= self.selection.min_mstar_msun
        if np.any(cat["nstar"][mass_ok] < 0):  # no SubLengthType: count in the particle files
            keys = np.stack([cat["gn"][mass_ok], cat["sgn"][mass_ok]], axis=1)
            ranges, counts = self._scan_chunks(keys)
            cat["nstar"][mass_ok] = counts
        else:
            ranges, _ = self._scan_chunks()
        cat["nstar"][~mass_ok & (cat["nstar"] < 0)] = 0
        chosen = self.selection.cut(cat["id"], cat["mstar"], cat["nstar"])
        order = np.argsort(cat["id"], kind="stable")
        rows = order[np.searchsorted(cat["id"], chosen, sorter=order)]
        self._index = {k: cat[k][rows].copy() for k in ("id", "gn", "sgn", "cop", "sfr",
                                                         "mstar", "nstar")}
        self._chunk_range = ranges
        return self._index

    # -- GalaxySource --------------------------------------------------------------------

    def ids(self) -> np.ndarray:
        return self._build_index()["id"].copy()

    def _row(self, object_id: int) -> dict:
        index = self._build_index()
        i = int(np.searchsorted(index["id"], object_id))
        if i < index["id"].size and index["id"][i] == object_id:
            return {k: v[i] for k, v in index.items()}
        cat = self._read_catalogue()  # not selected: look it up in the full catalogue
        hit = np.flatnonzero(cat["id"] == object_id)
        if hit.size == 0:
            raise Sim2ObsKeyError(
                f"{self.name} snapshot {self.snapshot}: no subhalo with id {object_id} in "
                f"{self.tab_files[0]} (and chunks); ids are "
                + ("Subhalo/GalaxyID" if self.id_scheme == "GalaxyID" else
                   "GroupNumber * 10**9 + SubGroupNumber (eagle_object_id)")
            )
        return {k: cat[k][hit[0]] for k in ("id", "gn", "sgn", "cop", "sfr", "mstar", "nstar")}

    def _candidate_chunks(self, gn: int) -> list[int]:
        self._build_index()
        ranges = self._chunk_range
        filled = ranges[:, 0] >= 0
        r = ranges[filled]
        ordered = bool(np.all(r[:, 0] <= r[:, 1]) and np.all(r[1:, 0] >= r[:-1, 1]))
        if not ordered:  # not in Subfind order: look everywhere
            return [int(i) for i in np.flatnonzero(filled)]
        return [int(i) for i in np.flatnonzero(filled & (ranges[:, 0] <= gn) & (ranges[:, 1] >= gn))]

    def _read_particles(self, chunks: list[int], gn: int, sgn: int) -> tuple[dict, list[str]]:
        """Rows of (gn, sgn) from ``chunks``, converted to kpc / Msun / dimensionless."""
        fields = ["Coordinates", "Mass", "InitialMass", "StellarFormationTime",
                  self.metallicity_field]
        if self.has_smoothing_length:
            fields.append("SmoothingLength")
        out: dict[str, list] = {k: [] for k in fields}
        files = []
        h, a = self.hubble, self.scale_factor
        to_unit = {"Coordinates": self._cm_per_kpc, "SmoothingLength": self._cm_per_kpc,
                   "Mass": self.constants["SOLAR_MASS"],
                   "InitialMass": self.constants["SOLAR_MASS"]}
        for i in chunks:
            file = self.particle_files[i]
            with _reading(f"read the star particles of subhalo ({gn}, {sgn})", file), \
                    h5py.File(file, "r") as f:
                if "PartType4" not in f:
                    continue
                group = f["PartType4"]
                g = group["GroupNumber"][()]
                in_group = np.flatnonzero(g == gn)
                if in_group.size == 0:
                    continue
                lo, hi = int(in_group[0]), int(in_group[-1]) + 1
                keep = (g[lo:hi] == gn) & (group["SubGroupNumber"][lo:hi] == sgn)
                if not np.any(keep):
                    continue
                files.append(file)
                for name in fields:
                    if name not in group:
                        raise Sim2ObsDataError(
                            f"{file}: PartType4 has no dataset '{name}' (other chunks have it); "
                            "re-download the file"
                        )
                    ds = group[name]
                    factor = cgs_factor(ds, file, h, a) / to_unit.get(name, 1.0)
                    out[name].append(np.asarray(ds[lo:hi], dtype=np.float64)[keep] * factor)
        data = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}
        return data, files

    def load(self, object_id: int) -> Galaxy:
        object_id = int(object_id)
        row = self._row(object_id)
        gn, sgn, expected = int(row["gn"]), int(row["sgn"]), int(row["nstar"])
        data, files = self._read_particles(self._candidate_chunks(gn), gn, sgn)
        n = data["Mass"].size
        if expected >= 0 and n != expected:  # chunk order not as assumed: read every chunk
            data, files = self._read_particles(list(range(len(self.particle_files))), gn, sgn)
            n = data["Mass"].size
            if n != expected:
                raise Sim2ObsDataError(
                    f"{self.tab_files[0]}: Subhalo/SubLengthType gives {expected} star particles "
                    f"for subhalo {object_id} (group {gn}, subgroup {sgn}) but "
                    f"particledata_{self.tag}/ holds {n}; catalogue and particle files are from "
                    "different downloads -- re-download both"
                )
        source = (f"{self.name} subhalo {object_id} (group {gn}, subgroup {sgn}; PartType4 in "
                  f"{', '.join(files) or f'particledata_{self.tag}/'})")
        if n < self.selection.min_particles:
            raise InsufficientParticlesError(
                f"{source}: {n} star particles, fewer than min_particles="
                f"{self.selection.min_particles}; lower Selection.min_particles or skip it"
            )
        a_form = data["StellarFormationTime"]
        bad = ~np.isfinite(a_form) | (a_form <= 0)
        if np.any(bad) or np.any(a_form > self.scale_factor * (1 + 1e-5)):
            raise Sim2ObsDataError(
                f"{source}: dataset 'StellarFormationTime' has {int(np.count_nonzero(bad))} "
                f"non-positive/NaN values or values after the snapshot's a = "
                f"{self.scale_factor:.6g}; re-download the file"
            )
        t_snap = redshift_time_gyr(self.redshift, self.cosmology)
        age = np.clip(t_snap - cosmic_time_gyr(np.minimum(a_form, self.scale_factor),
                                               self.cosmology), 0.0, None)
        coords = data["Coordinates"].reshape(-1, 3)
        stars = StarParticles(
            position_kpc=periodic_offset(coords, row["cop"], self.box_size_kpc),
            initial_mass_msun=data["InitialMass"],
            age_gyr=age,
            metallicity=data[self.metallicity_field],
            smoothing_length_kpc=data.get("SmoothingLength"),
            current_mass_msun=data["Mass"],
            source=source,
        )
        sfr = float(row["sfr"])
        if sfr < 0:
            raise Sim2ObsDataError(
                f"{self.tab_files[0]} (chunks): Subhalo/StarFormationRate of subhalo {object_id} "
                f"is {sfr}; re-download the catalogue"
            )
        labels = truth_labels(stars, self.redshift, sfr_msun_per_yr=sfr)
        return Galaxy(object_id=object_id, stars=stars, redshift=self.redshift, labels=labels,
                      source=self.name, cosmology=self.cosmology)

    def describe(self) -> dict:
        return {
            "kind": "eagle",
            "name": self.name,
            "path": self.path,
            "snapshot": self.snapshot,
            "tag": self.tag,
            "redshift": self.redshift,
            "expansion_factor": self.scale_factor,
            "hubble_param": self.hubble,
            "box_size_kpc": self.box_size_kpc,
            "cosmology": self.cosmology,
            "n_catalogue_files": len(self.tab_files),
            "n_particle_files": len(self.particle_files),
            "metallicity_field": self.metallicity_field,
            "object_id": ("Subhalo/GalaxyID" if self.id_scheme == "GalaxyID"
                          else "GroupNumber * 10**9 + SubGroupNumber"),
            "selection": self.selection.to_dict(),
            "references": ["McAlpine et al. 2016, Astron. Comput. 15, 72",
                           "The EAGLE team 2017, arXiv:1706.09899"],
        }
