"""What every simulation reader provides: a selection, a :class:`GalaxySource`, shared helpers.

A source lists the subhalo ids passing a :class:`Selection` (:meth:`GalaxySource.ids`) and reads
one galaxy at a time from disk (:meth:`GalaxySource.load`). Sources hold only paths, numbers and
the selection -- never open file handles -- so they pickle cheaply into worker processes, which
then call ``load`` themselves.

Shared helpers here: cosmic time <-> scale factor in the simulation's cosmology (for stellar
formation times stored as scale factors), periodic-box unwrapping, and a shrinking-sphere centre.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from sim2obs.errors import Sim2ObsDataError, Sim2ObsError, Sim2ObsValueError
from sim2obs.forward_models.galaxy import Galaxy


@dataclass(frozen=True)
class Selection:
    """Which galaxies of a simulation to use.

    Attributes
    ----------
    min_mstar_msun : minimum stellar mass in Msun, applied to the catalogue stellar mass
        (``SubhaloMassType[:, 4]`` for TNG) -- or to the summed particle mass where there is no
        catalogue (API cutouts).
    min_particles : minimum number of star particles. Applied to the catalogue length
        (``SubhaloLenType[:, 4]``) by ``ids()`` and checked again by ``load()`` after wind
        particles are dropped (:class:`InsufficientParticlesError` if too few remain).
    max_galaxies : keep at most this many of the galaxies passing the cuts: a deterministic,
        unbiased subsample (seed 0; not the first ids, which in Subfind order are the most
        massive haloes). ``None`` keeps all.
    """

    min_mstar_msun: float = 1e9
    min_particles: int = 100
    max_galaxies: int | None = None

    def __post_init__(self) -> None:
        m = self.min_mstar_msun
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not math.isfinite(m) or m < 0:
            raise Sim2ObsValueError(
                f"Selection.min_mstar_msun must be a finite number >= 0 (Msun), got {m!r}"
            )
        object.__setattr__(self, "min_mstar_msun", float(m))
        n = self.min_particles
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise Sim2ObsValueError(f"Selection.min_particles must be an integer >= 1, got {n!r}")
        object.__setattr__(self, "min_particles", int(n))
        k = self.max_galaxies
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise Sim2ObsValueError(
                    f"Selection.max_galaxies must be None or an integer >= 1, got {k!r}"
                )
            object.__setattr__(self, "max_galaxies", int(k))

    def to_dict(self) -> dict:
        """JSON-able form (for shard provenance)."""
        return asdict(self)

    def cut(self, ids: np.ndarray, mstar_msun: np.ndarray, n_particles: np.ndarray) -> np.ndarray:
        """Apply the cuts to catalogue arrays; returns the sorted int64 ids that pass."""
        ids = np.asarray(ids, dtype=np.int64)
        keep = (np.asarray(mstar_msun) >= self.min_mstar_msun) & (
            np.asarray(n_particles) >= self.min_particles
        )
        out = np.sort(ids[keep])
        if self.max_galaxies is not None and out.size > self.max_galaxies:
            rng = np.random.default_rng(0)
            out = np.sort(rng.choice(out, size=self.max_galaxies, replace=False))
        return out.astype(np.int64)


#: The default selection (frozen, so safe to share as a default argument).
DEFAULT_SELECTION = Selection()


@contextlib.contextmanager
def reading(what: str, path, fix: str = ""):
    """Turn any non-sim2obs exception raised while reading ``path`` (h5py/OSError on truncated
    files, KeyError, illustris_python's bare Exception, numpy) into a Sim2ObsDataError that
    names the file, what was being read and the fix."""
    try:
        yield
    except Sim2ObsError:
        raise
    except Exception as exc:
        hint = f"; {fix}" if fix else ""
        raise Sim2ObsDataError(f"{path}: could not {what} ({type(exc).__name__}: {exc}){hint}") from exc


class InsufficientParticlesError(Sim2ObsDataError):
    """A galaxy has fewer star particles than the selection asks for once winds are dropped."""


class GalaxySource(ABC):
    """A simulation snapshot (or a set of cutouts) that yields :class:`Galaxy` objects.

    Subclasses set ``name`` (e.g. ``'mini'``, ``'TNG100-1'``), ``redshift`` (snapshot redshift)
    and ``cosmology`` (an astropy cosmology name understood by ``photometry.get_cosmology``), and
    must stay picklable: paths, numbers and the :class:`Selection` only.
    """

    name: str
    redshift: float
    cosmology: str
    selection: Selection

    @abstractmethod
    def ids(self) -> np.ndarray:
        """Sorted int64 ids of the galaxies passing the selection (deterministic)."""

    @abstractmethod
    def load(self, object_id: int) -> Galaxy:
        """Read one galaxy (only its own particles) from disk."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able provenance: at least ``kind``, ``path``, ``snapshot``, ``selection``."""

    def __iter__(self) -> Iterator[Galaxy]:
        """Load every selected galaxy in id order (convenience for small sources)."""
        for object_id in self.ids():
            yield self.load(int(object_id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, redshift={self.redshift:.4g})"


# --------------------------------------------------------------------------------------------
# Cosmic time
# --------------------------------------------------------------------------------------------

_LOG_A_MIN = -4.0  # z ~ 1e4: far before the first stars of any snapshot


@lru_cache(maxsize=4)
def _time_splines(cosmology: str):
    """Cubic splines t(log10 a) and log10 a(t) in Gyr, tabulated once per process.

    t(a) = int_0^a da' / (a' H(a')) with the astropy cosmology's own H(z) (``efunc``, radiation
    and massive neutrinos included), integrated with the trapezoidal rule on a fine grid in
    ln a from a = 1e-8. This agrees with ``cosmology.age(z)`` to ~1e-8 Gyr but, unlike astropy's
    per-point quadrature (noisy at the 1e-3 relative level for z > 1e3), is smooth and
    monotonic, so it can be inverted.
    """
    from scipy.integrate import cumulative_trapezoid
    from scipy.interpolate import CubicSpline

    from sim2obs.forward_models.photometry import get_cosmology

    cosmo = get_cosmology(cosmology)
    ln_a = np.linspace(math.log(1e-8), 0.0, 200_001)
    hubble_per_gyr = cosmo.H0.to("1/Gyr").value * cosmo.efunc(np.expm1(-ln_a))
    t = cumulative_trapezoid(1.0 / hubble_per_gyr, x=ln_a, initial=0.0)
    log_a = ln_a / math.log(10.0)
    keep = log_a >= _LOG_A_MIN - 0.01
    return CubicSpline(log_a[keep], t[keep]), CubicSpline(t[keep], log_a[keep])


def cosmic_time_gyr(scale_factor, cosmology: str = "Planck15") -> np.ndarray:
    """Age of the universe (Gyr) at scale factor(s) ``a`` in ``(1e-4, 1]`` (astropy cosmology)."""
    a = np.asarray(scale_factor, dtype=np.float64)
    if np.any(~np.isfinite(a)) or np.any(a <= 10**_LOG_A_MIN) or np.any(a > 1.0 + 1e-6):
        raise Sim2ObsValueError(
            f"scale factors must lie in (1e-4, 1]; got range [{np.nanmin(a)}, {np.nanmax(a)}]"
        )
    t_of_loga, _ = _time_splines(cosmology)
    return t_of_loga(np.log10(np.minimum(a, 1.0)))


def scale_factor_at_time(t_gyr, cosmology: str = "Planck15") -> np.ndarray:
    """Inverse of :func:`cosmic_time_gyr`: scale factor at cosmic time(s) ``t`` (Gyr)."""
    _, loga_of_t = _time_splines(cosmology)
    t = np.asarray(t_gyr, dtype=np.float64)
    t_min, t_max = loga_of_t.x[0], loga_of_t.x[-1]
    if np.any(~np.isfinite(t)) or np.any(t < t_min) or np.any(t > t_max + 1e-9):
        raise Sim2ObsValueError(f"cosmic times must lie in [{t_min:.3g}, {t_max:.4f}] Gyr")
    return 10.0 ** np.minimum(loga_of_t(np.clip(t, t_min, t_max)), 0.0)


def redshift_time_gyr(redshift: float, cosmology: str = "Planck15") -> float:
    """Age of the universe (Gyr) at ``redshift`` (same tabulation as :func:`cosmic_time_gyr`)."""
    return float(cosmic_time_gyr(1.0 / (1.0 + float(redshift)), cosmology))


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def periodic_offset(positions, centre, box_size: float | None) -> np.ndarray:
    """``positions - centre`` wrapped into ``[-box/2, box/2)`` (no wrapping if box is None)."""
    d = np.asarray(positions, dtype=np.float64) - np.asarray(centre, dtype=np.float64)
    if box_size is not None and box_size > 0:
        d = (d + 0.5 * box_size) % box_size - 0.5 * box_size
    return d


def shrinking_sphere_centre(
    positions: np.ndarray, masses: np.ndarray, shrink: float = 0.025, min_particles: int = 20,
    min_fraction: float = 0.1,
) -> np.ndarray:
    """Mass-weighted shrinking-sphere centre (Power et al. 2003, MNRAS 338, 14, sec. 2.5).

    Start from the centre of mass within the sphere enclosing all particles, shrink the radius by
    ``shrink`` (2.5 % as in Power et al.) and recentre on the particles inside, until fewer than
    ``max(min_particles, min(1000, min_fraction * N))`` remain (1000 is their stopping criterion;
    the fraction keeps enough particles for a stable centre in small galaxies).
    Positions must already be unwrapped (no periodic jumps).
    """
    pos = np.asarray(positions, dtype=np.float64)
    m = np.asarray(masses, dtype=np.float64)
    stop = max(min_particles, min(1000, int(min_fraction * pos.shape[0])))
    centre = np.sum(pos * m[:, None], axis=0) / m.sum()
    radius = float(np.sqrt(np.max(np.sum((pos - centre) ** 2, axis=1))))
    inside = np.ones(pos.shape[0], dtype=bool)
    while True:
        radius *= 1.0 - shrink
        r2 = np.sum((pos - centre) ** 2, axis=1)
        new_inside = r2 <= radius * radius
        if np.count_nonzero(new_inside) < stop:
            break
        inside = new_inside
        centre = np.sum(pos[inside] * m[inside, None], axis=0) / m[inside].sum()
    return centre
