"""Realism effects: noise levels, correlations, contaminants, artifacts, seeing draws."""

import numpy as np
import pytest

from sim2obs.errors import Sim2ObsValueError
from sim2obs.forward_models.photometry import band_flux_table
from sim2obs.forward_models.psf import psf_profile
from sim2obs.forward_models.realism import (
    EFFECTS,
    RealismConfig,
    apply_realism,
    draw_seeing,
    point_source_depth_mag,
)
from sim2obs.forward_models.surveys import get_survey


def empty(survey, size=128):
    return np.zeros((len(survey.bands), size, size))


def predicted_var_nmgy2(survey, band):
    e = band.nmgy_to_electrons()
    pix = survey.pixel_scale_arcsec
    return (band.sky_electrons_per_pixel(pix) + band.read_variance_e2(pix)) / e**2


@pytest.mark.parametrize("survey_name", ["hsc", "hst-cosmos"])
def test_correlated_noise_keeps_pixel_variance_and_correlates_neighbours(survey_name):
    spec = get_survey(survey_name)
    cfg = RealismConfig.from_level("observed", ["correlated_noise"])
    img, ivar = apply_realism(empty(spec), spec, cfg, np.random.default_rng(0))
    white, _ = apply_realism(empty(spec), spec, RealismConfig(), np.random.default_rng(0))
    for j, b in enumerate(spec.bands):
        var = predicted_var_nmgy2(spec, b)
        assert img[j].var() == pytest.approx(var, rel=0.1)
        np.testing.assert_allclose(1 / ivar[j], var, rtol=1e-6)
        corr = np.corrcoef(img[j][:, :-1].ravel(), img[j][:, 1:].ravel())[0, 1]
        corr_white = np.corrcoef(white[j][:, :-1].ravel(), white[j][:, 1:].ravel())[0, 1]
        assert corr > 0.1
        assert abs(corr_white) < 0.05


def test_artifacts_are_masked():
    spec = get_survey("sdss")  # single exposures: cosmic rays survive
    cfg = RealismConfig.from_level("observed", ["artifacts"])
    masked = 0
    for seed in range(10):
        img, ivar = apply_realism(empty(spec, 64), spec, cfg, np.random.default_rng(seed))
        masked += int((ivar == 0).sum())
        # every extreme pixel is masked
        for j in range(len(spec.bands)):
            sigma = 1 / np.sqrt(ivar[j].max())
            assert np.all(ivar[j][np.abs(img[j]) > 8 * sigma] == 0)
    assert masked > 0


def test_neighbours_and_stars_add_flux_off_centre():
    spec = get_survey("sdss")
    table = band_flux_table(tuple(b.filter for b in spec.bands), 0.1)
    psfs = [psf_profile(spec, b) for b in spec.bands]
    cfg = RealismConfig.from_level("observed", ["neighbours", "stars"])
    found = 0
    for seed in range(5):
        img, _ = apply_realism(empty(spec, 64), spec, cfg, np.random.default_rng(seed),
                               table=table, psfs=psfs, redshift=0.1)
        base, _ = apply_realism(empty(spec, 64), spec, RealismConfig(), np.random.default_rng(seed))
        found += int(img[2].sum() > base[2].sum() + 5 * np.sqrt(predicted_var_nmgy2(spec, spec.bands[2]) * 64 * 64))
    assert found >= 2  # SDSS stamps (25") at SDSS depth usually hold a neighbour


def test_sky_residuals_shift_the_background():
    spec = get_survey("hsc")
    cfg = RealismConfig.from_level("observed", ["sky_residuals"])
    means = [apply_realism(empty(spec, 64), spec, cfg, np.random.default_rng(s))[0][0].mean()
             for s in range(20)]
    sigma = np.sqrt(predicted_var_nmgy2(spec, spec.bands[0]))
    # offsets of ~0.2 sigma dominate the ~sigma/64 noise on the mean
    assert np.std(means) > 0.05 * sigma


def test_seeing_draw_statistics():
    rng = np.random.default_rng(0)
    base = np.array([0.8, 0.7])
    draws = np.array([draw_seeing(base, 0.08, rng) for _ in range(4000)])
    logs = np.log10(draws / base)
    assert np.median(draws[:, 0]) == pytest.approx(0.8, rel=0.02)
    assert logs[:, 0].std() == pytest.approx(np.hypot(0.08, 0.08 / 3), rel=0.1)
    assert np.corrcoef(logs.T)[0, 1] > 0.8  # bands share the night's seeing


def test_depth_is_sensible():
    """HSC Wide i-band 5-sigma point-source depth ~26 (Aihara et al. 2018, PASJ 70, S4: 26.2)."""
    spec = get_survey("hsc")
    assert point_source_depth_mag(spec.band("i"), spec.pixel_scale_arcsec, 0.61) == pytest.approx(26.2, abs=0.6)
    sdss = get_survey("sdss")
    # SDSS r 95 % completeness for point sources 22.2 (Abazajian et al. 2004)
    assert point_source_depth_mag(sdss.band("r"), sdss.pixel_scale_arcsec, 1.32) == pytest.approx(22.7, abs=0.6)


def test_config_validation():
    assert RealismConfig.from_level("observed").effects == frozenset(EFFECTS)
    assert RealismConfig().effects == frozenset()
    with pytest.raises(Sim2ObsValueError, match="unknown realism effect"):
        RealismConfig("observed", frozenset({"rain"}))
    with pytest.raises(Sim2ObsValueError, match="level"):
        RealismConfig("extreme")


def test_seeing_draws_are_bounded():
    from sim2obs.forward_models.realism import max_seeing_factor

    rng = np.random.default_rng(3)
    base = np.array([0.7, 0.6, 0.8])
    draws = np.array([draw_seeing(base, 0.08, rng) for _ in range(20000)])
    assert (draws / base).max() <= max_seeing_factor(0.08) * (1 + 1e-12)
    assert (draws / base).max() > 1.5  # the bound is reached in the tail, not far inside it
