"""IllustrisTNG readers on a mini-universe (real illustris_python, no mocks): unit conversions,
winds, periodic wrapping, labels, selection, pickling, cutouts and error messages."""

from __future__ import annotations

import pickle
import shutil

import h5py
import illustris_python as il
import numpy as np
import pytest
from astropy.cosmology import Planck15

from sim2obs.errors import (
    Sim2ObsDataError,
    Sim2ObsError,
    Sim2ObsFileNotFoundError,
    Sim2ObsKeyError,
    Sim2ObsValueError,
)
from sim2obs.forward_models.galaxy import LOG_SSFR_FLOOR
from sim2obs.forward_models.simulations import SOURCE_FORMS, open_source
from sim2obs.forward_models.simulations.base import (
    InsufficientParticlesError,
    Selection,
    cosmic_time_gyr,
    scale_factor_at_time,
    shrinking_sphere_centre,
)
from sim2obs.forward_models.simulations.mini import build_mini_universe
from sim2obs.forward_models.simulations.tng import TNGCutoutSource, TNGSource

N_GAL = 12
SNAP = 99
CORNER = 3  # mini-universe galaxies with i % 10 == 3 straddle the box corner


@pytest.fixture(scope="module")
def universe(tmp_path_factory):
    root = tmp_path_factory.mktemp("tng") / "TNG-mini"
    return build_mini_universe(root, n_galaxies=N_GAL, seed=1, snapshot=SNAP, n_chunks=2,
                               progress=False)


@pytest.fixture(scope="module")
def base(universe):
    return str(universe / "output")


@pytest.fixture(scope="module")
def source(universe):
    return TNGSource(universe, selection=Selection(min_mstar_msun=0, min_particles=1))


@pytest.fixture(scope="module")
def catalogue(base):
    return il.groupcat.loadSubhalos(base, SNAP, fields=[
        "SubhaloPos", "SubhaloMassType", "SubhaloLenType", "SubhaloSFR", "SubhaloHalfmassRadType"])


def _copy(universe, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(universe, dst)
    return dst


# ------------------------------------------------------------------------------------------
# conversions
# ------------------------------------------------------------------------------------------

def test_conversions_for_one_particle_by_hand(source, base, catalogue):
    i = 2
    raw = il.snapshot.loadSubhalo(base, SNAP, i, "stars")
    header = il.groupcat.loadHeader(base, SNAP)
    h, a, box = header["HubbleParam"], header["Time"], header["BoxSize"]
    star = np.flatnonzero(raw["GFM_StellarFormationTime"] > 0)
    g = source.load(i)
    k = 17  # 17th star particle (after winds are dropped)
    j = star[k]
    d = raw["Coordinates"][j] - catalogue["SubhaloPos"][i].astype(np.float64)
    d = (d + box / 2) % box - box / 2
    np.testing.assert_allclose(g.stars.position_kpc[k], d * a / h, rtol=1e-12, atol=1e-9)
    assert g.stars.initial_mass_msun[k] == pytest.approx(float(raw["GFM_InitialMass"][j]) * 1e10 / h, rel=1e-12)
    assert g.stars.current_mass_msun[k] == pytest.approx(float(raw["Masses"][j]) * 1e10 / h, rel=1e-12)
    assert g.stars.metallicity[k] == pytest.approx(float(raw["GFM_Metallicity"][j]), rel=1e-12)
    a_form = float(raw["GFM_StellarFormationTime"][j])
    age = Planck15.age(header["Redshift"]).to_value("Gyr") - Planck15.age(1 / a_form - 1).to_value("Gyr")
    assert g.stars.age_gyr[k] == pytest.approx(age, abs=1e-6)
    assert g.stars.smoothing_length_kpc[k] == pytest.approx(float(raw["StellarHsml"][j]) * a / h, rel=1e-12)
    assert g.cosmology == "Planck15" and g.object_id == i and g.source == source.name


def test_cosmic_time_matches_astropy_and_inverts():
    a = np.array([0.05, 0.2, 0.5, 0.9, 1.0])
    expected = Planck15.age(1 / a - 1).to_value("Gyr")
    np.testing.assert_allclose(cosmic_time_gyr(a), expected, atol=1e-6)
    np.testing.assert_allclose(scale_factor_at_time(expected), a, rtol=1e-8)
    with pytest.raises(Sim2ObsValueError):
        cosmic_time_gyr(np.array([0.5, -0.1]))


def test_winds_are_dropped(source, catalogue, base):
    for i in range(N_GAL):
        sft = il.snapshot.loadSubhalo(base, SNAP, i, "stars", fields=["GFM_StellarFormationTime"])
        n_wind = int(np.count_nonzero(sft <= 0))
        assert n_wind >= 1
        g = source.load(i)
        assert g.stars.n == catalogue["SubhaloLenType"][i, 4] - n_wind
        assert np.all(g.stars.initial_mass_msun > 0) and np.all(np.isfinite(g.stars.age_gyr))


def test_periodic_wrapping(source, base, universe):
    raw = il.snapshot.loadSubhalo(base, SNAP, CORNER, "stars", fields=["Coordinates"])
    box = il.groupcat.loadHeader(base, SNAP)["BoxSize"]
    span = raw.max(axis=0) - raw.min(axis=0)
    assert np.all(span > box / 2), "the test galaxy should straddle the box corner"
    g = source.load(CORNER)
    assert np.abs(g.stars.position_kpc).max() < 300
    assert g.labels["r_half_kpc"] < 50


def test_labels(source, catalogue):
    h = 0.6774
    for i in range(N_GAL):
        g = source.load(i)
        lab = g.labels
        log_m_cat = np.log10(catalogue["SubhaloMassType"][i, 4] * 1e10 / h)
        assert lab["log_mstar"] == pytest.approx(log_m_cat, abs=0.01)
        r_cat = catalogue["SubhaloHalfmassRadType"][i, 4] / h
        assert lab["r_half_kpc"] == pytest.approx(r_cat, rel=0.02)
        sfr = float(catalogue["SubhaloSFR"][i])
        if sfr > 0 and np.log10(sfr) - lab["log_mstar"] > LOG_SSFR_FLOOR:
            assert lab["log_sfr"] == pytest.approx(np.log10(sfr), abs=1e-5)
        else:
            assert lab["log_ssfr"] == LOG_SSFR_FLOOR
        assert lab["redshift"] == 0.0
        assert 0 < lab["age_gyr"] < 13.8
        assert -2 < lab["log_zstar"] < 1


# ------------------------------------------------------------------------------------------
# selection, paths, pickling
# ------------------------------------------------------------------------------------------

def test_selection(universe, catalogue):
    mstar = catalogue["SubhaloMassType"][:, 4] * 1e10 / 0.6774
    src = TNGSource(universe, selection=Selection(min_mstar_msun=1e10))
    ids = src.ids()
    assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(ids, np.flatnonzero(mstar >= 1e10))
    length = catalogue["SubhaloLenType"][:, 4]
    cut = int(np.median(length))
    src = TNGSource(universe, selection=Selection(min_mstar_msun=0, min_particles=cut))
    np.testing.assert_array_equal(src.ids(), np.flatnonzero(length >= cut))
    sub = TNGSource(universe, selection=Selection(min_mstar_msun=0, max_galaxies=5)).ids()
    assert sub.size == 5 and np.all(np.diff(sub) > 0)
    np.testing.assert_array_equal(
        sub, TNGSource(universe, selection=Selection(min_mstar_msun=0, max_galaxies=5)).ids())
    for bad in (dict(min_mstar_msun=-1), dict(min_mstar_msun=float("nan")),
                dict(min_particles=0), dict(min_particles=2.5), dict(max_galaxies=0)):
        with pytest.raises(Sim2ObsValueError):
            Selection(**bad)


def test_too_few_particles_after_winds(universe, catalogue):
    length = int(catalogue["SubhaloLenType"][0, 4])
    src = TNGSource(universe, selection=Selection(min_mstar_msun=0, min_particles=length))
    assert 0 in src.ids()  # the catalogue length (winds included) passes ...
    with pytest.raises(InsufficientParticlesError, match="wind"):  # ... the star count does not
        src.load(0)


def test_output_folder_or_parent_and_pickling(universe, source):
    by_output = TNGSource(universe / "output", selection=source.selection)
    assert by_output.base_path == source.base_path
    assert by_output.name == "mini"  # the mini_universe.json marker names it
    assert TNGSource(universe, name="TNG-mini").name == "TNG-mini"
    clone = pickle.loads(pickle.dumps(source))
    a, b = source.load(5), clone.load(5)
    np.testing.assert_array_equal(a.stars.position_kpc, b.stars.position_kpc)
    assert a.labels == b.labels
    desc = source.describe()
    assert desc["snapshot"] == SNAP and desc["path"] == source.base_path
    assert desc["selection"] == {"min_mstar_msun": 0.0, "min_particles": 1, "max_galaxies": None}
    import json

    json.dumps(desc)
    with pytest.raises(Sim2ObsKeyError, match="does not exist"):
        source.load(N_GAL)


def test_run_name_from_folder(universe, tmp_path):
    run = tmp_path / "TNG50-4"
    shutil.copytree(universe / "output", run / "output")
    shutil.copytree(universe / "postprocessing", run / "postprocessing")
    src = TNGSource(run)
    assert src.name == "TNG50-4" and src.describe()["kind"] == "tng"
    assert open_source(f"tng:{run}").name == "TNG50-4"


# ------------------------------------------------------------------------------------------
# errors name the file, the field and the fix
# ------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(Sim2ObsFileNotFoundError, match="does not exist"):
        TNGSource(tmp_path / "nowhere")
    with pytest.raises(Sim2ObsFileNotFoundError, match="groups_SSS"):
        TNGSource(tmp_path)


def test_wrong_snapshot_lists_available(universe):
    with pytest.raises(Sim2ObsFileNotFoundError, match=r"snapshot 98 .*available snapshots: \[99\]"):
        TNGSource(universe, 98)


def test_snapshot_without_parttype4(universe, tmp_path):
    dst = _copy(universe, tmp_path)
    for chunk in (dst / "output" / "snapdir_099").glob("*.hdf5"):
        with h5py.File(chunk, "a") as f:
            del f["PartType4"]
    with pytest.raises(Sim2ObsDataError, match=r"snap_099\.0\.hdf5.*'PartType4'"):
        TNGSource(dst)


def test_missing_star_field(universe, tmp_path):
    dst = _copy(universe, tmp_path)
    for chunk in (dst / "output" / "snapdir_099").glob("*.hdf5"):
        with h5py.File(chunk, "a") as f:
            del f["PartType4/GFM_Metallicity"]
    with pytest.raises(Sim2ObsDataError, match=r"snap_099\.0\.hdf5.*GFM_Metallicity"):
        TNGSource(dst)


def test_group_catalogue_without_subhalo_fields(universe, tmp_path):
    dst = _copy(universe, tmp_path)
    for chunk in (dst / "output" / "groups_099").glob("*.hdf5"):
        with h5py.File(chunk, "a") as f:
            del f["Subhalo/SubhaloMassType"]
    with pytest.raises(Sim2ObsDataError, match=r"fof_subhalo_tab_099\.0\.hdf5.*SubhaloMassType"):
        TNGSource(dst)
    for chunk in (dst / "output" / "groups_099").glob("*.hdf5"):
        with h5py.File(chunk, "a") as f:
            del f["Subhalo"]
    with pytest.raises(Sim2ObsDataError, match="no 'Subhalo' fields"):
        TNGSource(dst)


def test_missing_offsets(universe, tmp_path):
    dst = _copy(universe, tmp_path)
    (dst / "postprocessing" / "offsets" / "offsets_099.hdf5").unlink()
    with pytest.raises(Sim2ObsFileNotFoundError, match="offsets_099.hdf5.*postprocessing"):
        TNGSource(dst)


def _first_star_index(path_base, i):
    """(chunk file, index within chunk) of subhalo i's first particle."""
    subset = il.snapshot.getSnapOffsets(path_base, SNAP, i, "Subhalo")
    start = int(subset["offsetType"][4])
    starts = subset["snapOffsets"][4]
    chunk = int(np.max(np.flatnonzero(starts <= start)))
    return il.snapshot.snapPath(path_base, SNAP, chunk), start - int(starts[chunk])


@pytest.mark.parametrize("value, field, pattern", [
    (np.nan, "Masses", "NaN"), (-1.0, "Masses", "negative"), (np.nan, "GFM_InitialMass", "NaN"),
])
def test_bad_particle_values_name_the_file(universe, tmp_path, value, field, pattern):
    dst = _copy(universe, tmp_path)
    i = 4
    path, local = _first_star_index(str(dst / "output"), i)
    with h5py.File(path, "a") as f:
        sft = f["PartType4/GFM_StellarFormationTime"][local:local + 50]
        j = local + int(np.flatnonzero(sft > 0)[0])
        f[f"PartType4/{field}"][j] = value
    src = TNGSource(dst)
    with pytest.raises(Sim2ObsDataError) as info:
        src.load(i)
    msg = str(info.value)
    assert field in msg and pattern in msg and path in msg and "subhalo 4" in msg
    # the other galaxies still load
    src.load(i + 1)


def test_corrupt_file_is_not_a_raw_traceback(universe, tmp_path):
    dst = _copy(universe, tmp_path)
    chunk = dst / "output" / "snapdir_099" / "snap_099.1.hdf5"
    chunk.write_bytes(b"not an hdf5 file")
    src = TNGSource(dst)  # only the first chunk with stars is opened up front
    with pytest.raises(Sim2ObsError, match=r"snap_099\.1\.hdf5"):
        src.load(N_GAL - 1)  # the last subhalo lives in the last chunk
    (dst / "output" / "groups_099" / "fof_subhalo_tab_099.0.hdf5").write_bytes(b"junk")
    with pytest.raises(Sim2ObsError, match=r"fof_subhalo_tab_099\.0\.hdf5"):
        TNGSource(dst)


# ------------------------------------------------------------------------------------------
# open_source
# ------------------------------------------------------------------------------------------

def test_open_source_forms(universe, tmp_path):
    sel = Selection(min_mstar_msun=0)
    assert isinstance(open_source(f"tng:{universe}", selection=sel), TNGSource)
    assert open_source(f"mini:{universe}", selection=sel).name == "mini"
    assert open_source(f"tng:{universe}", snapshot=SNAP).snapshot == SNAP
    with pytest.raises(Sim2ObsValueError) as info:
        open_source("illustris:/data")
    for form in SOURCE_FORMS:
        assert form in str(info.value)
    with pytest.raises(Sim2ObsValueError, match="needs a path"):
        open_source("tng:")
    with pytest.raises(Sim2ObsFileNotFoundError):
        open_source(f"tng-cutout:{tmp_path / 'none'}")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("x")
    with pytest.raises(Sim2ObsFileNotFoundError, match="not a mini-universe"):
        open_source(f"mini:{junk}")


def test_open_source_dispatches_eagle(monkeypatch, tmp_path):
    """eagle:PATH is handed to eagle.EagleSource(path, snapshot, selection)."""
    import sys
    import types

    calls = []

    class FakeEagle:
        def __init__(self, path, snapshot, selection):
            calls.append((path, snapshot, selection))

    module = types.ModuleType("sim2obs.forward_models.simulations.eagle")
    module.EagleSource = FakeEagle
    monkeypatch.setitem(sys.modules, "sim2obs.forward_models.simulations.eagle", module)
    sel = Selection(min_particles=5)
    open_source(f"eagle:{tmp_path}", snapshot=28, selection=sel)
    assert calls == [(str(tmp_path), 28, sel)]


# ------------------------------------------------------------------------------------------
# API cutouts
# ------------------------------------------------------------------------------------------

def _write_cutout(base, i, path, with_id_attr=False):
    raw = il.snapshot.loadSubhalo(base, SNAP, i, "stars")
    with h5py.File(il.snapshot.snapPath(base, SNAP, 0), "r") as f:
        header = dict(f["Header"].attrs.items())
    with h5py.File(path, "w") as f:
        hd = f.create_group("Header")
        for key in ("BoxSize", "HubbleParam", "Omega0", "OmegaLambda", "Redshift", "Time"):
            hd.attrs[key] = header[key]
        if with_id_attr:
            hd.attrs["SubhaloID"] = i
        g = f.create_group("PartType4")
        for key, value in raw.items():
            if key != "count":
                g.create_dataset(key, data=value)


def test_cutout_reader_matches_snapshot_reader(base, source, tmp_path, catalogue):
    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i in (CORNER, 5):
        _write_cutout(base, i, folder / f"cutout_{i}.hdf5")
    cut = TNGCutoutSource(folder)
    np.testing.assert_array_equal(cut.ids(), [CORNER, 5])
    assert cut.redshift == 0.0 and cut.cosmology == "Planck15"
    for i in (CORNER, 5):
        a, b = cut.load(i), source.load(i)
        # shrinking-sphere centre within a fraction of a kpc of SubhaloPos, across the box corner
        shift = np.median(a.stars.position_kpc - b.stars.position_kpc, axis=0)
        np.testing.assert_allclose(a.stars.position_kpc - shift, b.stars.position_kpc, atol=1e-6)
        assert np.linalg.norm(shift) < 0.5
        np.testing.assert_allclose(a.stars.age_gyr, b.stars.age_gyr)
        assert a.labels["log_mstar"] == pytest.approx(b.labels["log_mstar"])
        # no catalogue: the SFR is the mass formed in the last 100 Myr, which the mini-universe
        # stores as SubhaloSFR
        assert a.labels["log_ssfr"] == pytest.approx(b.labels["log_ssfr"], abs=1e-4)
    # one file; the id from the header attribute wins over the file name
    single = tmp_path / "cutout.hdf5"
    _write_cutout(base, 7, single, with_id_attr=True)
    one = TNGCutoutSource(single)
    np.testing.assert_array_equal(one.ids(), [7])
    assert one.load(7).stars.n == source.load(7).stars.n
    assert one.describe()["kind"] == "tng-cutout"
    assert isinstance(open_source(f"tng-cutout:{single}"), TNGCutoutSource)
    # selection on the summed particle mass
    big = np.flatnonzero(catalogue["SubhaloMassType"][[CORNER, 5], 4] * 1e10 / 0.6774 >= 1e10)
    sel = TNGCutoutSource(folder, selection=Selection(min_mstar_msun=1e10)).ids()
    np.testing.assert_array_equal(sel, np.array([CORNER, 5])[big])
    clone = pickle.loads(pickle.dumps(cut))
    assert clone.load(5).labels == cut.load(5).labels


def test_cutout_errors(base, tmp_path):
    with pytest.raises(Sim2ObsFileNotFoundError, match="does not exist"):
        TNGCutoutSource(tmp_path / "none.hdf5")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Sim2ObsFileNotFoundError, match="no .hdf5"):
        TNGCutoutSource(empty)
    path = tmp_path / "subhalo_5.hdf5"
    _write_cutout(base, 5, path)
    with h5py.File(path, "a") as f:
        del f["PartType4"]
    with pytest.raises(Sim2ObsDataError, match=r"subhalo_5\.hdf5.*'PartType4'"):
        TNGCutoutSource(path)
    _write_cutout(base, 5, path)
    with h5py.File(path, "a") as f:
        f["PartType4/Masses"][0] = np.nan
        f["PartType4/GFM_StellarFormationTime"][0] = 0.5
    with pytest.raises(Sim2ObsDataError, match=r"subhalo_5\.hdf5.*'Masses'.*NaN"):
        TNGCutoutSource(path).load(5)
    with pytest.raises(Sim2ObsKeyError, match="no cutout with object id 6"):
        TNGCutoutSource(path).load(6)


def test_shrinking_sphere_finds_the_dense_centre():
    rng = np.random.default_rng(0)
    core = rng.normal(0, 1.0, (3000, 3)) + np.array([5.0, -2.0, 1.0])
    halo = rng.uniform(-60, 60, (3000, 3))  # a uniform background pulls the mean off-centre
    pos = np.vstack([core, halo])
    centre = shrinking_sphere_centre(pos, np.ones(len(pos)))
    np.testing.assert_allclose(centre, [5.0, -2.0, 1.0], atol=0.2)
