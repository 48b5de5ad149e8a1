"""The built-in mini-universe: a mock galaxy population written in IllustrisTNG's on-disk layout.

:func:`draw_population` draws a catalogue of galaxies from published scaling relations;
:func:`build_mini_universe` turns each into star particles (exponential disc with two
logarithmic spiral arms and star-forming clumps, Hernquist bulge, radial age and metallicity
gradients, a star-formation history sampled for the particle ages) and writes them exactly as a
TNG snapshot is laid out::

    OUT/output/groups_SSS/fof_subhalo_tab_SSS.{i}.hdf5     Group + Subhalo catalogue, chunked
    OUT/output/snapdir_SSS/snap_SSS.{i}.hdf5               PartType4 particles, chunked
    OUT/postprocessing/offsets/offsets_SSS.hdf5            chunk and subhalo offsets
    OUT/mini_universe.json                                 parameters and format version

so that ``illustris_python`` and :class:`~sim2obs.forward_models.simulations.tng.TNGSource`
read it like a real run (units as in TNG: ckpc/h, 1e10 Msun/h, formation scale factors, wind
particles with ``GFM_StellarFormationTime <= 0`` mixed into PartType4). Unlike TNG, particle
datasets are gzip-compressed (level 1, shuffle), which h5py and illustris_python read
transparently. The default 500-galaxy universe has ~5.4 million particles, takes about a minute
to build on two cores and ~320 MB on disk.

Relations (each function below cites its source):

* stellar mass function: double Schechter of Baldry et al. (2012) for 9 <= log M* <= 11.5;
* quenched fraction: Peng et al. (2010), mass term;
* star-forming main sequence: Speagle et al. (2014) eq. 28 at the snapshot's cosmic time,
  0.2 dex scatter; quenched galaxies at sSFR ~ 1e-12 /yr;
* size--mass: van der Wel et al. (2014) for late and early types, with their scatter;
* stellar mass--metallicity: Gallazzi et al. (2005) table 2 percentiles;
* bulge-to-total ratio rising with mass and higher when quenched (trends of Bluck et al. 2014).

The mini-universe is a test and demo universe, not a simulation: it has no dark matter, gas or
environment, and its galaxies do not interact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from sim2obs.errors import Sim2ObsValueError
from sim2obs.forward_models.simulations.base import (
    redshift_time_gyr,
    scale_factor_at_time,
)

#: Bumped whenever the written files change for the same parameters (cache key).
MINI_VERSION = 1

#: Columns of ``GFM_StellarPhotometrics`` / ``SubhaloStellarPhotometrics`` as in TNG (U, B, V,
#: K, g, r, i, z; Nelson et al. 2019, data specifications), as speclite filter names.
PHOTOMETRY_FILTERS = (
    "bessell-U", "bessell-B", "bessell-V", "twomass-Ks",
    "sdss2010noatm-g", "sdss2010noatm-r", "sdss2010noatm-i", "sdss2010noatm-z",
)

#: TNG's value for photometry of wind-phase cells in PartType4 (no light).
WIND_MAGNITUDE = 1e30

#: Cosmology written into the headers: TNG's Planck 2015 parameters (Nelson et al. 2019,
#: table 1 note; Planck Collaboration 2016, A&A 594, A13), matching astropy's ``Planck15``.
HUBBLE_PARAM = 0.6774
OMEGA_MATTER = 0.3089
OMEGA_LAMBDA = 0.6911
OMEGA_BARYON = 0.0486
COSMOLOGY = "Planck15"

#: Box side (ckpc/h): 50 Mpc/h, about half of TNG100's 75 Mpc/h.
BOX_SIZE_CKPC_H = 50_000.0

#: Star-particle (initial) mass floor: the TNG100 baryonic mass resolution, 1.4e6 Msun
#: (Nelson et al. 2019, table 1), and the particle-count cap that raises it for massive galaxies.
PARTICLE_MASS_MSUN = 1.4e6
MAX_PARTICLES = 20_000

#: Stellar mass range drawn (log10 Msun).
LOG_MSTAR_MIN, LOG_MSTAR_MAX = 9.0, 11.5

#: Smoothing: distance to the 32nd nearest star particle, as ``StellarHsml`` in TNG.
N_NEIGHBOURS = 32

#: Window over which the SFR label is the mass formed (Myr), as in galaxy.SFR_WINDOW_MYR.
SFR_WINDOW_GYR = 0.1

_MINI_JSON = "mini_universe.json"


# ============================================================================================
# Scaling relations
# ============================================================================================

def baldry12_smf(log_mstar) -> np.ndarray:
    """Stellar mass function per dex (Mpc^-3 dex^-1), double Schechter.

    Baldry et al. 2012, MNRAS 421, 621, eq. 6 with table 1 (GAMA, z < 0.06, h = 0.7,
    Chabrier IMF): log M* = 10.66, phi1* = 3.96e-3, alpha1 = -0.35, phi2* = 0.79e-3,
    alpha2 = -1.47. Per dex: phi(log M) = ln(10) x e^-x [phi1 x^a1 + phi2 x^a2], x = M/M*.
    """
    x = 10.0 ** (np.asarray(log_mstar, dtype=np.float64) - 10.66)
    return math.log(10.0) * x * np.exp(-x) * (3.96e-3 * x**-0.35 + 0.79e-3 * x**-1.47)


def peng10_quenched_fraction(log_mstar) -> np.ndarray:
    """Fraction of quenched galaxies at stellar mass M* (mass quenching only).

    Peng et al. 2010, ApJ 721, 193, sec. 4: their fit to the SDSS red fraction,
    f_red = 1 - exp(-(rho/p1)^p3 - (M*/p2)^p4) with p2 = 10^10.56 Msun and p4 = 0.80, taken in
    the low-density limit (the environment term dropped: the mini-universe has no environment).
    """
    m = 10.0 ** (np.asarray(log_mstar, dtype=np.float64) - 10.56)
    return 1.0 - np.exp(-(m**0.80))


def speagle14_log_sfr(log_mstar, t_gyr: float) -> np.ndarray:
    """Star-forming main sequence, log10 SFR (Msun/yr), at cosmic time ``t_gyr``.

    Speagle et al. 2014, ApJS 214, 15, eq. 28 (best fit, Kroupa IMF, mixed methods):
    log SFR = (0.84 - 0.026 t) log M* - (6.51 - 0.11 t). Their intrinsic scatter is ~0.2 dex
    (sec. 5), which :func:`draw_population` adds.
    """
    lm = np.asarray(log_mstar, dtype=np.float64)
    return (0.84 - 0.026 * t_gyr) * lm - (6.51 - 0.11 * t_gyr)


#: Main-sequence scatter (dex), Speagle et al. (2014) sec. 5.
MS_SCATTER_DEX = 0.2
#: Quenched galaxies: log sSFR ~ N(-12, 0.3) per yr (below the -11 threshold of e.g. Peng et al.
#: 2010 and the TNG quenched population at log sSFR <~ -12, Donnari et al. 2019, MNRAS 485, 4817).
QUENCHED_LOG_SSFR, QUENCHED_LOG_SSFR_SCATTER = -12.0, 0.3


#: van der Wel et al. 2014, ApJ 788, 28, table 1, z = 0.25 bin: R_eff/kpc = A (M*/5e10)^alpha
#: with log-normal scatter sigma (dex); early types (quiescent by UVJ colour) and late types.
#: Redshift evolution at fixed mass R_eff ~ (1+z)^beta with beta = -1.48 (early), -0.75 (late)
#: (their sec. 4, fig. 6). ``R_eff`` is the semi-major-axis half-light radius.
VDW14 = {
    "early": {"log_a": 0.60, "alpha": 0.75, "sigma": 0.10, "beta": -1.48},
    "late": {"log_a": 0.86, "alpha": 0.25, "sigma": 0.16, "beta": -0.75},
}


#: van der Wel et al. (2014) fit the early-type relation above M* = 2e10 Msun only; below it
#: the relation of quiescent galaxies flattens (their sec. 3 and fig. 5). Extrapolating the
#: 0.75 slope would give 0.1 kpc quiescent dwarfs, so below this mass early types continue
#: with the late-type slope.
VDW14_EARLY_BREAK_LOG_MSTAR = math.log10(2e10)


def vdw14_log_re(log_mstar, quenched, redshift: float) -> np.ndarray:
    """Median log10 effective radius (kpc) of early (``quenched``) and late types.

    The z = 0.25 row of van der Wel et al. (2014) table 1, scaled with (1+z)^beta for z > 0.25;
    below z = 0.25 (outside their data) the z = 0.25 relation is used unchanged. Early types
    below 2e10 Msun follow the late-type slope (:data:`VDW14_EARLY_BREAK_LOG_MSTAR`).
    """
    lm = np.asarray(log_mstar, dtype=np.float64)
    q = np.broadcast_to(np.asarray(quenched, dtype=bool), lm.shape)
    out = np.empty_like(lm)
    zfac = math.log10((1.0 + max(redshift, 0.25)) / 1.25)
    pivot = math.log10(5e10)
    late, early = VDW14["late"], VDW14["early"]
    out[~q] = late["log_a"] + late["beta"] * zfac + late["alpha"] * (lm[~q] - pivot)
    x = lm[q]
    brk = VDW14_EARLY_BREAK_LOG_MSTAR
    slope = np.where(x >= brk, early["alpha"], late["alpha"])
    out[q] = (early["log_a"] + early["beta"] * zfac + early["alpha"] * (brk - pivot)
              + slope * (x - brk))
    return out


#: Gallazzi et al. 2005, MNRAS 362, 41, table 2: stellar metallicity log10(Z/Z_sun) percentiles
#: (16th, 50th, 84th) in bins of log M*; Z_sun = 0.02 (Bruzual & Charlot 2003 models).
GALLAZZI05_LOG_MSTAR = np.array([8.91, 9.11, 9.31, 9.51, 9.72, 9.91, 10.11, 10.31, 10.51,
                                 10.72, 10.91, 11.11, 11.31, 11.51, 11.72, 11.91])
GALLAZZI05_P50 = np.array([-0.60, -0.61, -0.65, -0.61, -0.52, -0.41, -0.23, -0.11, -0.01,
                           0.04, 0.07, 0.10, 0.12, 0.13, 0.14, 0.15])
GALLAZZI05_P16 = np.array([-1.11, -1.07, -1.10, -1.03, -0.97, -0.90, -0.80, -0.65, -0.41,
                           -0.24, -0.14, -0.09, -0.06, -0.04, -0.03, -0.03])
GALLAZZI05_P84 = np.array([-0.00, -0.00, -0.05, -0.01, 0.05, 0.09, 0.14, 0.17, 0.20,
                           0.22, 0.24, 0.25, 0.26, 0.28, 0.29, 0.30])
GALLAZZI05_Z_SUN = 0.02


def gallazzi05_log_z(log_mstar):
    """(p16, p50, p84) of log10(Z/0.02) at ``log_mstar`` (linear interpolation of table 2)."""
    lm = np.asarray(log_mstar, dtype=np.float64)
    return tuple(np.interp(lm, GALLAZZI05_LOG_MSTAR, p)
                 for p in (GALLAZZI05_P16, GALLAZZI05_P50, GALLAZZI05_P84))


def mean_bulge_fraction(log_mstar, quenched) -> np.ndarray:
    """Mean bulge-to-total mass ratio.

    Bluck et al. 2014, MNRAS 441, 599 (SDSS bulge+disc decompositions): B/T rises with stellar
    mass, and quenched galaxies are bulge-dominated while star-forming ones are disc-dominated.
    The numbers here (star-forming 0.05 -> 0.30, quenched 0.40 -> 0.75 across 9 <= log M* <=
    11.5) are a smooth hand-set approximation of those trends, not a fit to their data.
    """
    x = np.clip((np.asarray(log_mstar, dtype=np.float64) - 9.0) / 2.5, 0.0, 1.0)
    return np.where(np.asarray(quenched, dtype=bool), 0.40 + 0.35 * x, 0.05 + 0.25 * x)


#: Scatter of B/T: Beta distribution with concentration kappa = a + b.
BT_CONCENTRATION = 8.0

#: Radial stellar-population gradients in discs: of order -0.1 dex per half-light radius in both
#: [Z] and log age within ~2 R_e (CALIFA: Sanchez-Blazquez et al. 2014, A&A 570, A6; Gonzalez
#: Delgado et al. 2015, A&A 581, A103). The metallicity gradient is imposed directly; the age
#: gradient arises from rank-correlating disc radii with ages (inside-out growth), correlation
#: below, and from the older bulge.
METALLICITY_GRADIENT_DEX_PER_RE = -0.1
AGE_RADIUS_RANK_CORRELATION = 0.3
BULGE_AGE_RANK_CORRELATION = 0.7


def moster13_mstar_over_mhalo(log_mhalo, redshift: float) -> np.ndarray:
    """Stellar-to-halo mass ratio of Moster, Naab & White 2013, MNRAS 428, 3121, eqs. 2, 11-14
    and table 1: m/M = 2N [(M/M1)^-beta + (M/M1)^gamma]^-1 (halo mass M200c)."""
    nu = redshift / (1.0 + redshift)
    log_m1 = 11.590 + 1.195 * nu
    n = 0.0351 - 0.0247 * nu
    beta = 1.376 - 0.826 * nu
    gamma = 0.608 + 0.329 * nu
    x = 10.0 ** (np.asarray(log_mhalo, dtype=np.float64) - log_m1)
    return 2.0 * n / (x**-beta + x**gamma)


def halo_mass_from_stellar(log_mstar, redshift: float) -> np.ndarray:
    """log10 M200c (Msun) whose Moster et al. (2013) mean stellar mass is ``log_mstar``."""
    grid = np.linspace(10.0, 15.5, 2000)
    lms = grid + np.log10(moster13_mstar_over_mhalo(grid, redshift))
    return np.interp(np.asarray(log_mstar, dtype=np.float64), lms, grid)


# ============================================================================================
# The population (catalogue only)
# ============================================================================================

@dataclass(frozen=True)
class Population:
    """Catalogue of a mini-universe: the intended properties of each galaxy (arrays of length n).

    ``log_mstar``: present stellar mass (log10 Msun); ``quenched``; ``log_sfr``: intended SFR
    (log10 Msun/yr; the particles realise it in units of one particle per 100 Myr);
    ``r_e_kpc``: projected half-mass radius; ``bulge_fraction``: B/T by mass; ``metallicity``:
    mass-weighted Z (mass fraction); ``tau_gyr``: delayed-tau SFH timescale;
    ``t_quench_gyr``: cosmic time SF stopped (NaN if star forming); ``redshift``, ``t_snap_gyr``.
    """

    log_mstar: np.ndarray
    quenched: np.ndarray
    log_sfr: np.ndarray
    r_e_kpc: np.ndarray
    bulge_fraction: np.ndarray
    metallicity: np.ndarray
    tau_gyr: np.ndarray
    t_quench_gyr: np.ndarray
    redshift: float
    t_snap_gyr: float

    @property
    def n(self) -> int:
        return int(self.log_mstar.size)


def _t_start_gyr() -> float:
    """Cosmic time at which the SFHs start: z = 10 (first galaxies)."""
    return redshift_time_gyr(10.0, COSMOLOGY)


def _delayed_tau_ssfr(tau, age_span):
    """sSFR (1/Gyr) today of SFR ~ t exp(-t/tau) running for ``age_span`` Gyr (mass formed)."""
    x = age_span / tau
    return age_span * np.exp(-x) / (tau**2 * (1.0 - (1.0 + x) * np.exp(-x)))


def draw_population(n: int, seed: int = 0, redshift: float = 0.0) -> Population:
    """Draw ``n`` galaxies from the scaling relations (no particles; fast, deterministic)."""
    if not isinstance(n, int | np.integer) or n < 1:
        raise Sim2ObsValueError(f"n must be an integer >= 1, got {n!r}")
    _check_redshift(redshift)
    rng = np.random.default_rng([int(seed), 0])
    t_snap = redshift_time_gyr(redshift, COSMOLOGY)
    t_start = _t_start_gyr()
    span = t_snap - t_start

    # Stellar masses: inverse CDF of the Baldry et al. (2012) mass function.
    grid = np.linspace(LOG_MSTAR_MIN, LOG_MSTAR_MAX, 4001)
    pdf = baldry12_smf(grid)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    log_m = np.interp(rng.random(n), cdf / cdf[-1], grid)

    quenched = rng.random(n) < peng10_quenched_fraction(log_m)
    log_sfr = np.where(
        quenched,
        log_m + QUENCHED_LOG_SSFR + QUENCHED_LOG_SSFR_SCATTER * rng.standard_normal(n),
        speagle14_log_sfr(log_m, t_snap) + MS_SCATTER_DEX * rng.standard_normal(n),
    )
    sigma = np.where(quenched, VDW14["early"]["sigma"], VDW14["late"]["sigma"])
    log_re = vdw14_log_re(log_m, quenched, redshift) + sigma * rng.standard_normal(n)

    mu = mean_bulge_fraction(log_m, quenched)
    bt = rng.beta(mu * BT_CONCENTRATION, (1.0 - mu) * BT_CONCENTRATION)

    # Split-normal draw reproducing Gallazzi et al.'s 16th/50th/84th percentiles.
    p16, p50, p84 = gallazzi05_log_z(log_m)
    g = rng.standard_normal(n)
    log_z = p50 + np.where(g < 0, g * (p50 - p16), g * (p84 - p50))
    metallicity = np.clip(GALLAZZI05_Z_SUN * 10.0**log_z, 2e-4, 0.04)

    # SFH: delayed tau, SFR ~ t e^{-t/tau} (t since z = 10). Star-forming galaxies: the tau whose
    # present sSFR (per unit mass formed, ~ M*/0.6 after mass loss) matches the drawn SFR,
    # clipped to [0.3, 100] Gyr; quenched: tau ~ 1 Gyr, truncated 10-45 % of the age span ago.
    taus = np.logspace(np.log10(0.3), 2.0, 400)
    ssfr_grid = _delayed_tau_ssfr(taus, span)
    target = 10.0 ** (log_sfr - log_m) * 1e9 * 0.6
    tau = np.where(quenched, 10.0 ** (0.15 * rng.standard_normal(n)),
                   np.interp(target, ssfr_grid, taus))
    lookback_q = span * rng.uniform(0.10, 0.45, n)
    t_quench = np.where(quenched, t_snap - lookback_q, np.nan)
    return Population(
        log_mstar=log_m, quenched=quenched, log_sfr=log_sfr, r_e_kpc=10.0**log_re,
        bulge_fraction=bt, metallicity=metallicity, tau_gyr=tau, t_quench_gyr=t_quench,
        redshift=float(redshift), t_snap_gyr=float(t_snap),
    )


def _check_redshift(redshift: float) -> None:
    if not (isinstance(redshift, int | float) and 0.0 <= redshift <= 3.0):
        raise Sim2ObsValueError(
            f"mini-universe redshift must be in [0, 3] (the range of the size-mass relation of "
            f"van der Wel et al. 2014), got {redshift!r}"
        )


# ============================================================================================
# Particles of one galaxy
# ============================================================================================

def _hernquist_projected_fraction(s) -> np.ndarray:
    """Projected mass fraction within R = s a of a Hernquist (1990, ApJ 356, 359, eq. 37) sphere."""
    s = np.atleast_1d(np.asarray(s, dtype=np.float64))
    out = np.empty_like(s)
    lo, hi, one = s < 1 - 1e-6, s > 1 + 1e-6, np.abs(s - 1) <= 1e-6
    x_lo = np.arccosh(1.0 / s[lo]) / np.sqrt(1.0 - s[lo] ** 2)
    x_hi = np.arccos(1.0 / s[hi]) / np.sqrt(s[hi] ** 2 - 1.0)
    out[lo] = s[lo] ** 2 * (x_lo - 1.0) / (1.0 - s[lo] ** 2)
    out[hi] = s[hi] ** 2 * (x_hi - 1.0) / (1.0 - s[hi] ** 2)
    out[one] = 1.0 / 3.0
    return out


#: Projected half-mass radius of an exponential disc in scale lengths and of a Hernquist
#: sphere in units of a (Hernquist 1990: R_e = 1.8153 a).
DISC_RE_OVER_RD = 1.6783
HERNQUIST_RE_OVER_A = 1.8153
#: Bulge R_e as a fraction of the disc R_e (compact bulges in discs, larger in quenched).
BULGE_TO_DISC_RE = {False: 0.3, True: 0.6}


def _component_scales(r_e: float, bt: float, quenched: bool) -> tuple[float, float]:
    """Disc scale length and Hernquist a (kpc) whose composite projected R_e equals ``r_e``."""
    from scipy.optimize import brentq

    a_unit = BULGE_TO_DISC_RE[bool(quenched)] * DISC_RE_OVER_RD / HERNQUIST_RE_OVER_A

    def enclosed(rr):
        disc = 1.0 - (1.0 + rr) * np.exp(-rr)
        return float((1.0 - bt) * disc + bt * _hernquist_projected_fraction(rr / a_unit)[0]) - 0.5

    re_unit = brentq(enclosed, 1e-6, 1e3)
    scale = r_e / re_unit
    return scale, scale * a_unit


def _stochastic_round(rng, x: float) -> int:
    base = math.floor(x)
    return int(base + (rng.random() < x - base))


def _sample_sfh(rng, n: int, tau: float, t_lo: float, t_hi: float) -> np.ndarray:
    """``n`` formation times (Gyr since t_start) from SFR ~ t e^{-t/tau} on [t_lo, t_hi]."""
    if n == 0:
        return np.empty(0)
    t = np.linspace(t_lo, t_hi, 1025)
    pdf = t * np.exp(-t / tau)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(t))])
    return np.interp(rng.random(n), cdf / cdf[-1], t)


def _normal_scores(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtri

    ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    return ndtri((ranks + 0.5) / x.size)


def _spiral_phi(rng, r: np.ndarray, r_d: float, amp, pitch: float, phase: float):
    """Azimuths for radii ``r`` under a two-armed logarithmic spiral density perturbation.

    Surface density ~ 1 + amp cos(2 (phi - phase - ln(R / R_d) / tan(pitch))) (an m = 2
    logarithmic spiral, e.g. Binney & Tremaine 2008, sec. 6.1.3), sampled by rejection.
    ``amp`` (0-1) is a scalar or one value per particle.
    """
    phi = np.empty(r.size)
    todo = np.arange(r.size)
    amp = np.broadcast_to(np.asarray(amp, dtype=np.float64), r.shape)
    arm = phase + np.log(np.maximum(r, 1e-3 * r_d) / r_d) / math.tan(pitch)
    while todo.size:
        trial = rng.uniform(0.0, 2.0 * math.pi, todo.size)
        a = amp[todo]
        accept = rng.random(todo.size) * (1.0 + a) < 1.0 + a * np.cos(2.0 * (trial - arm[todo]))
        phi[todo[accept]] = trial[accept]
        todo = todo[~accept]
    return phi


#: Spiral-arm contrast by stellar age: arms are density waves that young stars trace sharply
#: and that stars older than a few disc rotations (~0.5 Gyr) follow only weakly (old-disc arm
#: amplitudes of ~10-30 % in the near-infrared, e.g. Rix & Zaritsky 1995, ApJ 447, 82).
ARM_AMPLITUDE_OLD, ARM_AMPLITUDE_YOUNG, ARM_FADE_GYR = 0.2, 0.9, 0.5


def _arm_amplitude(age_gyr: np.ndarray) -> np.ndarray:
    return ARM_AMPLITUDE_OLD + (ARM_AMPLITUDE_YOUNG - ARM_AMPLITUDE_OLD) * np.exp(
        -np.asarray(age_gyr) / ARM_FADE_GYR)


def _sech2_heights(rng, n: int, z0: float) -> np.ndarray:
    """Vertical positions with density ~ sech^2(z / z0) (isothermal sheet; Spitzer 1942)."""
    u = rng.uniform(1e-12, 1.0 - 1e-12, n)
    return z0 * np.arctanh(2.0 * u - 1.0)


def _random_rotation(rng) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=rng).as_matrix()


def galaxy_particles(pop: Population, i: int, seed: int) -> dict:
    """Star (and wind) particles of galaxy ``i``, physical units, relative to its centre.

    Returns a dict of arrays: ``position_kpc`` (N, 3), ``velocity_kms`` (N, 3) (peculiar,
    without the bulk motion), ``initial_mass_msun``, ``age_gyr`` (NaN for winds),
    ``metallicity``, ``wind`` (bool), ``wind_sft`` (GFM_StellarFormationTime for winds, <= 0),
    and scalars ``particle_mass_msun``, ``n_young``, ``r_disc_kpc``, ``a_bulge_kpc``.
    Deterministic in (``seed``, ``i``) whatever the other galaxies are.
    """
    from sim2obs.forward_models.stellar_pops import mass_loss_fraction

    rng = np.random.default_rng([int(seed), 1, int(i)])
    m_target = 10.0 ** pop.log_mstar[i]
    quenched = bool(pop.quenched[i])
    t_snap = pop.t_snap_gyr
    t_start = _t_start_gyr()
    span = t_snap - t_start
    margin = 1e-3  # Gyr: keeps particles off the 100 Myr SFR-window edge after float32 storage

    # --- ages: old part from the delayed-tau SFH, last 100 Myr from the SFR -----------------
    t_hi = (pop.t_quench_gyr[i] - t_start) if quenched else span - SFR_WINDOW_GYR - margin
    tau = float(pop.tau_gyr[i])
    trial_ages = span - _sample_sfh(rng, 4000, tau, 0.0, t_hi)
    remain_old = float(np.mean(1.0 - mass_loss_fraction(trial_ages)))
    m_p = max(PARTICLE_MASS_MSUN, m_target / remain_old / MAX_PARTICLES)
    sfr = 10.0 ** pop.log_sfr[i]
    n_young = _stochastic_round(rng, sfr * SFR_WINDOW_GYR * 1e9 / m_p)
    young_age = rng.uniform(0.0, SFR_WINDOW_GYR - margin, n_young)
    young_current = float(np.sum(m_p * (1.0 - mass_loss_fraction(young_age))))
    n_old = max(int(round((m_target - young_current) / (m_p * remain_old))), 10)
    old_age = span - _sample_sfh(rng, n_old, tau, 0.0, t_hi)

    # --- component sizes -----------------------------------------------------------------
    r_e = float(pop.r_e_kpc[i])
    bt = float(pop.bulge_fraction[i])
    r_d, a_b = _component_scales(r_e, bt, quenched)

    # --- bulge: the oldest particles (rank correlation), Hernquist sphere ----------------
    n_bulge = min(int(round(bt * (n_old + n_young))), n_old)
    latent = (BULGE_AGE_RANK_CORRELATION * _normal_scores(old_age)
              + math.sqrt(1 - BULGE_AGE_RANK_CORRELATION**2) * rng.standard_normal(n_old))
    order = np.argsort(-latent, kind="stable")
    bulge_age, disc_age = old_age[order[:n_bulge]], old_age[order[n_bulge:]]
    u_max = (30.0 / 31.0) ** 2  # truncate at 30 a
    su = np.sqrt(rng.uniform(0.0, u_max, n_bulge))
    r_b = a_b * su / (1.0 - su)
    direction = rng.standard_normal((n_bulge, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    bulge_pos = direction * r_b[:, None]

    # --- old disc: exponential, radii rank-correlated with age (older inside) -----------
    pitch = math.radians(rng.uniform(12.0, 28.0))
    phase = rng.uniform(0.0, 2.0 * math.pi)
    n_disc = disc_age.size
    radii = np.sort(rng.gamma(2.0, r_d, n_disc))  # Sigma ~ exp(-R/R_d): R ~ Gamma(2, R_d)
    latent = (-AGE_RADIUS_RANK_CORRELATION * _normal_scores(disc_age)
              + math.sqrt(1 - AGE_RADIUS_RANK_CORRELATION**2) * rng.standard_normal(n_disc))
    r_disc = np.empty(n_disc)
    r_disc[np.argsort(latent, kind="stable")] = radii
    phi = _spiral_phi(rng, r_disc, r_d, _arm_amplitude(disc_age), pitch, phase)
    disc_pos = np.column_stack([r_disc * np.cos(phi), r_disc * np.sin(phi),
                                _sech2_heights(rng, n_disc, 0.1 * r_d)])

    # --- young stars: strong spiral arms, thin, a few clumps ------------------------------
    n_clumped = int(round(0.3 * n_young)) if n_young >= 5 else 0
    n_arm = n_young - n_clumped
    r_y = rng.gamma(2.0, r_d, n_arm)
    phi_y = _spiral_phi(rng, r_y, r_d, _arm_amplitude(young_age[:n_arm]), pitch, phase)
    young_pos = np.column_stack([r_y * np.cos(phi_y), r_y * np.sin(phi_y),
                                 _sech2_heights(rng, n_arm, 0.05 * r_d)])
    if n_clumped:
        n_clumps = min(1 + int(rng.poisson(3.0)), n_clumped)
        r_c = rng.gamma(2.0, r_d, n_clumps)
        phi_c = phase + np.log(np.maximum(r_c, 1e-3 * r_d) / r_d) / math.tan(pitch)
        phi_c += math.pi * rng.integers(0, 2, n_clumps)  # either arm
        centres = np.column_stack([r_c * np.cos(phi_c), r_c * np.sin(phi_c), np.zeros(n_clumps)])
        which = rng.integers(0, n_clumps, n_clumped)
        size = float(np.clip(0.05 * r_d, 0.05, 0.3))
        offsets = rng.standard_normal((n_clumped, 3)) * size * np.array([1.0, 1.0, 0.5])
        young_pos = np.vstack([young_pos, centres[which] + offsets])

    pos = np.vstack([bulge_pos, disc_pos, young_pos])
    age = np.concatenate([bulge_age, disc_age, young_age])
    n_star = age.size

    # --- metallicity: galaxy value with a radial gradient ----------------------------------
    r3 = np.linalg.norm(pos, axis=1)
    log_z = (np.log10(pop.metallicity[i]) + METALLICITY_GRADIENT_DEX_PER_RE * (r3 / r_e - 1.0)
             + 0.08 * rng.standard_normal(n_star))
    z = np.clip(10.0**log_z, 1e-4, 0.05)  # PopStar grid range

    # --- velocities: rough rotation + dispersion ------------------------------------------
    # Flat rotation speed from the baryonic Tully-Fisher relation M_b = 47 V^4 (McGaugh 2012,
    # AJ 143, 40), with M* as the baryonic mass; only needed for plausible Velocities fields.
    v_c = (m_target / 47.0) ** 0.25
    n_b = n_bulge
    vel = rng.standard_normal((n_star, 3))
    vel[:n_b] *= v_c / math.sqrt(3.0)
    rc = np.hypot(pos[n_b:, 0], pos[n_b:, 1])
    vrot = v_c * rc / np.sqrt(rc**2 + (0.5 * r_d) ** 2)
    phi_all = np.arctan2(pos[n_b:, 1], pos[n_b:, 0])
    vel[n_b:] *= 0.15 * v_c
    vel[n_b:, 0] += -vrot * np.sin(phi_all)
    vel[n_b:, 1] += vrot * np.cos(phi_all)

    # --- winds: a few wind-phase gas cells in PartType4 ------------------------------------
    n_wind = int(rng.integers(1, 4))
    wdir = rng.standard_normal((n_wind, 3))
    wdir /= np.linalg.norm(wdir, axis=1, keepdims=True)
    wind_pos = wdir * rng.uniform(0.2, 3.0, n_wind)[:, None] * r_e
    wind_vel = wdir * rng.uniform(100.0, 400.0, n_wind)[:, None]

    # Random orientation, then interleave winds with the stars.
    rot = _random_rotation(rng)
    pos_all = np.vstack([pos, wind_pos]) @ rot.T
    vel_all = np.vstack([vel, wind_vel]) @ rot.T
    perm = rng.permutation(n_star + n_wind)
    wind = np.zeros(n_star + n_wind, dtype=bool)
    wind[n_star:] = True
    wind_sft = np.zeros(n_star + n_wind)
    wind_sft[n_star:] = -rng.uniform(0.05, 1.0, n_wind)
    m_init = np.full(n_star + n_wind, m_p)
    m_init[n_star:] = 0.3 * m_p
    return {
        "position_kpc": pos_all[perm],
        "velocity_kms": vel_all[perm],
        "initial_mass_msun": m_init[perm],
        "age_gyr": np.concatenate([age, np.full(n_wind, np.nan)])[perm],
        "metallicity": np.concatenate([z, np.full(n_wind, pop.metallicity[i])])[perm],
        "wind": wind[perm],
        "wind_sft": wind_sft[perm],
        "particle_mass_msun": m_p,
        "n_young": n_young,
        "r_disc_kpc": r_d,
        "a_bulge_kpc": a_b,
    }


# ============================================================================================
# Writing the TNG layout
# ============================================================================================

def _half_mass_radius(r: np.ndarray, m: np.ndarray) -> float:
    order = np.argsort(r)
    cum = np.cumsum(m[order])
    return float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _neighbour_distance(pos: np.ndarray, k: int) -> np.ndarray:
    from scipy.spatial import cKDTree

    kk = min(k + 1, pos.shape[0])  # the particle itself is its own 0th neighbour
    d, _ = cKDTree(pos).query(pos, k=kk, workers=-1)
    return np.atleast_2d(d.T).T[:, -1] if kk > 1 else np.full(pos.shape[0], 1.0)


def _summed_magnitude(mags: np.ndarray) -> np.ndarray:
    flux = np.sum(10.0 ** (-0.4 * mags), axis=0)
    return -2.5 * np.log10(flux)


def _six(value, dtype) -> np.ndarray:
    out = np.zeros(6, dtype=dtype)
    out[4] = value
    return out


def _generate(pop: Population, seed: int, progress: bool) -> tuple[dict, dict]:
    """Particles and catalogue of every galaxy in TNG units; returns (subhalos, particles)."""
    from tqdm.auto import tqdm

    from sim2obs.forward_models.photometry import absolute_magnitudes
    from sim2obs.forward_models.simulations.base import cosmic_time_gyr
    from sim2obs.forward_models.stellar_pops import mass_loss_fraction

    h = HUBBLE_PARAM
    z_snap = pop.redshift
    a_snap = 1.0 / (1.0 + z_snap)
    t_snap = pop.t_snap_gyr
    to_ckpc_h = h / a_snap  # physical kpc -> ckpc/h
    to_mass = h / 1e10  # Msun -> 1e10 Msun/h
    rng = np.random.default_rng([int(seed), 2])

    # Subhalo positions: uniform in the box; every tenth galaxy (i % 10 == 3) straddles the
    # box corner so that readers must wrap coordinates periodically.
    centres = rng.uniform(0.0, BOX_SIZE_CKPC_H, (pop.n, 3))
    bulk_vel = rng.normal(0.0, 150.0, (pop.n, 3))
    sub: dict[str, list] = {}
    parts: dict[str, list] = {}
    next_id = 1
    for i in tqdm(range(pop.n), disable=not progress, desc="mini-universe", unit="galaxy"):
        g = galaxy_particles(pop, i, seed)
        if i % 10 == 3:
            centres[i] = rng.uniform(-0.3, 0.3, 3) * pop.r_e_kpc[i] * to_ckpc_h % BOX_SIZE_CKPC_H
        centre = centres[i].astype(np.float32).astype(np.float64)  # as stored in SubhaloPos
        wind = g["wind"]
        star = ~wind
        n_part = wind.size

        # Formation scale factors (float32 as in TNG), then the ages a reader will recover.
        a_form = np.empty(n_part)
        t_form = np.clip(t_snap - g["age_gyr"][star], 1e-3, t_snap)
        a_form[star] = scale_factor_at_time(t_form, COSMOLOGY)
        a_form[wind] = g["wind_sft"][wind]
        a_form = a_form.astype(np.float32)
        age = np.full(n_part, np.nan)
        age[star] = np.clip(t_snap - cosmic_time_gyr(np.minimum(a_form[star], a_snap),
                                                     COSMOLOGY), 0.0, None)
        m_init = g["initial_mass_msun"].astype(np.float32).astype(np.float64)
        z = g["metallicity"].astype(np.float32).astype(np.float64)
        m_now = m_init.copy()
        m_now[star] = m_init[star] * (1.0 - mass_loss_fraction(age[star]))

        mags = np.full((n_part, len(PHOTOMETRY_FILTERS)), WIND_MAGNITUDE)
        mags[star] = absolute_magnitudes(PHOTOMETRY_FILTERS, age[star], z[star], m_init[star])

        pos_c = g["position_kpc"] * to_ckpc_h
        coords = (centre + pos_c) % BOX_SIZE_CKPC_H
        hsml = _neighbour_distance(g["position_kpc"][star], N_NEIGHBOURS) * to_ckpc_h
        hsml_all = np.empty(n_part)
        hsml_all[star] = hsml
        if np.any(wind):
            from scipy.spatial import cKDTree

            kk = min(N_NEIGHBOURS, int(star.sum()))
            d, _ = cKDTree(g["position_kpc"][star]).query(g["position_kpc"][wind], k=kk)
            hsml_all[wind] = np.atleast_2d(d.T).T[:, -1] * to_ckpc_h
        vel = g["velocity_kms"] + bulk_vel[i]
        ids = np.arange(next_id, next_id + n_part, dtype=np.uint64)
        next_id += n_part

        for key, value in (
            ("Coordinates", coords), ("Velocities", vel / math.sqrt(a_snap)),
            ("Masses", m_now * to_mass), ("GFM_InitialMass", m_init * to_mass),
            ("GFM_StellarFormationTime", a_form), ("GFM_Metallicity", z),
            ("GFM_StellarPhotometrics", mags), ("StellarHsml", hsml_all), ("ParticleIDs", ids),
        ):
            parts.setdefault(key, []).append(np.asarray(value, dtype=_PART_DTYPES[key]))

        r3 = np.linalg.norm(pos_c, axis=1)
        mass_c = float(m_now.sum()) * to_mass
        m_star = m_now[star]
        sfr = g["n_young"] * g["particle_mass_msun"] / (SFR_WINDOW_GYR * 1e9)
        most_bound = int(ids[np.argmin(r3)])
        row = {
            "SubhaloPos": centre,
            "SubhaloCM": (centre + np.sum(pos_c * m_now[:, None], axis=0) / m_now.sum())
            % BOX_SIZE_CKPC_H,
            "SubhaloVel": bulk_vel[i],
            "SubhaloLenType": _six(n_part, np.int32),
            "SubhaloLen": n_part,
            "SubhaloMassType": _six(mass_c, np.float64),
            "SubhaloMass": mass_c,
            "SubhaloHalfmassRadType": _six(_half_mass_radius(r3, m_now), np.float64),
            "SubhaloHalfmassRad": _half_mass_radius(r3, m_now),
            "SubhaloSFR": sfr,
            "SubhaloStarMetallicity": float(np.sum(m_star * z[star]) / m_star.sum()),
            "SubhaloStellarPhotometrics": _summed_magnitude(mags[star]),
            "SubhaloVmax": (10.0 ** pop.log_mstar[i] / 47.0) ** 0.25,
            "SubhaloIDMostbound": most_bound,
            "SubhaloGrNr": i,
            "SubhaloParent": 0,
            "SubhaloFlag": 1,
        }
        for key, value in row.items():
            sub.setdefault(key, []).append(value)

    subs = {k: np.asarray(v) for k, v in sub.items()}
    particles = {k: np.concatenate(parts.pop(k)) for k in list(parts)}  # frees the lists
    return subs, particles


_SUBHALO_DTYPES = {
    "SubhaloPos": np.float32, "SubhaloCM": np.float32, "SubhaloVel": np.float32,
    "SubhaloLenType": np.int32, "SubhaloLen": np.int32, "SubhaloMassType": np.float32,
    "SubhaloMass": np.float32, "SubhaloHalfmassRadType": np.float32,
    "SubhaloHalfmassRad": np.float32, "SubhaloSFR": np.float32,
    "SubhaloStarMetallicity": np.float32, "SubhaloStellarPhotometrics": np.float32,
    "SubhaloVmax": np.float32, "SubhaloIDMostbound": np.uint64, "SubhaloGrNr": np.int32,
    "SubhaloParent": np.int32, "SubhaloFlag": np.uint8,
}
_PART_DTYPES = {
    "Coordinates": np.float64, "Velocities": np.float32, "Masses": np.float32,
    "GFM_InitialMass": np.float32, "GFM_StellarFormationTime": np.float32,
    "GFM_Metallicity": np.float32, "GFM_StellarPhotometrics": np.float32,
    "StellarHsml": np.float32, "ParticleIDs": np.uint64,
}


def _groups(subs: dict, pop: Population) -> dict:
    """One FoF group per subhalo (its only, central subhalo), with a Moster et al. halo mass."""
    n = pop.n
    h = HUBBLE_PARAM
    z = pop.redshift
    a = 1.0 / (1.0 + z)
    log_mh = halo_mass_from_stellar(pop.log_mstar, z)
    # R200c from M200c = 200 rho_crit(z) 4/3 pi R^3 (Planck15 rho_crit).
    from sim2obs.forward_models.photometry import get_cosmology

    rho_c = get_cosmology(COSMOLOGY).critical_density(z).to("Msun / kpc3").value
    r200 = (3.0 * 10.0**log_mh / (4.0 * math.pi * 200.0 * rho_c)) ** (1.0 / 3.0)
    return {
        "GroupFirstSub": (np.arange(n, dtype=np.int32), np.int32),
        "GroupNsubs": (np.ones(n), np.int32),
        "GroupLen": (subs["SubhaloLen"], np.int32),
        "GroupLenType": (subs["SubhaloLenType"], np.int32),
        "GroupMass": (subs["SubhaloMass"], np.float32),
        "GroupMassType": (subs["SubhaloMassType"], np.float32),
        "GroupPos": (subs["SubhaloPos"], np.float32),
        "GroupCM": (subs["SubhaloCM"], np.float32),
        "GroupVel": (subs["SubhaloVel"] / a, np.float32),  # TNG GroupVel is in km/s/a
        "GroupSFR": (subs["SubhaloSFR"], np.float32),
        "Group_M_Crit200": (10.0**log_mh * h / 1e10, np.float32),
        "Group_R_Crit200": (r200 * h / a, np.float32),
    }


def _split(total: int, n_chunks: int) -> np.ndarray:
    return np.linspace(0, total, n_chunks + 1).round().astype(np.int64)


def _header_common(pop: Population) -> dict:
    return {
        "BoxSize": BOX_SIZE_CKPC_H, "HubbleParam": HUBBLE_PARAM, "Omega0": OMEGA_MATTER,
        "OmegaLambda": OMEGA_LAMBDA, "OmegaBaryon": OMEGA_BARYON,
        "Redshift": float(pop.redshift), "Time": 1.0 / (1.0 + pop.redshift),
    }


def _write(root: Path, pop: Population, subs: dict, parts: dict, snapshot: int,
           n_chunks: int) -> None:
    sss = f"{snapshot:03d}"
    out = root / "output"
    (out / f"groups_{sss}").mkdir(parents=True)
    (out / f"snapdir_{sss}").mkdir(parents=True)
    (root / "postprocessing" / "offsets").mkdir(parents=True)
    n = pop.n
    n_part = subs["SubhaloLen"].astype(np.int64)
    total = int(n_part.sum())
    common = _header_common(pop)
    groups = _groups(subs, pop)

    # --- group catalogue ----------------------------------------------------------------
    gc_bounds = _split(n, min(n_chunks, n))
    n_gc = gc_bounds.size - 1
    for c in range(n_gc):
        lo, hi = int(gc_bounds[c]), int(gc_bounds[c + 1])
        with h5py.File(out / f"groups_{sss}" / f"fof_subhalo_tab_{sss}.{c}.hdf5", "w") as f:
            hd = f.create_group("Header")
            for k, v in common.items():
                hd.attrs[k] = v
            hd.attrs["Ngroups_ThisFile"] = np.int32(hi - lo)
            hd.attrs["Ngroups_Total"] = np.int32(n)
            hd.attrs["Nsubgroups_ThisFile"] = np.int32(hi - lo)
            hd.attrs["Nsubgroups_Total"] = np.int32(n)
            hd.attrs["Nids_ThisFile"] = np.int32(0)
            hd.attrs["Nids_Total"] = np.int32(0)
            hd.attrs["NumFiles"] = np.int32(n_gc)
            hd.attrs["FlagDoubleprecision"] = np.int32(0)
            g = f.create_group("Group")
            s = f.create_group("Subhalo")
            if hi > lo:
                for k, (v, dt) in groups.items():
                    g.create_dataset(k, data=np.asarray(v)[lo:hi].astype(dt))
                for k, dt in _SUBHALO_DTYPES.items():
                    s.create_dataset(k, data=subs[k][lo:hi].astype(dt))

    # --- snapshot ------------------------------------------------------------------------
    sn_bounds = _split(total, n_chunks)
    for c in range(n_chunks):
        lo, hi = int(sn_bounds[c]), int(sn_bounds[c + 1])
        with h5py.File(out / f"snapdir_{sss}" / f"snap_{sss}.{c}.hdf5", "w") as f:
            hd = f.create_group("Header")
            for k, v in common.items():
                hd.attrs[k] = v
            hd.attrs["MassTable"] = np.zeros(6)
            hd.attrs["NumFilesPerSnapshot"] = np.int32(n_chunks)
            hd.attrs["NumPart_ThisFile"] = _six(hi - lo, np.int32)
            hd.attrs["NumPart_Total"] = _six(total & 0xFFFFFFFF, np.uint32)
            hd.attrs["NumPart_Total_HighWord"] = _six(total >> 32, np.uint32)
            hd.attrs["UnitLength_in_cm"] = 3.085678e21
            hd.attrs["UnitMass_in_g"] = 1.989e43
            hd.attrs["UnitVelocity_in_cm_per_s"] = 1e5
            for flag in ("Flag_Cooling", "Flag_Feedback", "Flag_Metals", "Flag_Sfr",
                         "Flag_StellarAge"):
                hd.attrs[flag] = np.int32(1)
            hd.attrs["Flag_DoublePrecision"] = np.int32(1)
            if hi > lo:
                p4 = f.create_group("PartType4")
                for k, dt in _PART_DTYPES.items():
                    # gzip level 1 + shuffle: ~35 % smaller files for ~10 % more build time;
                    # illustris_python and h5py read it transparently.
                    p4.create_dataset(k, data=np.asarray(parts[k][lo:hi], dtype=dt),
                                      compression="gzip", compression_opts=1, shuffle=True)

    # --- offsets ---------------------------------------------------------------------------
    first = np.concatenate([[0], np.cumsum(n_part)[:-1]])
    with h5py.File(root / "postprocessing" / "offsets" / f"offsets_{sss}.hdf5", "w") as f:
        f.create_dataset("FileOffsets/Group", data=gc_bounds[:-1])
        f.create_dataset("FileOffsets/Subhalo", data=gc_bounds[:-1])
        f.create_dataset("FileOffsets/SnapByType",
                         data=np.stack([_six(b, np.int64) for b in sn_bounds[:-1]]))
        by_type = np.zeros((n, 6), dtype=np.int64)
        by_type[:, 4] = first
        f.create_dataset("Group/SnapByType", data=by_type)
        f.create_dataset("Subhalo/SnapByType", data=by_type)


def _parameters(n_galaxies, seed, snapshot, redshift, n_chunks) -> dict:
    return {
        "n_galaxies": int(n_galaxies), "seed": int(seed), "snapshot": int(snapshot),
        "redshift": float(redshift), "n_chunks": int(n_chunks),
    }


def read_mini_parameters(path) -> dict | None:
    """Contents of ``mini_universe.json`` under ``path`` (or None if it is not a mini-universe)."""
    marker = Path(path) / _MINI_JSON
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def build_mini_universe(
    out_dir, n_galaxies: int = 500, seed: int = 0, snapshot: int = 99, redshift: float = 0.0,
    n_chunks: int = 2, progress: bool = True,
) -> Path:
    """Write a mini-universe in IllustrisTNG's layout under ``out_dir``; returns ``out_dir``.

    The folder is built next to ``out_dir`` under a temporary name and renamed into place, so
    it is complete or absent. If ``out_dir`` already holds a mini-universe with the same
    parameters and version it is returned as is; an existing non-empty folder of anything else
    is refused. Same parameters, same bytes of particle data.
    """
    from sim2obs import __version__

    for name, value, lo in (("n_galaxies", n_galaxies, 1), ("seed", seed, 0),
                            ("snapshot", snapshot, 0), ("n_chunks", n_chunks, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
            raise Sim2ObsValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if snapshot > 999:
        raise Sim2ObsValueError(f"snapshot must be <= 999 (TNG's 3-digit names), got {snapshot}")
    _check_redshift(redshift)
    out = Path(os.path.expanduser(str(out_dir))).absolute()
    params = _parameters(n_galaxies, seed, snapshot, redshift, n_chunks)
    existing = read_mini_parameters(out)
    if existing is not None:
        if existing.get("version") == MINI_VERSION and existing.get("parameters") == params:
            return out
        raise Sim2ObsValueError(
            f"'{out}' already holds a different mini-universe ({existing.get('parameters')}, "
            f"version {existing.get('version')}); remove it or choose another --out"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Sim2ObsValueError(
            f"'{out}' exists and is not an empty folder; choose another output folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        pop = draw_population(n_galaxies, seed, redshift)
        subs, parts = _generate(pop, seed, progress)
        _write(tmp, pop, subs, parts, snapshot, n_chunks)
        meta = {
            "version": MINI_VERSION,
            "sim2obs_version": __version__,
            "parameters": params,
            "layout": "IllustrisTNG (illustris_python basePath = output/)",
            "box_size_ckpc_h": BOX_SIZE_CKPC_H,
            "hubble_param": HUBBLE_PARAM,
            "cosmology": COSMOLOGY,
            "n_particles": int(subs["SubhaloLen"].sum()),
            "photometry_filters": list(PHOTOMETRY_FILTERS),
            "relations": [
                "SMF: Baldry et al. 2012, MNRAS 421, 621",
                "quenched fraction: Peng et al. 2010, ApJ 721, 193",
                "main sequence: Speagle et al. 2014, ApJS 214, 15, eq. 28",
                "size-mass: van der Wel et al. 2014, ApJ 788, 28",
                "mass-metallicity: Gallazzi et al. 2005, MNRAS 362, 41",
                "bulge fraction: trends of Bluck et al. 2014, MNRAS 441, 599",
                "halo mass: Moster et al. 2013, MNRAS 428, 3121",
            ],
        }
        (tmp / _MINI_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished the same universe first: keep theirs if it matches.
            theirs = read_mini_parameters(out)
            if theirs is not None and theirs.get("parameters") == params:
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cache_root(cache_dir=None) -> Path:
    """Folder for cached data: ``cache_dir``, else ``$SIM2OBS_CACHE``, else ~/.cache/sim2obs."""
    if cache_dir is not None:
        return Path(os.path.expanduser(str(cache_dir)))
    env = os.environ.get("SIM2OBS_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    return Path.home() / ".cache" / "sim2obs"


def default_mini_universe(cache_dir=None, n_galaxies: int = 500, seed: int = 0,
                          progress: bool = True) -> Path:
    """Path of the default mini-universe (z = 0, snapshot 99), built on first use and cached.

    Cached as ``<cache>/mini-v<MINI_VERSION>-n<N>-seed<S>`` (see :func:`cache_root`).
    """
    path = cache_root(cache_dir) / f"mini-v{MINI_VERSION}-n{int(n_galaxies)}-seed{int(seed)}"
    return build_mini_universe(path, n_galaxies=n_galaxies, seed=seed, snapshot=99,
                               redshift=0.0, progress=progress)
