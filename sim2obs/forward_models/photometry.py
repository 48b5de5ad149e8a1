"""Photometry: cosmology, redshifting, bandpass integration, nanomaggies.

* Cosmology: the simulation's own (IllustrisTNG: Planck 2015, Planck Collaboration 2016,
  A&A 594, A13 = ``astropy.cosmology.Planck15``; EAGLE: Planck 2013, Planck Collaboration 2014,
  A&A 571, A16 = ``Planck13``), so distances match the simulation's geometry.
* Redshifting: a source of rest-frame luminosity density L_lambda at redshift z is observed with
  f_lambda(lambda_obs = (1+z) lambda) = L_lambda(lambda) / (4 pi D_L^2 (1+z))
  (e.g. Hogg 1999, astro-ph/9905116, eq. 22 rearranged for f_lambda).
* Band integration: ``speclite`` (AB maggies of a photon-counting detector); GalSim's shipped HST
  throughput tables are wrapped as speclite filters where speclite has none.
* Fluxes are in nanomaggies: f[nmgy] = 1e9 maggies = 10^(-0.4 (m_AB - 22.5)).

For rendering, :class:`BandFluxTable` precomputes the flux per Msun of initial mass for every SSP
of the grid, per band, at one redshift: a particle then costs one bilinear interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError
from sim2obs.forward_models.stellar_pops import L_SUN_ERG_S, Dust, SSPLibrary, get_library

#: 1 Mpc and 10 pc in cm (IAU 2012 Resolution B2 astronomical unit; astropy.constants.pc).
MPC_CM = 3.0856775814913673e24
TEN_PC_CM = 3.0856775814913673e19

#: Redshift used when a z = 0 snapshot is rendered without ``--redshift`` (DESIGN.md).
DEFAULT_Z_FOR_Z0 = 0.1

_COSMOLOGIES = ("Planck15", "Planck13", "Planck18", "WMAP9")


def get_cosmology(name: str):
    """An astropy cosmology by name ('Planck15' for TNG, 'Planck13' for EAGLE)."""
    import astropy.cosmology as ac

    if name not in _COSMOLOGIES:
        raise Sim2ObsKeyError(f"unknown cosmology '{name}'; use one of {list(_COSMOLOGIES)}")
    return getattr(ac, name)


def luminosity_distance_cm(redshift: float, cosmology: str = "Planck15") -> float:
    """Luminosity distance in cm; z must be > 0 (a z = 0 source has no finite flux)."""
    if not redshift > 0:
        raise Sim2ObsValueError(
            f"redshift must be > 0 to place a galaxy on the sky (got {redshift}); "
            f"use e.g. --redshift {DEFAULT_Z_FOR_Z0}"
        )
    return float(get_cosmology(cosmology).luminosity_distance(redshift).to_value("Mpc")) * MPC_CM


def arcsec_per_kpc(redshift: float, cosmology: str = "Planck15") -> float:
    """Angular scale (proper kpc -> arcsec) from the angular-diameter distance."""
    if not redshift > 0:
        raise Sim2ObsValueError(f"redshift must be > 0 for an angular scale (got {redshift})")
    d_a_kpc = float(get_cosmology(cosmology).angular_diameter_distance(redshift).to_value("kpc"))
    return 206264.80624709636 / d_a_kpc


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def load_filter(name: str):
    """A speclite ``FilterResponse`` by name.

    ``'hsc2017-g'`` etc. are speclite's own curves; ``'galsim:ACS_wfc_F814W'`` wraps the
    throughput table shipped in ``galsim/share/bandpasses`` (wavelengths in nm there).
    """
    import speclite.filters as sf

    if name.startswith("galsim:"):
        import astropy.units as u
        import galsim

        stem = name.split(":", 1)[1]
        path = Path(galsim.meta_data.share_dir) / "bandpasses" / f"{stem}.dat"
        if not path.is_file():
            raise Sim2ObsKeyError(f"GalSim ships no bandpass '{stem}' (looked for {path})")
        table = np.loadtxt(path)
        wave_a = table[:, 0] * 10.0
        resp = np.clip(table[:, 1], 0, None)
        # speclite needs zero response at both ends
        resp[0] = resp[-1] = 0.0
        group, band = "galsim", stem.replace("-", "_")
        try:
            return sf.load_filter(f"{group}-{band}")
        except (ValueError, OSError, KeyError):
            return sf.FilterResponse(
                wavelength=wave_a * u.Angstrom, response=resp,
                meta=dict(group_name=group, band_name=band),
            )
    try:
        return sf.load_filter(name)
    except (ValueError, OSError) as exc:
        raise Sim2ObsKeyError(
            f"unknown filter '{name}': not a speclite filter (groups: "
            f"{sorted(sf.filter_group_names)}) nor 'galsim:<bandpass file>'"
        ) from exc


def ab_maggies(wavelength_angstrom: np.ndarray, f_lambda_cgs: np.ndarray, filters: list[str]) -> np.ndarray:
    """AB maggies of spectra ``f_lambda_cgs[..., nWave]`` (erg/s/cm^2/Å) in each filter.

    Returns an array of shape ``f_lambda_cgs.shape[:-1] + (len(filters),)``. Spectra are padded
    with zeros where they do not cover a filter (speclite's ``pad_spectrum``).
    """
    import astropy.units as u

    wave = np.asarray(wavelength_angstrom, dtype=np.float64)
    flux = np.asarray(f_lambda_cgs, dtype=np.float64)
    out = np.empty(flux.shape[:-1] + (len(filters),))
    unit = u.erg / (u.s * u.cm**2 * u.Angstrom)
    for j, name in enumerate(filters):
        filt = load_filter(name)
        lo, hi = filt.wavelength[0], filt.wavelength[-1]
        if wave[0] > lo or wave[-1] < hi:
            spec, w = filt.pad_spectrum(flux, wave, method="zero")
        else:
            spec, w = flux, wave
        out[..., j] = filt.get_ab_maggies(spec * unit, w * u.Angstrom)
    return out


def observed_f_lambda(
    wavelength_angstrom: np.ndarray, l_lambda_lsun_per_a: np.ndarray, redshift: float,
    cosmology: str = "Planck15",
) -> tuple[np.ndarray, np.ndarray]:
    """Observed-frame wavelength (Å) and f_lambda (erg/s/cm^2/Å) of rest-frame L_lambda."""
    d_l = luminosity_distance_cm(redshift, cosmology)
    f = np.asarray(l_lambda_lsun_per_a) * L_SUN_ERG_S / (4 * math.pi * d_l**2 * (1 + redshift))
    return np.asarray(wavelength_angstrom) * (1 + redshift), f


def nmgy_to_mag(flux_nmgy):
    """AB magnitude of a flux in nanomaggies (NaN for non-positive flux)."""
    f = np.asarray(flux_nmgy, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, 22.5 - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


def mag_to_nmgy(mag):
    """Flux in nanomaggies of an AB magnitude."""
    return 10 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - 22.5))


# --------------------------------------------------------------------------------------------
# Precomputed (Z, age) -> band flux tables
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BandFluxTable:
    """Flux per Msun of initial mass of every grid SSP in each band, at one redshift.

    ``flux_nmgy_per_msun[iZ, iAge, iBand]`` (observed frame, nanomaggies); for ``redshift =
    None`` the table holds absolute-magnitude fluxes, i.e. the flux at 10 pc in the rest frame.
    """

    library: SSPLibrary
    filters: tuple[str, ...]
    redshift: float | None
    cosmology: str
    flux_nmgy_per_msun: np.ndarray

    def flux_nmgy(self, age_gyr, metallicity, initial_mass_msun) -> np.ndarray:
        """Per-particle band fluxes (N, nBand) in nanomaggies."""
        mass = np.asarray(initial_mass_msun, dtype=np.float64)
        return self.library.interpolate(self.flux_nmgy_per_msun, age_gyr, metallicity) * mass[:, None]


NO_DUST = Dust()


@lru_cache(maxsize=32)
def band_flux_table(
    filters: tuple[str, ...], redshift: float | None, cosmology: str = "Planck15",
    library: str = "popstar", dust: Dust = NO_DUST,
) -> BandFluxTable:
    """Build (and cache per process) the flux table for these filters at this redshift.

    ``redshift=None`` gives absolute magnitudes (rest frame, 10 pc), as in TNG's
    ``GFM_StellarPhotometrics``.
    """
    lib = dust.apply(get_library(library))
    wave = lib.wavelength_angstrom
    if redshift is None:
        f = lib.l_lambda * L_SUN_ERG_S / (4 * math.pi * TEN_PC_CM**2)
        w = wave
    else:
        w, f = observed_f_lambda(wave, lib.l_lambda, float(redshift), cosmology)
    maggies = ab_maggies(w, f, list(filters))
    table = np.ascontiguousarray(maggies * 1e9)
    table.setflags(write=False)
    return BandFluxTable(library=lib, filters=tuple(filters), redshift=redshift,
                         cosmology=cosmology, flux_nmgy_per_msun=table)


def absolute_magnitudes(
    filters: tuple[str, ...], age_gyr, metallicity, initial_mass_msun, library: str = "popstar",
) -> np.ndarray:
    """Rest-frame absolute AB magnitudes of star particles (N, nBand)."""
    table = band_flux_table(tuple(filters), None, "Planck15", library)
    return nmgy_to_mag(table.flux_nmgy(np.atleast_1d(age_gyr), np.atleast_1d(metallicity),
                                       np.atleast_1d(initial_mass_msun)))
