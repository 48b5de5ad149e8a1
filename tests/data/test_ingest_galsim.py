"""GalSim RealGalaxyCatalog ingestion: a tiny catalogue in GalSim's format written here (GalSim's
own test data is not installed), read through galsim.RealGalaxyCatalog; fluxes and ivar against
hand-computed values, PSF normalisation, ids, provenance, and refusal of bad input."""

import numpy as np
import pytest
from astropy.io import fits

from sim2obs.cli import main
from sim2obs.data.ingest import IngestError, IngestOptions
from sim2obs.data.ingest_galsim import catalog_zeropoint, ingest_galsim_catalog
from sim2obs.data.shards import read_folder
from sim2obs.errors import Sim2ObsFileNotFoundError

# counts/s -> nanomaggies at AB zeropoint 25.94: 10^(-0.4 (25.94 - 22.5)) = 10^(-1.376)
MULT = 0.0420726628
FLUXES = (200.0, 50.0, 10.0)          # counts/s
SIZES = (48, 40, 20)                  # native stamps (even, so a 32-pixel stamp is an exact cut)
IDENTS = (141190, 92000, 5)
VAR = 4.0e-5                          # (counts/s)^2 per pixel
STAMP = 32


def _gauss(n, flux, sigma=2.5):
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2                    # GalSim's true centre
    g = np.exp(-0.5 * ((xx - c) ** 2 + (yy - c) ** 2) / sigma**2)
    return flux * g / g.sum()


def _make_catalog(d, scale=0.03, noise_file=False, sizes=SIZES, psf_size=31, name="real_galaxy_catalog_test.fits"):
    d.mkdir(parents=True, exist_ok=True)
    fits.HDUList([fits.PrimaryHDU(_gauss(n, f).astype(np.float32)) if i == 0 else
                  fits.ImageHDU(_gauss(n, f).astype(np.float32))
                  for i, (n, f) in enumerate(zip(sizes, FLUXES, strict=True))]).writeto(d / "gals.fits")
    psf = 3.0 * _gauss(psf_size, 1.0, sigma=1.5)   # not normalised on purpose
    fits.HDUList([fits.PrimaryHDU(psf)] + [fits.ImageHDU(psf) for _ in sizes[1:]]).writeto(d / "psfs.fits")
    k = len(sizes)
    cols = [
        fits.Column("IDENT", "J", array=np.array(IDENTS[:k])),
        fits.Column("RA", "D", array=np.full(k, 150.1)), fits.Column("DEC", "D", array=np.full(k, 2.2)),
        fits.Column("MAG", "D", array=25.94 - 2.5 * np.log10(FLUXES[:k])),
        fits.Column("BAND", "5A", array=["F814W"] * k),
        fits.Column("WEIGHT", "D", array=np.ones(k)),
        fits.Column("GAL_FILENAME", "20A", array=["gals.fits"] * k),
        fits.Column("PSF_FILENAME", "20A", array=["psfs.fits"] * k),
        fits.Column("GAL_HDU", "J", array=np.arange(k)), fits.Column("PSF_HDU", "J", array=np.arange(k)),
        fits.Column("PIXEL_SCALE", "D", array=np.full(k, scale)),
        fits.Column("NOISE_MEAN", "D", array=np.zeros(k)),
        fits.Column("NOISE_VARIANCE", "D", array=np.full(k, VAR)),
        fits.Column("STAMP_FLUX", "D", array=np.array(FLUXES[:k])),
    ]
    if noise_file:
        fits.PrimaryHDU(np.ones((5, 5))).writeto(d / "noise.fits")
        cols.append(fits.Column("NOISE_FILENAME", "20A", array=["noise.fits"] * k))
    fits.BinTableHDU.from_columns(cols).writeto(d / name)
    return d / name


def test_zeropoint_hand_computed():
    zp, rec = catalog_zeropoint("F814W")
    assert zp == 25.94 and 10 ** (-0.4 * (zp - 22.5)) == pytest.approx(MULT, rel=1e-9)
    assert "galaxy_sample.py" in rec["method"]
    assert catalog_zeropoint("F606W")[0] == pytest.approx(26.49113)      # GalSim's ACS table
    assert catalog_zeropoint("F814W", zeropoint=22.5)[0] == 22.5
    with pytest.raises(LookupError, match="--zeropoint"):
        catalog_zeropoint("Y")


def test_fluxes_ivar_psf_ids_provenance(tmp_path):
    cat = _make_catalog(tmp_path / "cosmos", noise_file=True)
    paths, skipped = ingest_galsim_catalog(cat.name, tmp_path / "out", IngestOptions(stamp=STAMP),
                                           image_dir=tmp_path / "cosmos")
    assert not skipped and len(paths) == 1
    s = read_folder(tmp_path / "out")
    assert s.images.shape == (3, 1, STAMP, STAMP) and s.bands == ("F814W",)
    assert s.attrs.survey == "hst-cosmos" and s.attrs.domain == "real" and s.attrs.flux_unit == "nanomaggy"
    assert s.attrs.pixel_scale_arcsec == pytest.approx(0.03)
    assert list(s.labels["object_id"]) == list(IDENTS)
    # exact whole-pixel cut keeps the true centre: compare with the hand-cut native image
    for k, (n, f) in enumerate(zip(SIZES, FLUXES, strict=True)):
        native = _gauss(n, f) * MULT
        if n >= STAMP:
            o = (n - STAMP) // 2
            expect = native[o:o + STAMP, o:o + STAMP]
        else:
            expect = np.zeros((STAMP, STAMP))
            o = (STAMP - n) // 2
            expect[o:o + n, o:o + n] = native
        np.testing.assert_allclose(s.images[k, 0], expect, rtol=1e-5, atol=1e-9)
    # galaxy 1 (40 px, fully inside the 32-pixel stamp to 1e-4): total flux 50 counts/s in nmgy
    assert s.images[1, 0].sum() == pytest.approx(50.0 * MULT, rel=1e-4)
    # ivar = 1 / (VAR * MULT^2) inside the native footprint, 0 in padding
    iv = 1.0 / (VAR * MULT**2)
    np.testing.assert_allclose(s.ivar[0, 0], iv, rtol=1e-5)
    o = (STAMP - SIZES[2]) // 2
    assert np.all(s.ivar[2, 0, :o] == 0) and np.all(s.ivar[2, 0, o:o + SIZES[2], o:o + SIZES[2]] == pytest.approx(iv, rel=1e-5))
    # PSF: normalised to sum 1, 25 pixels, peak on the centre pixel
    assert s.psf.shape[-2:] == (25, 25)
    np.testing.assert_allclose(s.psf.sum(axis=(-1, -2)), 1.0, rtol=1e-5)
    assert np.unravel_index(np.argmax(s.psf[0, 0]), (25, 25)) == (12, 12)
    # labels and provenance
    assert s.labels["mag"][0] == pytest.approx(25.94 - 2.5 * np.log10(200.0))
    assert s.labels["stamp_flux"][2] == pytest.approx(10.0 * MULT)
    cfg = s.attrs.config
    assert cfg["ingest"]["kind"] == "galsim.RealGalaxyCatalog" and cfg["ingest"]["n_read"] == 3
    b = cfg["objects"][0]["bands"]["F814W"]
    assert b["calibration"]["zeropoint"] == 25.94 and b["calibration"]["multiplier"] == pytest.approx(MULT)
    assert b["gal_file"].endswith("gals.fits") and b["gal_hdu"] == 0 and b["noise_variance"] == VAR
    assert "correlations" in b["ivar"] and b["noise_file"].endswith("noise.fits")
    assert b["regrid"]["kind"].startswith("crop") and b["native_shape"] == [48, 48]


def test_resampled_to_survey_scale_conserves_flux(tmp_path):
    cat = _make_catalog(tmp_path / "c", scale=0.06, sizes=(41, 40, 20))
    ingest_galsim_catalog(cat, tmp_path / "out", IngestOptions(stamp=64))
    s = read_folder(tmp_path / "out")
    assert s.attrs.pixel_scale_arcsec == pytest.approx(0.03)
    for k, f in enumerate(FLUXES[:2]):
        assert s.images[k, 0].sum() == pytest.approx(f * MULT, rel=2e-3)
    # upsampling by 2: a new pixel holds a quarter of the area, so 1/16 of the variance of the
    # interpolated surface at its centre -- the native variance on a native pixel centre, less
    # between them; here the true centres align and every new pixel sits a quarter pixel off a
    # native one (sim2obs < 0.2.3 recorded 1/4: variance per area, not per pixel)
    var_out = 1.0 / (s.ivar[0, 0, 24:40, 24:40] * VAR * MULT**2)
    assert np.all((var_out > 0.5 / 16) & (var_out < 1.0 / 16))
    np.testing.assert_allclose(var_out, var_out[0, 0], rtol=1e-5)
    np.testing.assert_allclose(s.psf.sum(axis=(-1, -2)), 1.0, rtol=1e-5)
    assert "resampled" in s.attrs.config["objects"][0]["bands"]["F814W"]["regrid"]["kind"]


def test_cli_and_n(tmp_path):
    cat = _make_catalog(tmp_path / "cosmos")
    rc = main(["ingest", "--galsim-catalog", cat.name, "--galsim-dir", str(tmp_path / "cosmos"),
               "--survey", "hst-cosmos", "--out", str(tmp_path / "real"), "--n", "2", "--stamp", "32"])
    assert rc == 0
    s = read_folder(tmp_path / "real")
    assert list(s.labels["object_id"]) == list(IDENTS[:2])
    assert s.attrs.source == "galsim.RealGalaxyCatalog"


def test_missing_catalogue_and_images(tmp_path):
    with pytest.raises(Sim2ObsFileNotFoundError, match="real_galaxy_catalog_25.2.fits.*galsim_download_cosmos"):
        ingest_galsim_catalog("real_galaxy_catalog_25.2.fits", tmp_path / "o", IngestOptions(),
                              image_dir=tmp_path)
    assert main(["ingest", "--galsim-catalog", str(tmp_path / "nope.fits"), "--out", str(tmp_path / "o")]) != 0
    cat = _make_catalog(tmp_path / "c")
    (tmp_path / "c" / "psfs.fits").unlink()
    with pytest.raises(IngestError, match="psfs.fits.*galsim_download_cosmos"):
        ingest_galsim_catalog(cat, tmp_path / "o", IngestOptions(stamp=STAMP))
    assert not (tmp_path / "o").exists()


def test_bad_rows_refused_or_skipped(tmp_path):
    d = tmp_path / "c"
    cat = _make_catalog(d)
    with fits.open(cat, mode="update") as h:
        h[1].data["NOISE_VARIANCE"][1] = 0.0
        h[1].data["GAL_HDU"][2] = 7                       # no such HDU
    with pytest.raises(IngestError, match="noise_variance"):
        ingest_galsim_catalog(cat, tmp_path / "o", IngestOptions(stamp=STAMP))
    assert not (tmp_path / "o").exists()
    _, skipped = ingest_galsim_catalog(cat, tmp_path / "o", IngestOptions(stamp=STAMP, skip_bad=True))
    assert len(skipped) == 2 and "ident 92000" in skipped[0]["input"] and "gals.fits" in skipped[1]["input"]
    assert list(read_folder(tmp_path / "o").labels["object_id"]) == [IDENTS[0]]


def test_not_a_real_galaxy_catalog(tmp_path):
    fits.BinTableHDU.from_columns([fits.Column("IDENT", "J", array=[1])]).writeto(tmp_path / "t.fits")
    with pytest.raises(IngestError, match="t.fits.*gal_filename"):
        ingest_galsim_catalog(tmp_path / "t.fits", tmp_path / "o", IngestOptions())
    (tmp_path / "trunc.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    with pytest.raises(IngestError, match="trunc.fits"):
        ingest_galsim_catalog(tmp_path / "trunc.fits", tmp_path / "o", IngestOptions())


def test_nan_pixels_get_zero_ivar(tmp_path):
    cat = _make_catalog(tmp_path / "c")
    with fits.open(tmp_path / "c" / "gals.fits", mode="update") as h:
        h[0].data[24, 20:23] = np.nan                     # native (24, 20..22) -> stamp (16, 12..14)
    ingest_galsim_catalog(cat, tmp_path / "o", IngestOptions(stamp=STAMP))
    s = read_folder(tmp_path / "o")
    assert np.all(s.ivar[0, 0, 16, 12:15] == 0) and np.all(s.images[0, 0, 16, 12:15] == 0)
    assert s.ivar[0, 0, 16, 15] > 0
    assert s.attrs.config["objects"][0]["bands"]["F814W"]["n_nan_native"] == 3


def test_odd_native_size_half_pixel_shift(tmp_path):
    # 41/39/21-pixel natives into a 32-pixel stamp: the true centre moves by half a pixel
    # (interpolated), flux conserved, centroid on the stamp's true centre (15.5)
    cat = _make_catalog(tmp_path / "c", sizes=(41, 39, 21))
    ingest_galsim_catalog(cat, tmp_path / "o", IngestOptions(stamp=STAMP))
    s = read_folder(tmp_path / "o")
    yy, xx = np.mgrid[0:STAMP, 0:STAMP]
    for k, f in enumerate(FLUXES):
        im = s.images[k, 0].astype(np.float64)
        assert im.sum() == pytest.approx(f * MULT, rel=1e-5)
        assert (im * xx).sum() / im.sum() == pytest.approx(15.5, abs=1e-4)
        assert (im * yy).sum() / im.sum() == pytest.approx(15.5, abs=1e-4)
    row = s.ivar[2, 0, 15] > 0                             # padded 21 -> 32: symmetric footprint,
    assert row.sum() < 21 and np.array_equal(row, row[::-1])  # edges touched by padding get ivar 0
    assert "half-pixel" in s.attrs.config["objects"][0]["bands"]["F814W"]["regrid"]["kind"]


@pytest.mark.parametrize("stamp", [32, 33])
def test_resampled_cutout_keeps_its_true_centre(stamp):
    """A source on the native cutout's true centre lands on the stamp's true centre when the
    scale changes too (0.03" -> 0.168"), for even and odd stamps: centroid to 1e-3 px, flux kept."""
    from sim2obs.data.ingest_galsim import _to_stamp

    n = 100
    yy, xx = np.mgrid[:n, :n].astype(float)
    img = np.exp(-((yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2) / (2 * 8.0**2))
    out, cover, _ = _to_stamp(img, 0.03, 0.168, stamp)
    y, x = np.mgrid[:stamp, :stamp]
    assert (out * y).sum() / out.sum() == pytest.approx((stamp - 1) / 2, abs=1e-3)
    assert (out * x).sum() / out.sum() == pytest.approx((stamp - 1) / 2, abs=1e-3)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-6)


def test_nan_pixel_reach_includes_negative_lobes_after_resampling(tmp_path):
    """Upsampling 0.06" -> 0.03": the pixels a NaN (set to 0) reaches through the quintic's
    negative lobes get ivar 0 too (sim2obs < 0.2.3 kept them: up to ~90 sigma off), and the kept
    ones equal the NaN-free ingest to the 1e-3 share of weight allowed from a masked pixel."""
    cats = []
    for name, nan in (("c", True), ("d", False)):
        cats.append(_make_catalog(tmp_path / name, scale=0.06))
        if nan:
            with fits.open(tmp_path / name / "gals.fits", mode="update") as h:
                h[0].data[24, 24] = np.nan
        ingest_galsim_catalog(cats[-1], tmp_path / f"o{name}", IngestOptions(stamp=48))
    a, b = read_folder(tmp_path / "oc"), read_folder(tmp_path / "od")
    kept = a.ivar[0, 0] > 0
    assert (~kept & (b.ivar[0, 0] > 0)).sum() > 8  # more than the NaN's own few new pixels
    lost = _gauss(SIZES[0], FLUXES[0])[24, 24] * MULT  # the NaN pixel's true value, nanomaggies
    np.testing.assert_allclose(a.images[0, 0][kept], b.images[0, 0][kept], rtol=0, atol=1e-3 * lost)
