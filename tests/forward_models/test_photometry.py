"""Photometry against analytic answers: AB zero points, distance and (1+z) scaling."""

import math

import numpy as np
import pytest

from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError
from sim2obs.forward_models.photometry import (
    MPC_CM,
    ab_maggies,
    arcsec_per_kpc,
    band_flux_table,
    get_cosmology,
    load_filter,
    luminosity_distance_cm,
    mag_to_nmgy,
    nmgy_to_mag,
    observed_f_lambda,
)
from sim2obs.forward_models.surveys import available_surveys, get_survey

C_ANGSTROM_S = 2.99792458e18  # speed of light in Å/s (exact SI definition)
AB_ZERO_CGS = 3631e-23  # erg/s/cm^2/Hz (Oke & Gunn 1983)


def flat_fnu(wave, nmgy):
    return nmgy * 1e-9 * AB_ZERO_CGS * C_ANGSTROM_S / wave**2


def all_filters():
    return sorted({b.filter for s in available_surveys() for b in get_survey(s).bands})


def test_flat_fnu_has_equal_ab_magnitude_in_every_band():
    wave = np.geomspace(900, 40000, 40000)
    maggies = ab_maggies(wave, flat_fnu(wave, 3.0), all_filters())
    np.testing.assert_allclose(maggies * 1e9, 3.0, rtol=2e-3)


def test_nmgy_mag_round_trip():
    assert float(nmgy_to_mag(1.0)) == pytest.approx(22.5)
    assert float(mag_to_nmgy(20.0)) == pytest.approx(10.0)
    assert np.isnan(nmgy_to_mag(-1.0))


def test_flux_scales_with_distance_and_one_plus_z():
    """Flat L_nu: f_nu,obs = (1+z) L_nu / (4 pi D_L^2), so the band flux ratio between two
    redshifts is (1+z2)/(1+z1) (D_L1/D_L2)^2 exactly (no k-correction for a flat f_nu)."""
    wave = np.geomspace(500, 30000, 30000)
    l_nu = 1e28  # erg/s/Hz, any value
    l_lambda_lsun = l_nu * C_ANGSTROM_S / wave**2 / 3.828e33
    fluxes = []
    for z in (0.05, 0.3):
        w, f = observed_f_lambda(wave, l_lambda_lsun, z)
        fluxes.append(ab_maggies(w, f, ["hsc2017-r", "hsc2017-i"]))
    d1, d2 = luminosity_distance_cm(0.05), luminosity_distance_cm(0.3)
    expected = (1.3 / 1.05) * (d1 / d2) ** 2
    np.testing.assert_allclose(fluxes[1] / fluxes[0], expected, rtol=1e-3)
    # and the absolute level: f_nu = (1+z) L_nu / (4 pi D_L^2)
    f_nu = 1.05 * l_nu / (4 * math.pi * d1**2)
    np.testing.assert_allclose(fluxes[0], f_nu / AB_ZERO_CGS, rtol=2e-3)


def test_cosmologies_and_distances():
    planck15 = get_cosmology("Planck15")
    assert planck15.H0.value == pytest.approx(67.74)
    assert get_cosmology("Planck13").H0.value == pytest.approx(67.77)
    d = luminosity_distance_cm(0.1) / MPC_CM
    assert d == pytest.approx(planck15.luminosity_distance(0.1).value)
    # D_A = D_L / (1+z)^2 (Etherington); 1 kpc at D_A subtends 206.265/D_A[kpc] arcsec
    d_a_kpc = d * 1e3 / 1.1**2
    assert arcsec_per_kpc(0.1) == pytest.approx(206264.806 / d_a_kpc, rel=1e-6)
    with pytest.raises(Sim2ObsValueError, match="redshift"):
        luminosity_distance_cm(0.0)
    with pytest.raises(Sim2ObsKeyError):
        get_cosmology("EdS")


def test_table_matches_direct_integration():
    """Interpolating precomputed band fluxes equals integrating the interpolated spectrum."""
    filters = ("hsc2017-g", "hsc2017-i")
    table = band_flux_table(filters, 0.2)
    lib = table.library
    age, z, mass = np.array([3.3]), np.array([0.011]), np.array([2e6])
    via_table = table.flux_nmgy(age, z, mass)[0]
    w, f = observed_f_lambda(lib.wavelength_angstrom, lib.spectrum(age, z, mass)[0], 0.2)
    direct = ab_maggies(w, f, list(filters)) * 1e9
    np.testing.assert_allclose(via_table, direct, rtol=1e-6)


def test_galsim_bandpass_filter_loads():
    f = load_filter("galsim:ACS_wfc_F814W")
    assert 7000 < f.effective_wavelength.to_value("Angstrom") < 8500


def test_unknown_filter_error_lists_groups():
    with pytest.raises(Sim2ObsKeyError, match="speclite"):
        load_filter("nosuch-q")
