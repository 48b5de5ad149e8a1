"""EAGLE reader on a synthetic snapshot in the public-release layout and raw units.

The writer below follows The EAGLE team (2017, arXiv:1706.09899): comoving Mpc/h coordinates
(h-scale-exponent -1, aexp-scale-exponent 1, CGS factor = cm per Mpc), masses in 1e10 Msun/h
(h-exp -1, CGS factor in g), SFRs in Msun/yr (CGS factor in g/s), dimensionless formation
expansion factors and metallicities. Expected values are computed by hand from those raw numbers.
"""

from __future__ import annotations

import json
import math
import pickle

import h5py
import numpy as np
import pytest
from astropy.cosmology import Planck13

from sim2obs.errors import (
    Sim2ObsDataError,
    Sim2ObsError,
    Sim2ObsFileNotFoundError,
    Sim2ObsKeyError,
    Sim2ObsValueError,
)
from sim2obs.forward_models.galaxy import LABEL_UNITS
from sim2obs.forward_models.simulations import eagle
from sim2obs.forward_models.simulations.base import InsufficientParticlesError, Selection
from sim2obs.forward_models.simulations.eagle import (
    EagleSource,
    available_snapshots,
    eagle_object_id,
    split_eagle_object_id,
)

H = 0.6777
Z = 0.101
A = 1.0 / (1.0 + Z)
BOX = 10.0  # cMpc/h
CM_PER_MPC = 3.085678e24
MSUN_G = 1.989e33
SEC_PER_YEAR = 3.15569e7
SUBGROUP_NONE = 2**30  # EAGLE's SubGroupNumber for particles in no subhalo

# (GroupNumber, SubGroupNumber, particles, particle mass in Msun, CoP in cMpc/h, SFR Msun/yr)
SUBHALOS = [
    (1, 0, 200, 1.5e8, (0.0005, 5.0, 5.0), 2.0),  # central at the box edge: 3e10 Msun
    (1, 1, 150, 1.0e7, (0.3, 5.2, 5.1), 0.0),  # satellite spanning both particle chunks
    (2, 0, 120, 4.0e6, (7.0, 2.0, 3.0), 0.1),  # 4.8e8 Msun: below the default mass cut
    (3, 0, 50, 4.0e7, (2.0, 8.0, 1.0), 0.5),  # 2e9 Msun with only 50 particles
]
ID_A, ID_B, ID_C, ID_D = (eagle_object_id(g, s) for g, s, *_ in SUBHALOS)


def _ds(group, name, data, h_exp=0.0, a_exp=0.0, cgs=1.0, units=True):
    ds = group.create_dataset(name, data=data)
    if units:
        ds.attrs["h-scale-exponent"] = h_exp
        ds.attrs["aexp-scale-exponent"] = a_exp
        ds.attrs["CGSConversionFactor"] = cgs
        ds.attrs["VarDescription"] = name
    return ds


def _header(f, n_files, extra=None, constants=True):
    hdr = f.create_group("Header")
    for key, val in {"HubbleParam": H, "ExpansionFactor": A, "Redshift": Z, "BoxSize": BOX,
                     "Time": A, "NumFilesPerSnapshot": n_files, **(extra or {})}.items():
        hdr.attrs[key] = val
    if constants:
        c = f.create_group("Constants")
        c.attrs["CM_PER_MPC"] = CM_PER_MPC
        c.attrs["SOLAR_MASS"] = MSUN_G
        c.attrs["SEC_PER_YEAR"] = SEC_PER_YEAR


def make_particles(seed=0):
    """Per-subhalo particle arrays in raw EAGLE units, plus a little unbound fuzz in group 1."""
    rng = np.random.default_rng(seed)
    out = []
    for gn, sgn, n, m, cop, _ in SUBHALOS:
        pos = np.asarray(cop) + rng.normal(0.0, 0.003, (n, 3))  # ~4 kpc spread
        if (gn, sgn) == (1, 0):
            pos[0] = (BOX - 0.001, 5.0, 5.0)  # hand-checked particle across the periodic edge
        pos %= BOX
        a_form = rng.uniform(0.1, A, n)
        a_form[0] = 0.5
        out.append(dict(
            gn=np.full(n, gn, np.int32), sgn=np.full(n, sgn, np.int32), pos=pos,
            mass=np.full(n, m * H / 1e10), imass=np.full(n, 1.2 * m * H / 1e10), a=a_form,
            zsm=rng.uniform(0.001, 0.03, n), zp=rng.uniform(0.001, 0.03, n),
            hsml=np.full(n, 0.001),
        ))
    fuzz = {k: v[:10].copy() for k, v in out[0].items()}
    fuzz["sgn"][:] = SUBGROUP_NONE
    return out, fuzz


def write_eagle(root, snap=28, z_tag="z000p101", *, constants=True, sublengthtype=True,
                galaxy_id=False, mass_h_exp=-1.0, metallicity=("SmoothedMetallicity",
                                                               "Metallicity")):
    """A 2-chunk EAGLE snapshot (catalogue + particle data) under ``root``; returns the folder."""
    tag = f"{snap:03d}_{z_tag}"
    gdir = root / f"groups_{tag}"
    pdir = root / f"particledata_{tag}"
    gdir.mkdir(parents=True)
    pdir.mkdir()
    mass_cgs = 1e10 * MSUN_G
    parts, fuzz = make_particles()

    for chunk, rows in enumerate(([0, 1], [2, 3])):
        with h5py.File(gdir / f"eagle_subfind_tab_{tag}.{chunk}.hdf5", "w") as f:
            _header(f, 2, {"Nsubgroups": len(rows), "TotNsubgroups": len(SUBHALOS)}, constants)
            sub = f.create_group("Subhalo")
            sel = [SUBHALOS[i] for i in rows]
            _ds(sub, "GroupNumber", np.array([s[0] for s in sel], np.int32))
            _ds(sub, "SubGroupNumber", np.array([s[1] for s in sel], np.int32))
            _ds(sub, "CentreOfPotential", np.array([s[4] for s in sel]), -1.0, 1.0, CM_PER_MPC)
            mtype = np.zeros((len(rows), 6))
            mtype[:, 4] = [parts[i]["mass"].sum() for i in rows]
            _ds(sub, "MassType", mtype, mass_h_exp, 0.0, mass_cgs)
            _ds(sub, "Mass", mtype.sum(axis=1), -1.0, 0.0, mass_cgs)
            _ds(sub, "StarFormationRate", np.array([s[5] for s in sel]), 0.0, 0.0,
                MSUN_G / SEC_PER_YEAR)
            _ds(sub, "HalfMassRad", np.full((len(rows), 6), 0.002), -1.0, 1.0, CM_PER_MPC)
            if sublengthtype:
                ltype = np.zeros((len(rows), 6), np.int32)
                ltype[:, 4] = [SUBHALOS[i][2] for i in rows]
                _ds(sub, "SubLengthType", ltype)
            if galaxy_id:
                _ds(sub, "GalaxyID", np.array([5000 + 7 * i for i in rows], np.int64))

    # particle chunk 0: all of A and 100 of B; chunk 1: the rest of B, fuzz, C, D (Subfind order)
    def take(p, sl):
        return {k: v[sl] for k, v in p.items()}

    chunks = [[parts[0], take(parts[1], slice(0, 100))],
              [take(parts[1], slice(100, None)), fuzz, parts[2], parts[3]]]
    for chunk, pieces in enumerate(chunks):
        cat = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        n = cat["gn"].size
        with h5py.File(pdir / f"eagle_subfind_particles_{tag}.{chunk}.hdf5", "w") as f:
            _header(f, 2, {"NumPart_ThisFile": np.array([0, 0, 0, 0, n, 0], np.int32)}, constants)
            p4 = f.create_group("PartType4")
            _ds(p4, "Coordinates", cat["pos"], -1.0, 1.0, CM_PER_MPC)
            _ds(p4, "Mass", cat["mass"], mass_h_exp, 0.0, mass_cgs)
            _ds(p4, "InitialMass", cat["imass"], mass_h_exp, 0.0, mass_cgs)
            _ds(p4, "StellarFormationTime", cat["a"])
            if "SmoothedMetallicity" in metallicity:
                _ds(p4, "SmoothedMetallicity", cat["zsm"])
            if "Metallicity" in metallicity:
                _ds(p4, "Metallicity", cat["zp"])
            _ds(p4, "SmoothingLength", cat["hsml"], -1.0, 1.0, CM_PER_MPC)
            _ds(p4, "GroupNumber", cat["gn"])
            _ds(p4, "SubGroupNumber", cat["sgn"])
            _ds(p4, "ParticleIDs", np.arange(n, dtype=np.int64) + 1000 * chunk)
    return root


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return write_eagle(tmp_path_factory.mktemp("eagle") / "RefL0010N0000")


@pytest.fixture(scope="module")
def source(sim):
    return EagleSource(sim)


@pytest.fixture(scope="module")
def galaxy_a(source):
    return source.load(ID_A)


# ------------------------------------------------------------------------------------------
# Layout, header, ids
# ------------------------------------------------------------------------------------------

def test_layout_and_header(source, sim):
    assert source.snapshot == 28 and source.tag == "028_z000p101"
    assert source.name == "EAGLE RefL0010N0000"
    assert source.redshift == pytest.approx(Z)
    assert source.cosmology == "Planck13"
    assert source.box_size_kpc == pytest.approx(BOX * 1000.0 * A / H, rel=1e-12)
    assert available_snapshots(sim) == [28]
    desc = source.describe()
    json.dumps(desc)
    assert desc["kind"] == "eagle" and desc["snapshot"] == 28
    assert desc["selection"] == Selection().to_dict()
    assert desc["metallicity_field"] == "SmoothedMetallicity"


def test_data_subfolder_is_accepted(sim, tmp_path):
    # .../RefL0010N0000/data/groups_... is how the download unpacks: the parent works too
    parent = tmp_path / "RefL0025N0376"
    write_eagle(parent / "data")
    src = EagleSource(parent)
    assert src.name == "EAGLE RefL0025N0376"
    assert list(src.ids()) == [ID_A, ID_B]


def test_composite_ids():
    assert eagle_object_id(12, 3) == 12_000_000_003
    gn, sgn = split_eagle_object_id(np.array([12_000_000_003, 1_000_000_000]))
    assert list(gn) == [12, 1] and list(sgn) == [3, 0]
    with pytest.raises(Sim2ObsValueError):
        eagle_object_id(1, 10**9)


def test_selection(sim, source):
    ids = source.ids()
    assert ids.dtype == np.int64
    assert list(ids) == [ID_A, ID_B]  # C fails the mass cut, D the particle count
    assert list(EagleSource(sim, selection=Selection(min_mstar_msun=1e8)).ids()) == \
        [ID_A, ID_B, ID_C]
    low = Selection(min_mstar_msun=1e8, min_particles=10)
    assert list(EagleSource(sim, selection=low).ids()) == [ID_A, ID_B, ID_C, ID_D]
    assert list(EagleSource(sim, selection=Selection(min_mstar_msun=2e10)).ids()) == [ID_A]
    one = Selection(min_mstar_msun=1e8, min_particles=10, max_galaxies=2)
    first = EagleSource(sim, selection=one).ids()
    assert first.size == 2 and np.all(np.diff(first) > 0)
    assert np.array_equal(first, EagleSource(sim, selection=one).ids())  # deterministic


def test_galaxy_id_used_when_present(tmp_path):
    src = EagleSource(write_eagle(tmp_path / "sim", galaxy_id=True))
    assert list(src.ids()) == [5000, 5007]
    gal = src.load(5007)
    assert gal.object_id == 5007 and gal.stars.n == 150
    assert src.describe()["object_id"] == "Subhalo/GalaxyID"


def test_counts_particles_without_sublengthtype(tmp_path):
    src = EagleSource(write_eagle(tmp_path / "sim", sublengthtype=False),
                      selection=Selection(min_mstar_msun=1e8))
    assert list(src.ids()) == [ID_A, ID_B, ID_C]
    assert src.load(ID_B).stars.n == 150


# ------------------------------------------------------------------------------------------
# Unit conversions, centring, ages, labels
# ------------------------------------------------------------------------------------------

def test_conversions_against_hand_values(galaxy_a):
    stars = galaxy_a.stars
    assert stars.n == 200  # the 10 fuzz particles (SubGroupNumber 2**30) are not included
    # particle 0 sits at x = 9.999 cMpc/h, the centre of potential at 0.0005 cMpc/h: across the
    # periodic edge the offset is -0.0015 cMpc/h = -1.5 ckpc/h -> * a / h physical kpc
    assert stars.position_kpc[0] == pytest.approx([-1.5 / (1.101 * 0.6777), 0.0, 0.0], abs=1e-9)
    # 1.5e8 Msun particles stored as 1.5e8 * h / 1e10 (1e10 Msun/h) with CGS factor 1.989e43 g
    assert stars.current_mass_msun == pytest.approx(np.full(200, 1.5e8), rel=1e-12)
    assert stars.initial_mass_msun == pytest.approx(np.full(200, 1.8e8), rel=1e-12)
    # smoothing length 0.001 cMpc/h = 1 ckpc/h
    assert stars.smoothing_length_kpc == pytest.approx(np.full(200, 1.0 / (1.101 * 0.6777)))
    assert np.all(np.abs(stars.position_kpc) < 40.0)
    # born at a = 0.5 (z = 1): age = t(z = 0.101) - t(z = 1) in Planck13
    expected = (Planck13.age(0.101) - Planck13.age(1.0)).to_value("Gyr")
    assert stars.age_gyr[0] == pytest.approx(expected, abs=1e-4)
    assert np.all(stars.age_gyr >= 0)
    assert np.all(stars.age_gyr <= Planck13.age(0.101).to_value("Gyr"))
    parts, _ = make_particles()
    assert stars.metallicity == pytest.approx(parts[0]["zsm"])  # SmoothedMetallicity preferred


def test_labels(galaxy_a, source):
    assert galaxy_a.object_id == ID_A
    assert galaxy_a.redshift == pytest.approx(Z)
    assert galaxy_a.source == "EAGLE RefL0010N0000" and galaxy_a.cosmology == "Planck13"
    labels = galaxy_a.labels
    assert set(labels) == set(LABEL_UNITS)
    assert labels["log_mstar"] == pytest.approx(math.log10(3e10), abs=1e-9)
    # SFR from Subhalo/StarFormationRate: 2 Msun/yr stored with CGS factor Msun/yr in g/s
    assert labels["log_sfr"] == pytest.approx(math.log10(2.0), abs=1e-9)
    assert labels["log_ssfr"] == pytest.approx(math.log10(2.0 / 3e10), abs=1e-9)
    assert labels["redshift"] == pytest.approx(Z)
    assert 0 < labels["r_half_kpc"] < 20
    # a zero catalogue SFR goes to the sSFR floor
    assert source.load(ID_B).labels["log_ssfr"] == pytest.approx(-13.0)


def test_scale_exponents_are_read_from_the_file(tmp_path):
    # Same raw numbers, but the file says masses carry no 1/h: everything is h times larger.
    src = EagleSource(write_eagle(tmp_path / "sim", mass_h_exp=0.0),
                      selection=Selection(min_mstar_msun=1e8))
    gal = src.load(ID_A)
    assert gal.stars.current_mass_msun[0] == pytest.approx(1.5e8 * H, rel=1e-12)
    assert gal.labels["log_mstar"] == pytest.approx(math.log10(3e10 * H), abs=1e-9)


def test_constants_default_and_metallicity_fallback(tmp_path, galaxy_a):
    src = EagleSource(write_eagle(tmp_path / "sim", constants=False, metallicity=("Metallicity",)))
    assert src.constants == eagle.EAGLE_CONSTANTS
    gal = src.load(ID_A)
    assert gal.stars.current_mass_msun == pytest.approx(galaxy_a.stars.current_mass_msun)
    parts, _ = make_particles()
    assert gal.stars.metallicity == pytest.approx(parts[0]["zp"])
    assert src.describe()["metallicity_field"] == "Metallicity"


def test_particles_spanning_chunks_and_reads_only_needed_chunks(sim, monkeypatch):
    src = EagleSource(sim, selection=Selection(min_mstar_msun=1e8))
    src.ids()  # build the index first: it reads two elements of each chunk
    opened = []
    real_file = h5py.File

    def spy(name, *args, **kwargs):
        opened.append(str(name))
        return real_file(name, *args, **kwargs)

    monkeypatch.setattr(eagle.h5py, "File", spy)
    gal_b = src.load(ID_B)
    assert gal_b.stars.n == 150
    assert "chunks" not in gal_b.stars.source
    opened.clear()
    gal_c = src.load(ID_C)
    assert gal_c.stars.n == 120
    assert opened == [src.particle_files[1]]  # chunk 0 holds only group 1
    assert src.particle_files[1] in gal_c.stars.source


def test_load_unselected_and_unknown(source):
    assert source.load(ID_C).stars.n == 120  # below the mass cut, still loadable by id
    with pytest.raises(InsufficientParticlesError):
        source.load(ID_D)  # 50 < min_particles = 100
    with pytest.raises(Sim2ObsKeyError, match="no subhalo with id"):
        source.load(eagle_object_id(9, 0))


def test_pickle(source):
    fresh = pickle.loads(pickle.dumps(source))
    for value in vars(source).values():
        assert not isinstance(value, (h5py.File, h5py.Group, h5py.Dataset))
    src = pickle.loads(pickle.dumps(EagleSource(source.path)))  # before any index was built
    assert list(src.ids()) == [ID_A, ID_B]
    assert len(pickle.dumps(source)) < 20_000  # paths and a small table only
    a1, a2 = fresh.load(ID_A), src.load(ID_A)
    assert np.array_equal(a1.stars.position_kpc, a2.stars.position_kpc)
    assert a1.labels == a2.labels


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(Sim2ObsFileNotFoundError, match="does not exist") as exc:
        EagleSource(tmp_path / "nope")
    assert isinstance(exc.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Sim2ObsFileNotFoundError, match="groups_SSS_zXXXpXXX"):
        EagleSource(tmp_path / "empty")


def test_snapshot_choice(tmp_path):
    root = write_eagle(tmp_path / "sim")
    with pytest.raises(Sim2ObsFileNotFoundError, match=r"available snapshots: \[28\]"):
        EagleSource(root, snapshot=27)
    write_eagle(root, snap=19, z_tag="z001p004")
    (root / "groups_035_z000p000").mkdir()  # a catalogue without particle data
    src = EagleSource(root)  # default: the latest snapshot that has particle data
    assert src.snapshot == 28 and src.tag == "028_z000p101"
    assert EagleSource(root, snapshot=19).tag == "019_z001p004"
    with pytest.raises(Sim2ObsFileNotFoundError, match="particledata_035_z000p000") as exc:
        EagleSource(root, snapshot=35)
    assert "snapshots with particle data: [19, 28]" in str(exc.value)
    with pytest.raises(Sim2ObsFileNotFoundError, match=r"available snapshots: \[19, 28, 35\]"):
        EagleSource(root, snapshot=27)


def test_missing_chunk(tmp_path):
    root = write_eagle(tmp_path / "sim")
    victim = root / "groups_028_z000p101" / "eagle_subfind_tab_028_z000p101.1.hdf5"
    victim.unlink()
    with pytest.raises(Sim2ObsFileNotFoundError, match=str(victim)):
        EagleSource(root)


def test_missing_parttype4(tmp_path):
    root = write_eagle(tmp_path / "sim")
    victim = root / "particledata_028_z000p101" / "eagle_subfind_particles_028_z000p101.0.hdf5"
    with h5py.File(victim, "a") as f:
        del f["PartType4"]
    with pytest.raises(Sim2ObsDataError, match="PartType4") as exc:
        EagleSource(root)
    assert str(victim) in str(exc.value)


def test_missing_scale_exponents(tmp_path):
    root = write_eagle(tmp_path / "sim")
    pfile = root / "particledata_028_z000p101" / "eagle_subfind_particles_028_z000p101.0.hdf5"
    with h5py.File(pfile, "a") as f:
        del f["PartType4/Coordinates"].attrs["h-scale-exponent"]
    with pytest.raises(Sim2ObsDataError, match="h-scale-exponent") as exc:
        EagleSource(root)
    msg = str(exc.value)
    assert str(pfile) in msg and "/PartType4/Coordinates" in msg and "Re-download" in msg

    root = write_eagle(tmp_path / "sim2")
    gfile = root / "groups_028_z000p101" / "eagle_subfind_tab_028_z000p101.1.hdf5"
    with h5py.File(gfile, "a") as f:
        del f["Subhalo/MassType"].attrs["aexp-scale-exponent"]
    src = EagleSource(root)
    with pytest.raises(Sim2ObsDataError, match="aexp-scale-exponent") as exc:
        src.ids()
    assert str(gfile) in str(exc.value) and "/Subhalo/MassType" in str(exc.value)


@pytest.mark.parametrize("field, value", [("Mass", np.nan), ("InitialMass", -1.0)])
def test_bad_particle_masses_name_the_file(tmp_path, field, value):
    root = write_eagle(tmp_path / "sim")
    pfile = root / "particledata_028_z000p101" / "eagle_subfind_particles_028_z000p101.0.hdf5"
    with h5py.File(pfile, "a") as f:
        f[f"PartType4/{field}"][3] = value
    src = EagleSource(root)
    with pytest.raises(Sim2ObsDataError) as exc:
        src.load(ID_A)
    assert str(pfile) in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_truncated_catalogue(tmp_path):
    root = write_eagle(tmp_path / "sim")
    gfile = root / "groups_028_z000p101" / "eagle_subfind_tab_028_z000p101.1.hdf5"
    gfile.write_bytes(gfile.read_bytes()[:300])
    src = EagleSource(root)
    with pytest.raises(Sim2ObsDataError, match="re-download") as exc:
        src.ids()
    assert str(gfile) in str(exc.value)


def test_catalogue_and_particles_disagree(tmp_path):
    root = write_eagle(tmp_path / "sim")
    gfile = root / "groups_028_z000p101" / "eagle_subfind_tab_028_z000p101.0.hdf5"
    with h5py.File(gfile, "a") as f:
        f["Subhalo/SubLengthType"][1, 4] = 140  # the particle files hold 150
    with pytest.raises(Sim2ObsDataError, match="gives 140 star particles"):
        EagleSource(root).load(ID_B)


def test_errors_share_the_base_class(tmp_path):
    with pytest.raises(Sim2ObsError):
        EagleSource(tmp_path / "missing")
    with pytest.raises(Sim2ObsValueError):
        EagleSource(tmp_path, selection="all")
