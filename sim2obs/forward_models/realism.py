"""Noise and the observing effects that real cutouts have.

``basic`` realism: sky background, source Poisson noise and read noise via ``galsim.CCDNoise``
in electrons, then background-subtracted and converted to nanomaggies; the inverse variance is
that of the background (sky + read noise), as in survey weight maps.

``observed`` realism switches on, each by name (``--realism-effects`` to choose):

* ``seeing``: per-galaxy PSF FWHM, lognormal around the band median with the survey's scatter;
* ``correlated_noise``: background noise with the pixel correlations of a resampled coadd
  (ground: white noise convolved with a resampling kernel; HST: GalSim's measured COSMOS
  correlation function, ``galsim.getCOSMOSNoise``);
* ``neighbours``: other galaxies in the stamp (Sérsic profiles; counts following the deep
  I-band number counts of Metcalfe et al. 2001, MNRAS 323, 795);
* ``stars``: point sources (high-latitude star counts, Bahcall & Soneira 1980, ApJS 44, 73);
* ``sky_residuals``: an imperfectly subtracted background (offset and gradient);
* ``artifacts``: cosmic-ray hits and a bad column, flagged with ``ivar = 0``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from sim2obs.errors import Sim2ObsValueError

EFFECTS = ("seeing", "correlated_noise", "neighbours", "stars", "sky_residuals", "artifacts")
LEVELS = ("basic", "observed")

#: Cumulative galaxy counts N(<I) = 42 arcmin^-2 at I_AB = 24 with slope dlogN/dm = 0.3 (Metcalfe
#: et al. 2001, MNRAS 323, 795, fig. 14, I band, 20 < I < 26).
GALAXY_COUNTS_AT_24_ARCMIN2 = 42.0
GALAXY_COUNTS_SLOPE = 0.3
#: High-latitude star counts: ~1 star arcmin^-2 brighter than V = 24 with dlogN/dm ~ 0.1
#: (Bahcall & Soneira 1980, ApJS 44, 73, table 2 at b = 90 deg, faint end).
STAR_COUNTS_AT_24_ARCMIN2 = 1.0
STAR_COUNTS_SLOPE = 0.1
#: Cosmic-ray rate on CCDs at ground level: ~1.5-2 events cm^-2 min^-1 (Groom 2004, Exp. Astron.
#: 14, 45). With 15 micron pixels a 64x64 single exposure of ~1 min sees ~0.2 events; coadds
#: reject most of them, residual hits scale as 1/n_exposures.
CR_EVENTS_PER_MPIX_PER_EXPOSURE = 50.0


@dataclass(frozen=True)
class RealismConfig:
    """Which observing effects to add (``level='basic'``: noise only)."""

    level: str = "basic"
    effects: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise Sim2ObsValueError(f"realism level must be one of {LEVELS}, got '{self.level}'")
        eff = frozenset(self.effects)
        unknown = eff - set(EFFECTS)
        if unknown:
            raise Sim2ObsValueError(f"unknown realism effect(s) {sorted(unknown)}; known: {list(EFFECTS)}")
        object.__setattr__(self, "effects", eff)

    @classmethod
    def from_level(cls, level: str, effects=None) -> RealismConfig:
        """``observed`` enables every effect unless ``effects`` (names) restricts them."""
        if level == "basic":
            return cls("basic", frozenset(effects or ()))
        return cls(level, frozenset(EFFECTS if effects is None else effects))

    def enabled(self, name: str) -> bool:
        return name in self.effects

    def to_dict(self) -> dict:
        return {"level": self.level, "effects": sorted(self.effects)}


#: Seeing draws are truncated at this many standard deviations: survey programmes re-observe
#: fields taken in poor seeing (HSC-SSP requires i-band seeing < ~0.8", Aihara et al. 2018,
#: PASJ 70, S4, sec. 3), so the real distribution has no unbounded tail; a bound also lets the
#: stamp size be checked before rendering.
SEEING_TRUNCATION_SIGMA = 3.0


def draw_seeing(fwhm_arcsec: np.ndarray, scatter_dex: float, rng: np.random.Generator) -> np.ndarray:
    """Per-galaxy PSF FWHM per band: a common lognormal factor (the night's seeing) times a
    smaller independent per-band factor (bands taken at different times), each truncated at
    :data:`SEEING_TRUNCATION_SIGMA`."""
    t = SEEING_TRUNCATION_SIGMA
    common = np.clip(rng.normal(0.0, scatter_dex), -t * scatter_dex, t * scatter_dex)
    per_band = np.clip(rng.normal(0.0, scatter_dex / 3.0, size=len(fwhm_arcsec)),
                       -t * scatter_dex / 3.0, t * scatter_dex / 3.0)
    return np.asarray(fwhm_arcsec) * 10 ** (common + per_band)


def max_seeing_factor(scatter_dex: float) -> float:
    """The largest factor :func:`draw_seeing` can apply to a band's median FWHM."""
    return float(10 ** (SEEING_TRUNCATION_SIGMA * scatter_dex * (1 + 1 / 3)))


def point_source_depth_mag(band, pixel_scale_arcsec: float, fwhm_arcsec: float) -> float:
    """5-sigma AB depth of a point source in a circular aperture of diameter 2 x FWHM with
    background-limited noise (sky + read), used to limit the contaminants we draw."""
    e = band.nmgy_to_electrons()
    var_pix = band.sky_electrons_per_pixel(pixel_scale_arcsec) + band.read_variance_e2(pixel_scale_arcsec)
    n_pix = np.pi * fwhm_arcsec**2 / pixel_scale_arcsec**2
    sigma_nmgy = np.sqrt(var_pix * n_pix) / e
    return float(22.5 - 2.5 * np.log10(5 * sigma_nmgy))


#: Coadd resampling correlation: warping exposures onto the coadd grid (Lanczos-3 at random
#: sub-pixel shifts, Bosch et al. 2018, PASJ 70, S5, sec. 3.3) acts on the noise like a
#: convolution with a narrow kernel; a Gaussian of 0.4 pixel sigma gives a nearest-neighbour
#: correlation of ~0.3, comparable to what such coadds show.
RESAMPLING_KERNEL_SIGMA_PIX = 0.4


def _resampling_noise(pixel_scale_arcsec: float, variance: float, rng):
    """White noise convolved with the resampling kernel (GalSim's analytic correlated-noise
    model), rescaled to the requested per-pixel variance."""
    import galsim

    white = galsim.UncorrelatedNoise(1.0, rng=rng, scale=pixel_scale_arcsec)
    kernel = galsim.Gaussian(sigma=RESAMPLING_KERNEL_SIGMA_PIX * pixel_scale_arcsec)
    return white.convolvedWith(kernel).withVariance(variance)


@functools.lru_cache(maxsize=32)
def _unit_correlated_noise(kind: str, pixel_scale_arcsec: float):
    """The unit-variance correlated-noise model of a survey, built once per process: GalSim
    caches the square root of its power spectrum per image shape on the object, which makes
    later draws ~10x cheaper than building the model for every galaxy and band."""
    import galsim

    if kind == "cosmos":
        return galsim.getCOSMOSNoise(rng=galsim.BaseDeviate(1), cosmos_scale=0.03, variance=1.0)
    return _resampling_noise(pixel_scale_arcsec, 1.0, galsim.BaseDeviate(1))


def _correlated_noise(survey, variance: float, rng):
    kind = "cosmos" if survey.psf.correlated_noise == "cosmos" else "resampling"
    return _unit_correlated_noise(kind, float(survey.pixel_scale_arcsec)).withVariance(variance).copy(rng=rng)


def _galsim_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(1, 2**31 - 1))


def apply_realism(
    noiseless_nmgy: np.ndarray, survey, realism: RealismConfig, rng: np.random.Generator,
    table=None, psfs=None, redshift: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add contaminants and noise to a (B, H, W) noiseless stamp in nanomaggies.

    Returns ``(image_nmgy, ivar_nmgy^-2)``, both (B, H, W) float64. ``table`` (the galaxy's
    band-flux table) and ``psfs`` (one GalSim PSF per band) are needed for neighbours and stars.
    """
    import galsim

    nb, ny, nx = noiseless_nmgy.shape
    pix = survey.pixel_scale_arcsec
    scene = np.array(noiseless_nmgy, dtype=np.float64)
    if realism.enabled("neighbours") or realism.enabled("stars"):
        if table is None or psfs is None:
            raise Sim2ObsValueError("neighbours/stars need the band-flux table and PSFs")
        scene += _contaminants(survey, realism, rng, table, psfs, (ny, nx))
    image = np.empty_like(scene)
    ivar = np.empty_like(scene)
    for j, band in enumerate(survey.bands):
        e_per_nmgy = band.nmgy_to_electrons()
        sky_e = band.sky_electrons_per_pixel(pix)
        read_var = band.read_variance_e2(pix)
        var_bg = sky_e + read_var
        img = galsim.ImageD(np.clip(scene[j], 0, None) * e_per_nmgy, scale=pix)
        dev = galsim.BaseDeviate(_galsim_seed(rng))
        if realism.enabled("correlated_noise"):
            # Source shot noise, then background noise with the coadd's pixel correlations.
            img.addNoise(galsim.PoissonNoise(dev, sky_level=0.0))
            img.addNoise(_correlated_noise(survey, var_bg, galsim.BaseDeviate(_galsim_seed(rng))))
        else:
            img.addNoise(galsim.CCDNoise(dev, sky_level=sky_e, gain=1.0, read_noise=np.sqrt(read_var)))
        arr = img.array.copy()
        weight = np.full((ny, nx), e_per_nmgy**2 / var_bg)
        if realism.enabled("sky_residuals"):
            arr += _sky_residual(np.sqrt(var_bg), (ny, nx), rng)
        if realism.enabled("artifacts"):
            _artifacts(arr, weight, band, np.sqrt(var_bg), rng)
        image[j] = arr / e_per_nmgy
        ivar[j] = weight
    return image, ivar


def _sky_residual(sigma_e: float, shape, rng) -> np.ndarray:
    """Offset plus gradient, each ~0.2 sigma of the pixel noise: typical of local-sky
    subtraction errors around bright galaxies (Aihara et al. 2019, PASJ 71, 114, sec. 4.1)."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    a0, ax, ay = rng.normal(0.0, 0.2 * sigma_e, size=3)
    return a0 + ax * (xx / nx - 0.5) * 2 + ay * (yy / ny - 0.5) * 2


def _artifacts(arr, weight, band, sigma_e: float, rng) -> None:
    """Cosmic-ray residuals and, with 10 % probability, one bad column; both get ivar = 0."""
    ny, nx = arr.shape
    rate = CR_EVENTS_PER_MPIX_PER_EXPOSURE * nx * ny / 1e6 * (band.exposure_s / band.n_exposures / 60.0)
    n_cr = rng.poisson(rate / band.n_exposures)
    for _ in range(n_cr):
        length = rng.integers(1, 6)
        ang = rng.uniform(0, np.pi)
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        for t in range(length):
            x = int(x0 + t * np.cos(ang))
            y = int(y0 + t * np.sin(ang))
            if 0 <= x < nx and 0 <= y < ny:
                arr[y, x] += rng.uniform(20, 200) * sigma_e
                weight[y, x] = 0.0
    if rng.random() < 0.1:
        col = rng.integers(0, nx)
        arr[:, col] = 0.0
        weight[:, col] = 0.0


def _contaminants(survey, realism, rng, table, psfs, shape) -> np.ndarray:
    """Noiseless image (B, H, W) of neighbouring galaxies and stars, nanomaggies."""
    import galsim

    from sim2obs.forward_models.photometry import band_flux_table

    ny, nx = shape
    pix = survey.pixel_scale_arcsec
    area_arcmin2 = nx * ny * pix**2 / 3600.0
    ref = len(survey.bands) - 1  # reddest band sets the magnitudes
    depth = point_source_depth_mag(survey.bands[ref], pix, survey.bands[ref].psf_fwhm_arcsec)
    out = np.zeros((len(survey.bands), ny, nx))
    lib = table.library

    def colours(flux_table, age_lo, age_hi):
        age = 10 ** rng.uniform(np.log10(age_lo), np.log10(age_hi))
        z = 10 ** rng.uniform(np.log10(0.004), np.log10(0.03))
        f = lib.interpolate(flux_table.flux_nmgy_per_msun, np.array([age]), np.array([z]))[0]
        return f / f[ref]

    def draw_mags(n_at_24, slope, bright):
        faint = depth + 0.5
        n_mean = n_at_24 * 10 ** (slope * (faint - 24.0)) * area_arcmin2
        n = rng.poisson(n_mean)
        # inverse-CDF sampling of N(<m) ~ 10^(slope m) between bright and faint
        u = rng.uniform(10 ** (slope * (bright - faint)), 1.0, size=n)
        return faint + np.log10(u) / slope

    def position():
        # anywhere in the stamp but outside the central 4 pixels, where the target sits
        while True:
            dx, dy = rng.uniform(-nx / 2, nx / 2), rng.uniform(-ny / 2, ny / 2)
            if dx * dx + dy * dy > 16:
                return dx, dy

    if realism.enabled("neighbours"):
        for m in draw_mags(GALAXY_COUNTS_AT_24_ARCMIN2, GALAXY_COUNTS_SLOPE, 18.0):
            col = colours(table, 0.3, 10.0)
            # Size-magnitude: r_e ~ 0.5" at m = 22, 0.2 dex shallower per mag (Bernstein et al.
            # 2002 style scaling of faint-galaxy sizes; adequate for contaminants).
            r_e = 0.5 * 10 ** (-0.1 * (m - 22.0)) * 10 ** rng.normal(0, 0.15)
            n_s = rng.uniform(0.8, 4.0)
            q = rng.uniform(0.3, 1.0)
            prof = galsim.Sersic(n=n_s, half_light_radius=r_e, flux=1.0).shear(
                q=q, beta=rng.uniform(0, np.pi) * galsim.radians)
            dx, dy = position()
            f_ref = 10 ** (-0.4 * (m - 22.5))
            for j, psf in enumerate(psfs):
                img = galsim.Convolve(prof.withFlux(f_ref * col[j]), psf).drawImage(
                    nx=nx, ny=ny, scale=pix, offset=(dx, dy), method="auto")
                out[j] += img.array
    if realism.enabled("stars"):
        star_table = band_flux_table(table.filters, None, table.cosmology)
        for m in draw_mags(STAR_COUNTS_AT_24_ARCMIN2, STAR_COUNTS_SLOPE, 16.0):
            col = colours(star_table, 1.0, 12.0)
            dx, dy = position()
            f_ref = 10 ** (-0.4 * (m - 22.5))
            for j, psf in enumerate(psfs):
                img = psf.withFlux(f_ref * col[j]).drawImage(
                    nx=nx, ny=ny, scale=pix, offset=(dx, dy), method="auto")
                out[j] += img.array
    return out
