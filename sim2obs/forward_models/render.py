"""Render one simulated galaxy into a calibrated multi-band survey cutout.

Steps (each a small function below):

1. place the galaxy at its redshift (snapshot's, a fixed one, or drawn from a range) and give it
   an orientation (uniform on the sphere unless fixed; recorded in the labels);
2. per-particle band fluxes from the precomputed (Z, age) -> flux table (:mod:`photometry`);
3. project and deposit the flux on an oversampled grid with an adaptive Gaussian kernel per
   particle (FWHM = the simulation's smoothing length, or the distance to the k-th nearest
   neighbour), binned in kernel width so the cost is a handful of Gaussian filters;
4. wrap the grid as a ``galsim.InterpolatedImage``, convolve with the survey PSF, draw on the
   H x W stamp at the survey pixel scale (pixel response included);
5. sky + Poisson + read noise with ``galsim.CCDNoise`` in electrons, background-subtracted, back
   to nanomaggies; inverse variance of the background; optional realism effects
   (:mod:`realism`).

Randomness: orientation and redshift come from a generator seeded by (seed, object_id) only, so
the same galaxy is seen identically by every survey (cross-survey pairs); noise and realism
draws also depend on the survey and band.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from sim2obs.errors import Sim2ObsValueError
from sim2obs.forward_models.galaxy import Galaxy
from sim2obs.forward_models.photometry import (
    DEFAULT_Z_FOR_Z0,
    arcsec_per_kpc,
    band_flux_table,
    nmgy_to_mag,
)
from sim2obs.forward_models.psf import psf_image, psf_profile
from sim2obs.forward_models.realism import (
    RealismConfig,
    apply_realism,
    draw_seeing,
    max_seeing_factor,
)
from sim2obs.forward_models.stellar_pops import Dust
from sim2obs.forward_models.surveys import SurveySpec

#: Neighbour count for adaptive smoothing when the simulation provides no smoothing length;
#: 32 is the value used for TNG's ``StellarHsml`` (Nelson et al. 2019, ComAC 6, 2, table 3).
DEFAULT_SMOOTHING_K = 32

#: Redshifts are rounded to this step so band-flux tables can be cached (and the label is the
#: rounded value actually used, so nothing is inconsistent).
REDSHIFT_STEP = 1e-4

_ORIENTATIONS = ("random", "face-on", "edge-on", "as-is")


@dataclass(frozen=True)
class RenderConfig:
    """Everything that determines a cutout besides the galaxy, the survey and the seed.

    Attributes
    ----------
    stamp : H = W in pixels
    psf_stamp : size P of the stored PSF image (odd)
    oversample : deposition grid pixels per survey pixel
    smoothing_k : k-th neighbour for adaptive smoothing when no smoothing length is given
    min_smoothing_kpc : floor on the kernel FWHM (kpc)
    orientation : 'random' (uniform on the sphere), 'face-on', 'edge-on' (about the stellar
        angular momentum) or 'as-is' (simulation z axis is the line of sight)
    redshift : fixed observation redshift; None = the snapshot's (0.1 for a z = 0 snapshot)
    redshift_range : (zmin, zmax) to draw redshifts uniformly per galaxy (overrides redshift)
    psf_fwhm_scale : multiplies every band's PSF FWHM (worse/better seeing studies)
    ssp_library, dust : stellar population model
    store_noiseless : keep the noiseless galaxy image
    spectra : keep the integrated observed spectrum
    realism : extra observing effects (:class:`RealismConfig`)
    """

    stamp: int = 64
    psf_stamp: int = 25
    oversample: int = 2
    smoothing_k: int = DEFAULT_SMOOTHING_K
    min_smoothing_kpc: float = 0.05
    orientation: str = "random"
    redshift: float | None = None
    redshift_range: tuple[float, float] | None = None
    psf_fwhm_scale: float = 1.0
    ssp_library: str = "popstar"
    dust: Dust = field(default_factory=Dust)
    store_noiseless: bool = True
    spectra: bool = False
    realism: RealismConfig = field(default_factory=RealismConfig)

    def __post_init__(self) -> None:
        if int(self.stamp) < 8:
            raise Sim2ObsValueError(f"stamp must be >= 8 pixels, got {self.stamp}")
        if int(self.psf_stamp) < 5 or int(self.psf_stamp) % 2 == 0:
            raise Sim2ObsValueError(f"psf_stamp must be odd and >= 5, got {self.psf_stamp}")
        if int(self.oversample) < 1 or int(self.smoothing_k) < 1:
            raise Sim2ObsValueError("oversample and smoothing_k must be >= 1")
        if self.orientation not in _ORIENTATIONS:
            raise Sim2ObsValueError(f"orientation must be one of {_ORIENTATIONS}, got '{self.orientation}'")
        if self.redshift is not None and not self.redshift > 0:
            raise Sim2ObsValueError(f"redshift must be > 0, got {self.redshift}")
        if self.redshift_range is not None:
            lo, hi = (float(v) for v in self.redshift_range)
            if not 0 < lo <= hi:
                raise Sim2ObsValueError(f"redshift_range must satisfy 0 < zmin <= zmax, got {self.redshift_range}")
            object.__setattr__(self, "redshift_range", (lo, hi))
        if not self.psf_fwhm_scale > 0:
            raise Sim2ObsValueError("psf_fwhm_scale must be positive")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["realism"] = self.realism.to_dict()
        return d


@dataclass(frozen=True)
class RenderedGalaxy:
    """One cutout: arrays (B, H, W) in nanomaggies, PSF (B, P, P), labels and metadata."""

    object_id: int
    image: np.ndarray
    ivar: np.ndarray
    psf: np.ndarray
    noiseless: np.ndarray | None
    labels: dict[str, float]
    spectrum: np.ndarray | None = None


def galaxy_rng(seed: int, object_id: int, *keys: str) -> np.random.Generator:
    """Generator for one galaxy, independent of worker count and rendering order."""
    words = [zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(object_id), *words]))


def observation_redshift(galaxy: Galaxy, config: RenderConfig, rng: np.random.Generator) -> float:
    """Redshift the galaxy is observed at, rounded to :data:`REDSHIFT_STEP`."""
    if config.redshift_range is not None:
        z = rng.uniform(*config.redshift_range)
    elif config.redshift is not None:
        z = config.redshift
    else:
        z = galaxy.redshift if galaxy.redshift > 0 else DEFAULT_Z_FOR_Z0
    return max(round(z / REDSHIFT_STEP) * REDSHIFT_STEP, REDSHIFT_STEP)


def rotation_matrix(galaxy: Galaxy, orientation: str, rng: np.random.Generator):
    """3x3 rotation taking simulation axes to (x_sky, y_sky, line of sight), and the angles.

    Returns ``(R, (inclination_deg, position_angle_deg))`` where the inclination is the angle
    between the line of sight and the stellar angular-momentum axis.
    """
    pos = galaxy.stars.position_kpc
    if orientation == "random":
        # Uniform rotation: QR of a Gaussian matrix with sign fix (Mezzadri 2007, Notices AMS).
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        rot = q.T
    elif orientation == "as-is":
        rot = np.eye(3)
    else:
        # Angular momentum proxy from positions only (velocities are not part of StarParticles):
        # the axis of smallest second moment is the disk normal.
        w = galaxy.stars.mass_msun
        cov = (pos * w[:, None]).T @ pos / w.sum()
        _, vec = np.linalg.eigh(cov)
        normal = vec[:, 0]
        major = vec[:, 2]
        if orientation == "face-on":
            rot = np.stack([major, np.cross(normal, major), normal])
        else:  # edge-on: normal in the sky plane (y), line of sight along the middle axis
            rot = np.stack([major, normal, np.cross(major, normal)])
    # Orientation diagnostics
    w = galaxy.stars.mass_msun
    cov = (pos * w[:, None]).T @ pos / w.sum()
    _, vec = np.linalg.eigh(cov)
    normal_sky = rot @ vec[:, 0]
    incl = math.degrees(math.acos(min(1.0, abs(normal_sky[2]))))
    pa = math.degrees(math.atan2(normal_sky[1], normal_sky[0])) % 180.0
    return rot, (incl, pa)


def smoothing_lengths_kpc(galaxy: Galaxy, k: int, floor_kpc: float) -> np.ndarray:
    """Per-particle kernel FWHM in kpc: the simulation's smoothing length when provided, else
    the 3-D distance to the k-th nearest neighbour (scipy cKDTree)."""
    stars = galaxy.stars
    if stars.smoothing_length_kpc is not None:
        h = np.asarray(stars.smoothing_length_kpc, dtype=np.float64)
    else:
        from scipy.spatial import cKDTree

        kk = min(k, stars.n - 1)
        if kk < 1:
            return np.full(stars.n, floor_kpc)
        pos = np.ascontiguousarray(stars.position_kpc, dtype=np.float64)
        # Unbalanced (sliding-midpoint) tree: faster to build, same neighbours. Only the
        # (k+1)-th distance is asked for (``k=[k + 1]``; the first is the particle itself), and
        # the particles are queried in the tree's own order (consecutive queries walk the same
        # nodes: better cache use), then put back in input order. Distances are identical.
        tree = cKDTree(pos, balanced_tree=False)
        h = np.empty(stars.n)
        h[tree.indices] = tree.query(pos[tree.indices], k=[kk + 1])[0][:, 0]
    return np.maximum(h, floor_kpc)


def _paint_gaussians(x_pix, y_pix, flux, sigma, size) -> np.ndarray:
    """Reference deposition, (B, size, size): the exact sum of pixel-integrated 2-D Gaussians
    (each separable, so band j is ``Gy^T diag(flux_j) Gx`` with Gx[p, i] the fraction of
    particle p's light in column i from erf differences). O(N size^2): for tests and checks."""
    from scipy.special import erf

    edges = np.arange(size + 1, dtype=np.float64) - 0.5
    inv = 1.0 / (np.sqrt(2.0) * np.asarray(sigma, dtype=np.float64)[:, None])
    gx = np.diff(0.5 * erf((edges[None, :] - x_pix[:, None]) * inv), axis=1)
    gy = np.diff(0.5 * erf((edges[None, :] - y_pix[:, None]) * inv), axis=1)
    return np.stack([gy.T @ (flux[:, j, None] * gx) for j in range(flux.shape[1])])


def deposit(
    x_pix: np.ndarray, y_pix: np.ndarray, flux: np.ndarray, sigma_pix: np.ndarray, size: int,
    n_bins: int = 16,
) -> np.ndarray:
    """Deposit particles as 2-D Gaussians (``sigma_pix``) on a (B, size, size) grid.

    Particles with sigma < 0.5 px are deposited cloud-in-cell (bilinear, exact in flux). The
    others are grouped in ``n_bins`` logarithmic bins of kernel width (widths within a few per
    cent of their bin's geometric mean), each bin cloud-in-cell deposited and convolved with its
    Gaussian in Fourier space (exact transfer function exp(-2 pi^2 sigma^2 k^2), zero padding of
    4 sigma so nothing wraps around); the bins are summed in Fourier space and transformed back
    once. The cost is independent of the kernel widths. Flux falling outside the grid is lost, as
    it would fall outside the image. ``x_pix = 0`` is the centre of the first pixel.

    How (the same result, to float rounding, as transforming each bin in 2-D and back): the
    periodic convolution is separable. Along x, each bin's rows are real-FFT'd (only the rows it
    occupies) and multiplied by the transfer function, for the x frequencies where it exceeds
    e^-40 (~4e-18; the others are dropped, below float64 rounding of the flux). Along y, the
    same transfer function is applied as what it is in real space, a periodic convolution with
    its inverse DFT, restricted to the ``size`` output rows and the bin's occupied input rows:
    one real matrix product per bin for all bands. The bins are summed in that (y, k_x) domain
    and transformed back along x once. A bin on few rows and columns (narrow kernels near the
    centre) is instead smoothed along x as along y, by a second real matrix product, when
    that costs fewer operations.
    """
    import scipy.fft as sfft

    nb = flux.shape[1]
    grid = np.zeros((nb, size, size))
    if x_pix.size == 0:
        return grid
    flux = np.asarray(flux, dtype=np.float64)
    sig = np.maximum(np.asarray(sigma_pix, dtype=np.float64), 1e-3)
    smax = max(float(sig.max()), 0.5)
    edges = np.linspace(np.log(0.5), np.log(smax) + 1e-9, n_bins + 1)
    layer = np.clip(np.searchsorted(edges, np.log(sig), side="right"), 1, n_bins)
    layer[sig < 0.5] = 0  # layer 0: cloud-in-cell only
    n_layers = n_bins + 1
    # particles grouped by layer (stable: within a layer in input order)
    order = np.argsort(layer, kind="stable")
    bounds = np.searchsorted(layer[order], np.arange(n_layers + 1))
    # Cloud-in-cell: the 4 pixels around each particle and their bilinear weights, flattened
    # in that order (so each layer's corners are one slice); corners off the grid are dropped
    # (their flux is lost).
    x0 = np.floor(x_pix[order]).astype(np.int64)
    y0 = np.floor(y_pix[order]).astype(np.int64)
    fx = x_pix[order] - x0
    fy = y_pix[order] - y0
    cx = (x0[:, None] + np.array([0, 1, 0, 1])).ravel()
    cy = (y0[:, None] + np.array([0, 0, 1, 1])).ravel()
    cw = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1).ravel()
    ok = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
    cpart = np.repeat(order, 4)[ok]
    cx, cy, cw = cx[ok], cy[ok], cw[ok]
    cbounds = np.searchsorted(layer[cpart], np.arange(n_layers + 1))

    def cic(b: int, width: int | None = None):
        """Layer ``b`` on its own rows only: (first row, first column, (B, rows, columns)).
        ``width=None``: its own columns only too; else columns 0..width-1 (beyond ``size``:
        zero, the FFT padding)."""
        sel = slice(cbounds[b], cbounds[b + 1])
        y = cy[sel]
        x = cx[sel]
        lo = int(y.min())
        h = int(y.max()) - lo + 1
        left = 0
        if width is None:
            left = int(x.min())
            width = int(x.max()) - left + 1
        key = (y - lo) * width + (x - left)
        key = (key[None, :] + (np.arange(nb) * (h * width))[:, None]).ravel()
        wts = (cw[sel, None] * flux[cpart[sel]]).T.ravel()
        lay = np.bincount(key, weights=wts, minlength=nb * h * width).reshape(nb, h, width)
        return lo, left, lay

    if cbounds[1] > cbounds[0]:
        lo, _, lay = cic(0, size)
        grid[:, lo:lo + lay.shape[1]] += lay
    used = [b for b in range(1, n_layers) if cbounds[b + 1] > cbounds[b]]
    if not used:
        return grid
    pad = int(min(np.ceil(4.0 * smax), size))
    n_fft = sfft.next_fast_len(size + pad, real=True)
    kx = sfft.rfftfreq(n_fft)
    out = np.arange(size)

    def conv(kernel: np.ndarray, first: int, n: int) -> np.ndarray:
        return kernel[(out[:, None] - np.arange(first, first + n)[None, :]) % n_fft]

    # Sum over bins of the smoothed layers, Fourier-transformed along x only: (size, B, kx);
    # and of those smoothed entirely in real space: (size, B, size).
    acc = np.zeros((size, nb, kx.size), dtype=np.complex128)
    acc_real = np.zeros((size, nb, size))
    top = 0
    for b in used:
        s_b = float(np.exp(np.mean(np.log(sig[order[bounds[b]:bounds[b + 1]]]))))
        a = 2.0 * np.pi**2 * s_b**2
        transfer = np.exp(-a * kx**2)
        # exp(-a k^2) < e^-40 for |k| > sqrt(40 / a): those x frequencies are not computed
        m = min(kx.size, int(math.sqrt(40.0 / a) * n_fft) + 2)
        # The transfer function as what it is in real space, a periodic (n_fft) convolution
        # with its inverse DFT; conv(kernel, first, n): its matrix from n input rows (or
        # columns) starting at `first` to the `size` output ones.
        kernel = sfft.irfft(transfer, n=n_fft)
        lo, left, lay = cic(b, None)
        h, w = lay.shape[1:]
        # cost in multiply-adds of the two routes (an FFT point ~ 40 of them)
        via_fft = size * h * nb * 2 * m + 40 * nb * h * n_fft
        via_real = size * nb * w * (h + size)
        if via_real <= via_fft:
            # y then x, both as real matrix products (narrow kernels on compact layers)
            rows = conv(kernel, lo, h) @ np.ascontiguousarray(lay.transpose(1, 0, 2)).reshape(h, -1)
            acc_real += (rows.reshape(size * nb, w) @ conv(kernel, left, w).T).reshape(size, nb, size)
            continue
        # along x: real FFT of the layer's rows times the transfer function
        padded = np.zeros((nb, h, n_fft))
        padded[..., left:left + w] = lay
        fx_ = sfft.rfft(padded, axis=-1)[..., :m] * transfer[:m]  # (B, h, m)
        # along y: the real-space convolution for all bands and both complex parts at once
        rhs = np.ascontiguousarray(fx_.transpose(1, 0, 2)).view(np.float64).reshape(h, -1)
        acc[:, :, :m] += (conv(kernel, lo, h) @ rhs).view(np.complex128).reshape(size, nb, m)
        top = max(top, m)
    if top:  # back along x (acc is zero beyond column `top`)
        acc_real += sfft.irfft(acc[..., :top], n=n_fft, axis=-1)[..., :size]
    grid += acc_real.transpose(1, 0, 2)
    return grid


def render_galaxy(
    galaxy: Galaxy, survey: SurveySpec, config: RenderConfig = RenderConfig(), seed: int = 0,
) -> RenderedGalaxy:
    """Render ``galaxy`` as seen by ``survey``; deterministic in (galaxy, survey, config, seed)."""
    import galsim

    pix = survey.pixel_scale_arcsec
    stamp = int(config.stamp)
    geo_rng = galaxy_rng(seed, galaxy.object_id, "geometry")
    z = observation_redshift(galaxy, config, geo_rng)
    rot, (incl, pa) = rotation_matrix(galaxy, config.orientation, geo_rng)
    obs_rng = galaxy_rng(seed, galaxy.object_id, "observation", survey.name, *survey.band_names)

    # --- PSFs (possibly per-galaxy seeing) --------------------------------------------------
    fwhms = np.array([b.psf_fwhm_arcsec for b in survey.bands]) * config.psf_fwhm_scale
    # checked against the worst seeing any galaxy can get, so a job fails on its first galaxy
    worst = fwhms.max()
    if config.realism.enabled("seeing"):
        worst *= max_seeing_factor(survey.psf.seeing_scatter_dex)
        fwhms = draw_seeing(fwhms, survey.psf.seeing_scatter_dex, obs_rng)
    stamp_arcsec = stamp * pix
    if stamp_arcsec < 4 * worst:
        need = int(math.ceil(4 * worst / pix))
        raise Sim2ObsValueError(
            f"a {stamp}-pixel stamp ({stamp_arcsec:.2f}\") is smaller than 4 x the largest PSF "
            f"FWHM ({worst:.2f}\"{', with per-galaxy seeing' if config.realism.enabled('seeing') else ''}) "
            f"of survey '{survey.name}'; use --stamp {need} or larger"
        )
    psfs = [psf_profile(survey, b, f) for b, f in zip(survey.bands, fwhms, strict=True)]

    # --- per-particle fluxes ----------------------------------------------------------------
    filters = tuple(b.filter for b in survey.bands)
    table = band_flux_table(filters, z, galaxy.cosmology, config.ssp_library, config.dust)
    stars = galaxy.stars
    flux = table.flux_nmgy(stars.age_gyr, stars.metallicity, stars.initial_mass_msun)  # (N, B)
    total_flux = flux.sum(axis=0)

    # --- projection and deposition ----------------------------------------------------------
    scale = arcsec_per_kpc(z, galaxy.cosmology)
    xyz = stars.position_kpc @ rot.T
    fine = pix / config.oversample
    margin_arcsec = 3.0 * fwhms.max() + 2 * pix
    grid_n = int(math.ceil((stamp_arcsec + 2 * margin_arcsec) / fine))
    # GalSim puts the profile origin at the image's true centre, (n - 1) / 2 in 0-based pixel
    # coordinates, for both the deposition grid and the stamp: the galaxy centre lands there.
    centre = (grid_n - 1) / 2.0
    x_pix = xyz[:, 0] * scale / fine + centre
    y_pix = xyz[:, 1] * scale / fine + centre
    hsml = smoothing_lengths_kpc(galaxy, config.smoothing_k, config.min_smoothing_kpc)
    sigma_pix = hsml * scale / fine / 2.3548200450309493  # FWHM -> sigma
    grid = deposit(x_pix, y_pix, flux, sigma_pix, grid_n)

    # --- PSF convolution and drawing --------------------------------------------------------
    noiseless = np.zeros((len(survey.bands), stamp, stamp))
    psf_imgs = np.zeros((len(survey.bands), config.psf_stamp, config.psf_stamp))
    for j, psf in enumerate(psfs):
        psf_imgs[j] = psf_image(psf, pix, config.psf_stamp)
        if grid[j].sum() <= 0:
            continue
        gal = galsim.InterpolatedImage(
            galsim.ImageD(grid[j], scale=fine), x_interpolant="lanczos3",
            normalization="flux", calculate_stepk=False, calculate_maxk=False,
        )
        img = galsim.Convolve(gal, psf).drawImage(nx=stamp, ny=stamp, scale=pix, method="auto")
        noiseless[j] = img.array

    # --- noise ------------------------------------------------------------------------------
    image, ivar = apply_realism(noiseless, survey, config.realism, obs_rng, table=table,
                                psfs=psfs, redshift=z)

    labels = dict(galaxy.labels)
    labels["redshift"] = z
    labels["inclination_deg"] = incl
    labels["position_angle_deg"] = pa
    for j, b in enumerate(survey.bands):
        labels[f"mag_{b.name}"] = float(nmgy_to_mag(total_flux[j]))
        labels[f"psf_fwhm_{b.name}"] = float(fwhms[j])
    spectrum = None
    if config.spectra:
        spectrum = integrated_spectrum(galaxy, table, z)
    return RenderedGalaxy(
        object_id=galaxy.object_id,
        image=image.astype(np.float32),
        ivar=ivar.astype(np.float32),
        psf=psf_imgs.astype(np.float32),
        noiseless=noiseless.astype(np.float32) if config.store_noiseless else None,
        labels=labels,
        spectrum=spectrum,
    )


#: Flux unit of stored spectra (DESIGN.md): 1e-17 erg/s/cm^2/Å, as SDSS spectra.
SPECTRUM_UNIT_CGS = 1e-17


def integrated_spectrum(galaxy: Galaxy, table, redshift: float) -> np.ndarray:
    """Observed-frame integrated spectrum (units of 1e-17 erg/s/cm^2/Å) on the library grid
    shifted by (1+z). Particle masses are accumulated on the (Z, age) grid with the same
    mass-conserving weights as the photometry, so photometry and spectrum agree."""
    from sim2obs.forward_models.photometry import observed_f_lambda

    lib = table.library
    iz, ia, w = lib.weights(galaxy.stars.age_gyr, galaxy.stars.metallicity)
    mass_grid = np.zeros(lib.l_lambda.shape[:2])
    np.add.at(mass_grid, (iz, ia), w * galaxy.stars.initial_mass_msun[:, None])
    l_lam = np.tensordot(mass_grid, lib.l_lambda, axes=([0, 1], [0, 1]))
    _, f = observed_f_lambda(lib.wavelength_angstrom, l_lam, redshift, galaxy.cosmology)
    return (f / SPECTRUM_UNIT_CGS).astype(np.float32)
