"""Survey PSFs as GalSim objects, and their images at the cutout pixel scale.

Ground surveys: Kolmogorov (Fried 1966; ``galsim.Kolmogorov``) or Moffat (Moffat 1969;
``galsim.Moffat``) with the band's FWHM. Space surveys: the Airy pattern of the obscured aperture
(``galsim.Airy`` at the band's effective wavelength) convolved with a Gaussian standing for
pointing jitter and detector charge diffusion, its width solved so that the total FWHM equals
the survey's median FWHM.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from sim2obs.errors import Sim2ObsValueError
from sim2obs.forward_models.surveys import Band, SurveySpec


def _airy(survey: SurveySpec, band: Band):
    import galsim

    if not band.effective_wavelength_nm:
        raise Sim2ObsValueError(
            f"survey '{survey.name}' band '{band.name}': an Airy PSF needs effective_wavelength_nm"
        )
    return galsim.Airy(lam=band.effective_wavelength_nm, diam=survey.mirror_diameter_m,
                       obscuration=survey.obscuration, scale_unit=galsim.arcsec)


def measure_fwhm(profile, pixel_scale_arcsec: float) -> float:
    """FWHM (arcsec) of a GalSim profile drawn without pixel on a fine grid (GalSim's own
    ``Image.calculateFWHM``)."""
    fine = pixel_scale_arcsec
    img = profile.drawImage(nx=257, ny=257, scale=fine, method="no_pixel")
    return float(img.calculateFWHM())


@lru_cache(maxsize=256)
def _jitter_sigma(lam_nm: float, diam_m: float, obscuration: float, fwhm_arcsec: float) -> float:
    """Gaussian sigma (arcsec) such that FWHM(Airy (x) Gaussian) = fwhm_arcsec (0 if the Airy
    core alone is already as wide)."""
    import galsim
    from scipy.optimize import brentq

    airy = galsim.Airy(lam=lam_nm, diam=diam_m, obscuration=obscuration, scale_unit=galsim.arcsec)
    fine = fwhm_arcsec / 40.0

    def excess(sigma):
        prof = airy if sigma <= 0 else galsim.Convolve(airy, galsim.Gaussian(sigma=sigma))
        return measure_fwhm(prof, fine) - fwhm_arcsec

    if excess(0.0) >= 0:
        return 0.0
    return float(brentq(excess, 1e-4 * fwhm_arcsec, fwhm_arcsec, xtol=1e-5 * fwhm_arcsec))


def psf_profile(survey: SurveySpec, band: Band, fwhm_arcsec: float | None = None):
    """GalSim profile of the PSF of ``band`` (without the pixel), at ``fwhm_arcsec`` if given
    (e.g. a per-galaxy seeing draw), else at the band's median FWHM."""
    import galsim

    fwhm = float(fwhm_arcsec if fwhm_arcsec is not None else band.psf_fwhm_arcsec)
    if not fwhm > 0:
        raise Sim2ObsValueError(f"PSF FWHM must be positive, got {fwhm}")
    kind = survey.psf.kind
    if kind == "kolmogorov":
        return galsim.Kolmogorov(fwhm=fwhm)
    if kind == "moffat":
        return galsim.Moffat(beta=survey.psf.moffat_beta, fwhm=fwhm)
    if kind == "gaussian":
        return galsim.Gaussian(fwhm=fwhm)
    airy = _airy(survey, band)
    sigma = _jitter_sigma(band.effective_wavelength_nm, survey.mirror_diameter_m,
                          survey.obscuration, round(fwhm, 6))
    return airy if sigma == 0 else galsim.Convolve(airy, galsim.Gaussian(sigma=sigma))


def psf_image(profile, pixel_scale_arcsec: float, size: int) -> np.ndarray:
    """The PSF convolved with the pixel response, sampled at the cutout pixel scale on a
    ``size`` x ``size`` grid (odd size: centred on the central pixel), normalised to sum 1.

    Drawn once per (profile, scale, size) in a process: GalSim profiles compare and hash by
    value, so every galaxy rendered with the same PSF reuses the drawing (a fresh copy)."""
    return _psf_image(profile, float(pixel_scale_arcsec), int(size)).copy()


@lru_cache(maxsize=64)
def _psf_image(profile, pixel_scale_arcsec: float, size: int) -> np.ndarray:
    img = profile.drawImage(nx=size, ny=size, scale=pixel_scale_arcsec, method="auto")
    arr = img.array.astype(np.float64)
    arr = arr / arr.sum()
    arr.setflags(write=False)
    return arr
