"""PSFs: FWHM equals the survey value, images normalised, space PSFs diffraction-limited."""

import numpy as np
import pytest

from sim2obs.forward_models.psf import measure_fwhm, psf_image, psf_profile
from sim2obs.forward_models.surveys import available_surveys, get_survey

CASES = [(s, b.name) for s in available_surveys() for b in get_survey(s).bands]


@pytest.mark.parametrize("survey_name,band_name", CASES)
def test_psf_fwhm_matches_survey_value(survey_name, band_name):
    """Measured FWHM (GalSim's calculateFWHM on a fine grid, no pixel) within 2 %."""
    spec = get_survey(survey_name)
    band = spec.band(band_name)
    prof = psf_profile(spec, band)
    measured = measure_fwhm(prof, band.psf_fwhm_arcsec / 40)
    assert measured == pytest.approx(band.psf_fwhm_arcsec, rel=0.02)


def test_psf_image_sums_to_one_and_is_centred():
    spec = get_survey("hsc")
    img = psf_image(psf_profile(spec, spec.band("i")), spec.pixel_scale_arcsec, 25)
    assert img.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.unravel_index(np.argmax(img), img.shape) == (12, 12)
    np.testing.assert_allclose(img, img[::-1, ::-1], atol=1e-6)  # symmetric profile


def test_seeing_override_changes_width():
    spec = get_survey("sdss")
    band = spec.band("r")
    wide = measure_fwhm(psf_profile(spec, band, 2.0), 0.05)
    assert wide == pytest.approx(2.0, rel=0.02)


def test_space_psf_contains_airy_core():
    """HST F814W: the Airy core alone (lambda/D = 0.07") is narrower than the survey FWHM, so a
    jitter term is added; the profile shows the first Airy ring's dip."""
    spec = get_survey("hst-cosmos")
    band = spec.band("F814W")
    prof = psf_profile(spec, band)
    img = prof.drawImage(nx=201, ny=201, scale=0.005, method="no_pixel").array
    profile = img[100, 100:]
    # monotonic decline in the core, then not monotonic (ring) further out
    assert np.all(np.diff(profile[:8]) < 0)
    assert np.any(np.diff(profile[10:60]) > 0)
