"""The container every simulation reader yields: star particles plus truth labels.

Units are in the field names: positions in physical kpc relative to the galaxy centre, initial
masses in Msun, ages in Gyr at the snapshot, metallicity as a mass fraction (Z, not Z/Z_sun).
Containers validate in ``__post_init__`` so that bad simulation data fails where it is read,
with the source named, not three stages later inside GalSim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sim2obs.errors import Sim2ObsDataError

#: Solar metallicity used for ``log_zstar`` labels (Asplund et al. 2009, ARA&A 47, 481: Z_sun =
#: 0.0134 bulk; 0.0127 is the value adopted by IllustrisTNG, Pillepich et al. 2018, MNRAS 473, 4077).
Z_SUN = 0.0127

#: Window over which star-formation rates are averaged from star-particle ages (Myr). 100 Myr is
#: the standard UV/SED-like tracer window (Donnari et al. 2019, MNRAS 485, 4817, sec. 2.3).
SFR_WINDOW_MYR = 100.0

#: Floor on the specific SFR for galaxies with no star formation in the window (1/yr). Galaxies
#: below it are "resolution-limited quiescent"; Donnari et al. (2019) place zero-SFR TNG galaxies
#: at log sSFR ~ -12 to -13 with a random scatter; we use a fixed floor so labels are reproducible.
LOG_SSFR_FLOOR = -13.0

LABEL_UNITS: dict[str, str] = {
    "log_mstar": "log10(Msun)",
    "log_sfr": "log10(Msun/yr)",
    "log_ssfr": "log10(1/yr)",
    "log_zstar": "log10(Z/Z_sun), Z_sun=0.0127",
    "age_gyr": "Gyr",
    "redshift": "",
    "r_half_kpc": "kpc",
}
"""Truth labels every reader provides (DESIGN.md), with the unit string stored in shards."""


def _as_array(name: str, value, source: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise Sim2ObsDataError(f"{source}: field '{name}' must be {ndim}-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise Sim2ObsDataError(
            f"{source}: field '{name}' has {bad} NaN/inf values; clean or drop those particles"
        )
    return arr


@dataclass(frozen=True)
class StarParticles:
    """Star particles of one galaxy (arrays are read-only once validated).

    Attributes
    ----------
    position_kpc : (N, 3) physical kpc relative to the galaxy centre
    initial_mass_msun : (N,) initial (birth) stellar mass in Msun, > 0
    age_gyr : (N,) age at the snapshot in Gyr, >= 0
    metallicity : (N,) metal mass fraction Z, >= 0
    smoothing_length_kpc : (N,) physical kpc, or None to use k-th neighbour smoothing
    current_mass_msun : (N,) present mass after stellar mass loss (Msun), or None
    source : where the particles came from, used in error messages
    """

    position_kpc: np.ndarray
    initial_mass_msun: np.ndarray
    age_gyr: np.ndarray
    metallicity: np.ndarray
    smoothing_length_kpc: np.ndarray | None = None
    current_mass_msun: np.ndarray | None = None
    source: str = "star particles"

    def __post_init__(self) -> None:
        src = self.source
        pos = _as_array("position_kpc", self.position_kpc, src, 2)
        if pos.shape[1] != 3:
            raise Sim2ObsDataError(f"{src}: 'position_kpc' must have shape (N, 3), got {pos.shape}")
        n = pos.shape[0]
        if n == 0:
            raise Sim2ObsDataError(f"{src}: galaxy has no star particles")
        arrays = {"position_kpc": pos}
        for name in ("initial_mass_msun", "age_gyr", "metallicity"):
            arr = _as_array(name, getattr(self, name), src, 1)
            if arr.shape[0] != n:
                raise Sim2ObsDataError(
                    f"{src}: field '{name}' has {arr.shape[0]} entries for {n} particles"
                )
            arrays[name] = arr
        for name in ("smoothing_length_kpc", "current_mass_msun"):
            value = getattr(self, name)
            if value is not None:
                arr = _as_array(name, value, src, 1)
                if arr.shape[0] != n:
                    raise Sim2ObsDataError(
                        f"{src}: field '{name}' has {arr.shape[0]} entries for {n} particles"
                    )
                arrays[name] = arr
        if np.any(arrays["initial_mass_msun"] <= 0):
            bad = int(np.count_nonzero(arrays["initial_mass_msun"] <= 0))
            raise Sim2ObsDataError(
                f"{src}: field 'initial_mass_msun' has {bad} zero or negative masses; stellar "
                "masses must be positive (wind particles must be dropped before building a Galaxy)"
            )
        if np.any(arrays["age_gyr"] < 0):
            raise Sim2ObsDataError(f"{src}: field 'age_gyr' has negative ages")
        if np.any(arrays["metallicity"] < 0):
            raise Sim2ObsDataError(f"{src}: field 'metallicity' has negative values")
        if "current_mass_msun" in arrays and np.any(arrays["current_mass_msun"] <= 0):
            raise Sim2ObsDataError(f"{src}: field 'current_mass_msun' has zero or negative masses")
        if "smoothing_length_kpc" in arrays and np.any(arrays["smoothing_length_kpc"] <= 0):
            raise Sim2ObsDataError(f"{src}: field 'smoothing_length_kpc' must be positive")
        for name, arr in arrays.items():
            arr = np.array(arr, copy=True)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def n(self) -> int:
        """Number of particles."""
        return int(self.position_kpc.shape[0])

    @property
    def mass_msun(self) -> np.ndarray:
        """Present-day mass if known, else initial mass."""
        return self.current_mass_msun if self.current_mass_msun is not None else self.initial_mass_msun


@dataclass(frozen=True)
class Galaxy:
    """One simulated galaxy ready for the forward model.

    Attributes
    ----------
    object_id : id in the source simulation (SubhaloID / GalaxyID)
    stars : its star particles
    redshift : redshift of the snapshot it was read from
    labels : truth labels (see :data:`LABEL_UNITS`); NaN where unknown
    source : simulation name ('mini', 'TNG100-1', 'EAGLE RefL0100N1504', ...)
    cosmology : name of the astropy cosmology the simulation used ('Planck15', 'Planck13')
    """

    object_id: int
    stars: StarParticles
    redshift: float
    labels: dict[str, float] = field(default_factory=dict)
    source: str = "unknown"
    cosmology: str = "Planck15"

    def __post_init__(self) -> None:
        if not isinstance(self.stars, StarParticles):
            raise Sim2ObsDataError(f"{self.source}: Galaxy.stars must be StarParticles")
        if not (math.isfinite(self.redshift) and self.redshift >= 0):
            raise Sim2ObsDataError(
                f"{self.source}: subhalo {self.object_id} has invalid redshift {self.redshift}"
            )
        labels = dict(self.labels)
        for key, value in labels.items():
            labels[key] = float(value)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "object_id", int(self.object_id))


def truth_labels(
    stars: StarParticles,
    redshift: float,
    sfr_msun_per_yr: float | None = None,
) -> dict[str, float]:
    """Compute the DESIGN.md truth labels from star particles.

    ``log_mstar`` uses present masses (initial if unknown); ``log_sfr`` is the catalogue SFR when
    given, else the mass formed in the last :data:`SFR_WINDOW_MYR` Myr divided by that window.
    Galaxies below the sSFR floor get ``log_ssfr = LOG_SSFR_FLOOR`` (and the matching SFR).
    ``log_zstar`` and ``age_gyr`` are weighted by present mass; ``r_half_kpc`` is the 3-D radius
    enclosing half the present stellar mass.
    """
    mass = stars.mass_msun
    mstar = float(mass.sum())
    if sfr_msun_per_yr is None:
        young = stars.age_gyr < SFR_WINDOW_MYR * 1e-3
        sfr = float(stars.initial_mass_msun[young].sum()) / (SFR_WINDOW_MYR * 1e6)
    else:
        sfr = float(sfr_msun_per_yr)
    log_ssfr = math.log10(sfr / mstar) if sfr > 0 else -math.inf
    log_ssfr = max(log_ssfr, LOG_SSFR_FLOOR)
    z_mw = float(np.sum(mass * stars.metallicity) / mstar)
    r = np.sqrt(np.sum(stars.position_kpc**2, axis=1))
    order = np.argsort(r)
    cum = np.cumsum(mass[order])
    r_half = float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])
    return {
        "log_mstar": math.log10(mstar),
        "log_sfr": log_ssfr + math.log10(mstar),
        "log_ssfr": log_ssfr,
        "log_zstar": math.log10(max(z_mw, 1e-12) / Z_SUN),
        "age_gyr": float(np.sum(mass * stars.age_gyr) / mstar),
        "redshift": float(redshift),
        "r_half_kpc": r_half,
    }
