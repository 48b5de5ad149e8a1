"""The built-in mini-universe: TNG layout read by the real illustris_python, population relations,
particle structure, photometry, determinism, caching."""

from __future__ import annotations

import math

import h5py
import illustris_python as il
import numpy as np
import pytest
from scipy.integrate import trapezoid

from sim2obs.errors import Sim2ObsValueError
from sim2obs.forward_models import photometry
from sim2obs.forward_models.simulations import mini, open_source
from sim2obs.forward_models.simulations.base import redshift_time_gyr
from sim2obs.forward_models.simulations.tng import TNGSource

N_GAL = 20
SNAP = 99


@pytest.fixture(scope="module")
def universe(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini") / "uni"
    return mini.build_mini_universe(root, n_galaxies=N_GAL, seed=3, snapshot=SNAP,
                                    n_chunks=3, progress=False)


@pytest.fixture(scope="module")
def base(universe):
    return str(universe / "output")


@pytest.fixture(scope="module")
def population():
    return mini.draw_population(300, seed=11)


# ------------------------------------------------------------------------------------------
# layout, read by illustris_python itself
# ------------------------------------------------------------------------------------------

def test_layout_files(universe):
    assert (universe / "output" / "groups_099" / "fof_subhalo_tab_099.0.hdf5").is_file()
    assert (universe / "output" / "groups_099" / "fof_subhalo_tab_099.2.hdf5").is_file()
    assert (universe / "output" / "snapdir_099" / "snap_099.2.hdf5").is_file()
    assert (universe / "postprocessing" / "offsets" / "offsets_099.hdf5").is_file()
    meta = mini.read_mini_parameters(universe)
    assert meta["version"] == mini.MINI_VERSION
    assert meta["parameters"]["n_galaxies"] == N_GAL
    # nothing left from the atomic build
    assert not [p for p in universe.parent.iterdir() if ".building-" in p.name]


def test_illustris_python_reads_header_and_catalogues(base):
    header = il.groupcat.loadHeader(base, SNAP)
    assert header["Nsubgroups_Total"] == N_GAL and header["NumFiles"] == 3
    assert header["HubbleParam"] == pytest.approx(0.6774)
    assert header["Redshift"] == 0.0 and header["Time"] == 1.0
    subs = il.groupcat.loadSubhalos(base, SNAP, fields=[
        "SubhaloLenType", "SubhaloMassType", "SubhaloPos", "SubhaloSFR", "SubhaloHalfmassRadType",
        "SubhaloGrNr", "SubhaloFlag", "SubhaloStellarPhotometrics"])
    assert subs["count"] == N_GAL
    assert subs["SubhaloStellarPhotometrics"].shape == (N_GAL, 8)
    assert np.all(subs["SubhaloFlag"] == 1)
    np.testing.assert_array_equal(subs["SubhaloGrNr"], np.arange(N_GAL))
    assert np.all(subs["SubhaloLenType"][:, [0, 1, 2, 3, 5]] == 0)
    halos = il.groupcat.loadHalos(base, SNAP, fields=["GroupFirstSub", "GroupNsubs", "GroupLenType",
                                                       "Group_M_Crit200"])
    np.testing.assert_array_equal(halos["GroupFirstSub"], np.arange(N_GAL))
    np.testing.assert_array_equal(halos["GroupNsubs"], 1)
    np.testing.assert_array_equal(halos["GroupLenType"], subs["SubhaloLenType"])
    # halo masses well above stellar masses (Moster et al. 2013: M*/Mh <~ 3 %)
    assert np.all(halos["Group_M_Crit200"] > 20 * subs["SubhaloMassType"][:, 4])
    single = il.groupcat.loadSingle(base, SNAP, subhaloID=N_GAL - 1)
    np.testing.assert_array_equal(single["SubhaloLenType"], subs["SubhaloLenType"][-1])


def test_load_subhalo_gives_exactly_its_particles_across_chunks(base):
    subs = il.groupcat.loadSubhalos(base, SNAP, fields=["SubhaloLenType"])
    length = subs[:, 4].astype(np.int64)
    first = np.concatenate([[0], np.cumsum(length)[:-1]])
    with h5py.File(il.groupcat.offsetPath(base, SNAP), "r") as f:
        chunk_starts = f["FileOffsets/SnapByType"][:, 4]
    spanning = [i for i in range(N_GAL)
                if np.any((chunk_starts > first[i]) & (chunk_starts < first[i] + length[i]))]
    assert spanning, "no subhalo spans a snapshot chunk boundary"
    for i in range(N_GAL):
        stars = il.snapshot.loadSubhalo(base, SNAP, i, "stars", fields=["ParticleIDs", "Masses"])
        assert stars["count"] == length[i]
        # particles are stored subhalo by subhalo with consecutive ids starting at 1
        np.testing.assert_array_equal(stars["ParticleIDs"], first[i] + 1 + np.arange(length[i]))
    all_stars = il.snapshot.loadSubset(base, SNAP, "stars", fields=["Masses"])
    assert all_stars.size == length.sum()


def test_catalogue_matches_particles(base):
    subs = il.groupcat.loadSubhalos(base, SNAP, fields=[
        "SubhaloMassType", "SubhaloLenType", "SubhaloStellarPhotometrics", "SubhaloSFR"])
    for i in (0, 7, N_GAL - 1):
        p = il.snapshot.loadSubhalo(base, SNAP, i, "stars")
        np.testing.assert_allclose(p["Masses"].astype(np.float64).sum(),
                                   subs["SubhaloMassType"][i, 4], rtol=1e-5)
        wind = p["GFM_StellarFormationTime"] <= 0
        assert 1 <= wind.sum() <= 3
        assert np.all(p["GFM_StellarPhotometrics"][wind] == mini.WIND_MAGNITUDE)
        mags = p["GFM_StellarPhotometrics"][~wind].astype(np.float64)
        total = -2.5 * np.log10(np.sum(10 ** (-0.4 * mags), axis=0))
        np.testing.assert_allclose(total, subs["SubhaloStellarPhotometrics"][i], atol=1e-4)
        assert np.all(p["StellarHsml"] > 0)
        assert np.all(p["GFM_InitialMass"][~wind] >= p["Masses"][~wind])
        # particle (initial) mass: TNG100 resolution floor, at most ~20000 particles
        m_p = p["GFM_InitialMass"][~wind].astype(np.float64).max() * 1e10 / 0.6774
        assert m_p >= mini.PARTICLE_MASS_MSUN * (1 - 1e-6)
        assert (~wind).sum() <= 1.05 * mini.MAX_PARTICLES


def test_stored_photometrics_equal_recomputation(universe, base):
    src = TNGSource(universe)
    for i in (1, 4):
        raw = il.snapshot.loadSubhalo(base, SNAP, i, "stars", fields=["GFM_StellarPhotometrics",
                                                                      "GFM_StellarFormationTime"])
        stored = raw["GFM_StellarPhotometrics"][raw["GFM_StellarFormationTime"] > 0]
        g = src.load(i)
        again = photometry.absolute_magnitudes(mini.PHOTOMETRY_FILTERS, g.stars.age_gyr,
                                               g.stars.metallicity, g.stars.initial_mass_msun)
        np.testing.assert_allclose(stored, again, atol=2e-4)


def test_sfr_label_is_mass_formed_in_last_100_myr(universe, base):
    subs = il.groupcat.loadSubhalos(base, SNAP, fields=["SubhaloSFR"])
    src = TNGSource(universe)
    n_sf = 0
    for i in range(N_GAL):
        g = src.load(i)
        young = g.stars.age_gyr < 0.1
        formed = g.stars.initial_mass_msun[young].sum() / 1e8
        assert formed == pytest.approx(float(subs[i]), rel=1e-5, abs=1e-9)
        n_sf += subs[i] > 0
    assert n_sf >= N_GAL // 2


# ------------------------------------------------------------------------------------------
# the population follows its relations (catalogue only, n = 300)
# ------------------------------------------------------------------------------------------

def test_population_mass_function(population):
    lm = population.log_mstar
    assert lm.min() >= 9.0 and lm.max() <= 11.5
    grid = np.linspace(9, 11.5, 2001)
    phi = mini.baldry12_smf(grid)
    expected = trapezoid(phi[grid > 10.5], grid[grid > 10.5]) / trapezoid(phi, grid)
    observed = np.mean(lm > 10.5)
    # binomial 3-sigma
    assert abs(observed - expected) < 3 * math.sqrt(expected * (1 - expected) / lm.size)


def test_population_main_sequence_slope_and_zero_point(population):
    sf = ~population.quenched
    t = redshift_time_gyr(0.0)
    slope, intercept = np.polyfit(population.log_mstar[sf], population.log_sfr[sf], 1)
    assert slope == pytest.approx(0.84 - 0.026 * t, abs=0.1)  # Speagle+14 eq. 28: 0.48 at z=0
    resid = population.log_sfr[sf] - mini.speagle14_log_sfr(population.log_mstar[sf], t)
    assert abs(np.median(resid)) < 0.06
    assert np.std(resid) == pytest.approx(mini.MS_SCATTER_DEX, abs=0.05)
    q_ssfr = population.log_sfr[population.quenched] - population.log_mstar[population.quenched]
    assert np.all(q_ssfr < -11)


def test_population_quenched_fraction_rises_with_mass(population):
    lm, q = population.log_mstar, population.quenched
    low, high = q[lm < 9.5].mean(), q[lm > 10.5].mean()
    assert low < 0.2 and high > 0.5 and high - low > 0.35


def test_population_sizes_follow_van_der_wel(population):
    lm, q = population.log_mstar, population.quenched
    resid = np.log10(population.r_e_kpc) - mini.vdw14_log_re(lm, q, 0.0)
    assert abs(np.median(resid[~q])) < 0.05
    assert np.std(resid[~q]) == pytest.approx(0.16, abs=0.04)
    # median size at fixed mass (log M* = 10.0-10.5) of late types: 10^0.86 (M/5e10)^0.25 kpc
    sel = ~q & (lm > 10.0) & (lm < 10.5)
    assert np.median(np.log10(population.r_e_kpc[sel])) == pytest.approx(
        0.86 + 0.25 * (np.median(lm[sel]) - math.log10(5e10)), abs=0.1)
    if np.count_nonzero(q) > 10:
        assert abs(np.median(resid[q])) < 0.08
    # the relations themselves: table 1 (z = 0.25) values above the early-type break ...
    assert mini.vdw14_log_re(11.0, True, 0.0) == pytest.approx(0.60 + 0.75 * (11 - math.log10(5e10)))
    assert mini.vdw14_log_re(11.0, False, 0.0) == pytest.approx(0.86 + 0.25 * (11 - math.log10(5e10)))
    # ... continuous, flatter below 2e10 Msun, and smaller at higher redshift
    lo, hi = mini.vdw14_log_re(np.array([10.3, 10.302]), True, 0.0)
    assert hi - lo < 0.01
    assert mini.vdw14_log_re(9.0, True, 0.0) > -0.4  # no 0.1 kpc quiescent dwarfs
    assert mini.vdw14_log_re(10.5, True, 2.0) < mini.vdw14_log_re(10.5, True, 0.0) - 0.4


def test_population_metallicity_and_bulges(population):
    lm, q = population.log_mstar, population.quenched
    log_z = np.log10(population.metallicity / mini.GALLAZZI05_Z_SUN)
    _, p50, _ = mini.gallazzi05_log_z(lm)
    assert abs(np.median(log_z - p50)) < 0.1
    assert np.corrcoef(lm, log_z)[0, 1] > 0.3
    bt = population.bulge_fraction
    assert np.all((bt >= 0) & (bt <= 1))
    assert bt[q].mean() > bt[~q].mean() + 0.2
    assert np.corrcoef(lm[~q], bt[~q])[0, 1] > 0.1


def test_draw_population_is_deterministic():
    a, b = mini.draw_population(50, seed=2), mini.draw_population(50, seed=2)
    np.testing.assert_array_equal(a.log_mstar, b.log_mstar)
    np.testing.assert_array_equal(a.r_e_kpc, b.r_e_kpc)
    assert not np.array_equal(a.log_mstar, mini.draw_population(50, seed=3).log_mstar)


# ------------------------------------------------------------------------------------------
# particle structure of one galaxy
# ------------------------------------------------------------------------------------------

def _disc_frame(pos, mass):
    """Rotate into the frame of the inertia tensor (last axis = shortest = disc normal)."""
    cov = np.cov(pos.T, aweights=mass)
    _, vecs = np.linalg.eigh(cov)
    return pos @ vecs[:, ::-1]


def test_disc_galaxy_particles():
    pop = mini.draw_population(400, seed=5)
    # a star-forming, disc-dominated galaxy with enough young stars
    cand = np.flatnonzero(~pop.quenched & (pop.bulge_fraction < 0.2) & (pop.log_mstar > 9.8)
                          & (pop.log_sfr > 0))
    i = int(cand[0])
    g = mini.galaxy_particles(pop, i, seed=5)
    star = ~g["wind"]
    pos = _disc_frame(g["position_kpc"][star], g["initial_mass_msun"][star])
    age = g["age_gyr"][star]
    z = g["metallicity"][star]
    r_cyl = np.hypot(pos[:, 0], pos[:, 1])
    # thin: vertical rms << in-plane rms (scale height ~0.1 R_d)
    assert np.std(pos[:, 2]) < 0.3 * np.std(pos[:, 0])
    # projected half-mass radius close to the catalogue R_e (face-on)
    m = g["initial_mass_msun"][star]
    order = np.argsort(r_cyl)
    r_half = r_cyl[order][np.searchsorted(np.cumsum(m[order]), 0.5 * m.sum())]
    assert r_half == pytest.approx(pop.r_e_kpc[i], rel=0.25)
    # negative age and metallicity gradients
    inner, outer = r_cyl < 0.5 * pop.r_e_kpc[i], (r_cyl > pop.r_e_kpc[i]) & (r_cyl < 2 * pop.r_e_kpc[i])
    assert np.median(np.log10(age[inner])) > np.median(np.log10(age[outer]))
    assert np.median(np.log10(z[inner])) > np.median(np.log10(z[outer]))
    # young stars trace two spiral arms: m = 2 Fourier amplitude larger than the old disc's
    phi = np.arctan2(pos[:, 1], pos[:, 0])
    young = age < 0.1
    assert young.sum() == g["n_young"]
    ring = (r_cyl > 0.5 * pop.r_e_kpc[i]) & (r_cyl < 2 * pop.r_e_kpc[i])

    def a2(sel):
        return abs(np.mean(np.exp(2j * phi[sel])))

    assert a2(young & ring) > a2(~young & ring) + 0.1
    # mass formed in the last 100 Myr = n_young particles
    assert m[young].sum() == pytest.approx(g["n_young"] * g["particle_mass_msun"])


# ------------------------------------------------------------------------------------------
# determinism, caching, errors
# ------------------------------------------------------------------------------------------

def _particle_bytes(root):
    out = {}
    for chunk in sorted((root / "output" / "snapdir_099").glob("*.hdf5")):
        with h5py.File(chunk, "r") as f:
            for key in f["PartType4"]:
                out[(chunk.name, key)] = f["PartType4"][key][()].tobytes()
    return out


def test_same_seed_same_bytes(tmp_path):
    a = mini.build_mini_universe(tmp_path / "a", n_galaxies=3, seed=7, progress=False)
    b = mini.build_mini_universe(tmp_path / "b", n_galaxies=3, seed=7, progress=False)
    c = mini.build_mini_universe(tmp_path / "c", n_galaxies=3, seed=8, progress=False)
    pa, pb = _particle_bytes(a), _particle_bytes(b)
    assert pa.keys() == pb.keys() and all(pa[k] == pb[k] for k in pa)
    assert _particle_bytes(c) != pa


def test_build_is_idempotent_and_refuses_foreign_folders(tmp_path):
    out = mini.build_mini_universe(tmp_path / "u", n_galaxies=2, seed=0, progress=False)
    stamp = (out / "mini_universe.json").stat().st_mtime_ns
    assert mini.build_mini_universe(out, n_galaxies=2, seed=0, progress=False) == out
    assert (out / "mini_universe.json").stat().st_mtime_ns == stamp
    with pytest.raises(Sim2ObsValueError, match="different mini-universe"):
        mini.build_mini_universe(out, n_galaxies=3, seed=0, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("hello")
    with pytest.raises(Sim2ObsValueError, match="not an empty folder"):
        mini.build_mini_universe(other, n_galaxies=2, progress=False)
    with pytest.raises(Sim2ObsValueError, match="n_galaxies"):
        mini.build_mini_universe(tmp_path / "bad", n_galaxies=0, progress=False)
    with pytest.raises(Sim2ObsValueError, match="redshift"):
        mini.build_mini_universe(tmp_path / "bad", n_galaxies=2, redshift=7.0, progress=False)


def test_default_mini_universe_cached_and_open_source(tmp_path, monkeypatch):
    import sim2obs.forward_models.simulations as sims

    monkeypatch.setattr(sims, "DEFAULT_MINI_GALAXIES", 3)
    monkeypatch.setenv("SIM2OBS_CACHE", str(tmp_path / "cache"))
    src = open_source("mini", progress=False)
    assert src.name == "mini" and src.redshift == 0.0 and src.cosmology == "Planck15"
    path = tmp_path / "cache" / f"mini-v{mini.MINI_VERSION}-n3-seed0"
    assert path.is_dir()
    assert mini.default_mini_universe(n_galaxies=3, progress=False) == path
    desc = src.describe()
    assert desc["kind"] == "mini" and desc["snapshot"] == 99
    assert desc["mini_universe"]["parameters"]["n_galaxies"] == 3
    assert src.load(int(src.ids()[0])).source == "mini"
    # mini:DIR builds into an empty/new folder and reopens it
    src2 = open_source(f"mini:{tmp_path / 'mine'}", progress=False)
    assert (tmp_path / "mine" / "mini_universe.json").is_file() and src2.name == "mini"
    assert len(src2.ids()) == 3


def test_galaxies_at_redshift(tmp_path):
    out = mini.build_mini_universe(tmp_path / "z1", n_galaxies=2, seed=1, snapshot=50,
                                   redshift=1.0, progress=False)
    src = TNGSource(out)
    assert src.snapshot == 50 and src.redshift == pytest.approx(1.0)
    g = src.load(0)
    assert g.redshift == pytest.approx(1.0)
    assert g.labels["age_gyr"] < redshift_time_gyr(1.0)
    assert np.all(g.stars.age_gyr <= redshift_time_gyr(1.0))
