"""Survey specs: built-ins load with surveycodex values, zeropoints, noise, user files, errors."""

import math

import pytest

from sim2obs.errors import Sim2ObsDataError, Sim2ObsFileNotFoundError, Sim2ObsKeyError
from sim2obs.forward_models.surveys import available_surveys, get_survey

EXPECTED = {"sdss": 5, "des": 5, "hsc": 5, "lsst": 6, "euclid": 4, "hst-cosmos": 1}


def test_all_issue_surveys_are_built_in():
    assert set(EXPECTED) <= set(available_surveys())
    for name, nb in EXPECTED.items():
        spec = get_survey(name)
        assert len(spec.bands) == nb
        assert spec.references, f"{name} must carry its references"


def test_values_come_from_surveycodex():
    import surveycodex

    hsc = get_survey("hsc")
    codex = surveycodex.get_survey("HSC")
    assert hsc.pixel_scale_arcsec == pytest.approx(codex.pixel_scale.to_value("arcsec"))
    i = hsc.band("i")
    assert i.zeropoint_mag == pytest.approx(codex.get_filter("i").zeropoint.value)
    assert i.psf_fwhm_arcsec == pytest.approx(codex.get_filter("i").psf_fwhm.value)


def test_electron_conversion_matches_zeropoint_definition():
    """A source at the zeropoint magnitude gives 1 e-/s, i.e. exposure_s electrons in total."""
    b = get_survey("lsst").band("r")
    flux_at_zp_nmgy = 10 ** (-0.4 * (b.zeropoint_mag - 22.5))
    assert flux_at_zp_nmgy * b.nmgy_to_electrons() == pytest.approx(b.exposure_s)


def test_sky_and_read_noise_per_pixel():
    spec = get_survey("sdss")
    b = spec.band("r")
    pix = spec.pixel_scale_arcsec
    sky_e = 10 ** (-0.4 * (b.sky_mag_arcsec2 - b.zeropoint_mag)) * pix**2 * b.exposure_s
    assert b.sky_electrons_per_pixel(pix) == pytest.approx(sky_e)
    assert b.read_variance_e2(pix) == pytest.approx(b.n_exposures * b.read_noise_e**2)


def test_resampled_band_keeps_noise_per_area():
    eu = get_survey("euclid")
    h = eu.band("H")
    # 0.3" native pixels on a 0.1" grid: variance per output pixel scales with area ratio 1/9
    assert h.read_variance_e2(0.1) == pytest.approx(h.n_exposures * h.read_noise_e**2 / 9)
    # total exposure = 4 dithers x surveycodex single exposure
    assert h.exposure_s == pytest.approx(4 * 112.0)


def test_immutability_and_band_subsets():
    hsc = get_survey("hsc")
    sub = hsc.with_bands(["i", "g"])
    assert sub.band_names == ("i", "g")
    assert hsc.band_names == ("g", "r", "i", "z", "y")
    with pytest.raises(AttributeError):
        hsc.pixel_scale_arcsec = 1.0  # frozen


def test_unknown_survey_and_band_errors():
    with pytest.raises(Sim2ObsKeyError, match="built-in surveys"):
        get_survey("nosuch")
    with pytest.raises(Sim2ObsKeyError, match="its bands are"):
        get_survey("hsc").band("K")
    with pytest.raises(Sim2ObsFileNotFoundError):
        get_survey("/no/such/survey.toml")


def test_user_survey_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        """
name = "mine"
pixel_scale_arcsec = 0.25
read_noise_e = 3.0
gain_e_per_adu = 1.5
[psf]
kind = "moffat"
moffat_beta = 3.5
[bands.r]
filter = "decam2014-r"
zeropoint_mag = 27.0
sky_mag_arcsec2 = 21.0
exposure_s = 300
psf_fwhm_arcsec = 0.9
"""
    )
    spec = get_survey(path)
    assert spec.band("r").psf_fwhm_arcsec == 0.9
    assert spec.psf.moffat_beta == 3.5
    yml = tmp_path / "mine.yaml"
    yml.write_text(
        "name: y\npixel_scale_arcsec: 0.2\nread_noise_e: 1\ngain_e_per_adu: 1\n"
        "bands:\n  g:\n    filter: hsc2017-g\n    zeropoint_mag: 28\n    sky_mag_arcsec2: 22\n"
        "    exposure_s: 100\n    psf_fwhm_arcsec: 0.7\n"
    )
    assert get_survey(yml).band_names == ("g",)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\npixel_scale_arcsec = 0.2\nread_noise_e = 1\ngain_e_per_adu = 1\n'
                   '[bands.r]\nfilter = "decam2014-r"\n')
    with pytest.raises(Sim2ObsDataError, match="band 'r' needs 'exposure_s'"):
        get_survey(bad)
    nan = tmp_path / "nan.toml"
    nan.write_text(path.read_text().replace("psf_fwhm_arcsec = 0.9", "psf_fwhm_arcsec = nan"))
    with pytest.raises(Sim2ObsDataError, match="finite"):
        get_survey(nan)
    assert not math.isnan(get_survey(path).band("r").zeropoint_mag)
