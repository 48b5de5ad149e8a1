"""FITS/HDF5 ingestion: unit conventions against hand-computed values, layouts, resampling,
catalogue joins, and refusal of bad input (nothing half-written)."""

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from sim2obs.cli import main
from sim2obs.data.ingest import IngestOptions, ingest_fits, require_calibrated
from sim2obs.data.ingest_hdf5 import HDF5Keys, ingest_hdf5
from sim2obs.data.shards import read_folder
from sim2obs.errors import Sim2ObsDataError, Sim2ObsError

STAMP = 24


def _wcs(h, scale=0.168):
    d = scale / 3600
    h.update(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=2.0, CRPIX1=12.5, CRPIX2=12.5,
             CD1_1=-d, CD1_2=0.0, CD2_1=0.0, CD2_2=d)
    return h


def _blob(seed=0, n=STAMP, flux=100.0, noise=1.0, cx=None):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    c = n // 2 if cx is None else cx
    g = np.exp(-0.5 * ((xx - c) ** 2 + (yy - n // 2) ** 2) / 2.0**2)
    return (flux * g / g.sum() + rng.normal(0, noise, (n, n))).astype(np.float32)


def _cube_file(path, objid, bands=("g", "r"), header=None, ivar=True, scale=0.168, n=STAMP):
    h = _wcs(fits.Header(), scale)
    h["BANDS"] = ",".join(bands)
    h["OBJID"] = objid
    h.update(header or {"BUNIT": "nanomaggy"})
    data = np.stack([_blob(objid + i, n=n) for i in range(len(bands))])
    hdus = [fits.PrimaryHDU(data, header=h)]
    if ivar:
        hdus.append(fits.ImageHDU(np.full(data.shape, 4.0, np.float32), name="IVAR"))
    fits.HDUList(hdus).writeto(path)
    return data


def _fopts(**kw):
    kw.setdefault("psf_fwhm", 0.7)
    return IngestOptions(**kw)


def test_conversion_applied_to_image_and_ivar(tmp_path):
    data = _cube_file(tmp_path / "a.fits", 7, header={"MAGZERO": 27.0})
    ingest_fits([tmp_path / "a.fits"], tmp_path / "out", _fopts(survey="hsc"))
    s = read_folder(tmp_path / "out")
    f = 10 ** (-0.4 * 4.5)
    np.testing.assert_allclose(s.images[0], data * f, rtol=1e-6)
    np.testing.assert_allclose(s.ivar[0], 4.0 / f**2, rtol=1e-6)
    assert s.labels["object_id"][0] == 7
    assert s.attrs.config["objects"][0]["bands"]["g"]["calibration"]["MAGZERO"] == 27.0


# --- layouts ---------------------------------------------------------------------------------

def test_one_hdu_per_band_with_mask_and_nan(tmp_path):
    h = _wcs(fits.Header())
    img = _blob(1)
    img[0, 0] = np.nan
    mask = np.zeros_like(img, np.int16)
    mask[5, 5] = 1
    hdus = [fits.PrimaryHDU(header=fits.Header([("OBJID", 3)]))]
    for b in ("g", "r"):
        hb = h.copy()
        hb["BUNIT"] = "nJy"
        hdus += [fits.ImageHDU(img, header=hb, name=f"IMAGE_{b}"),
                 fits.ImageHDU(np.full_like(img, 2.0), name=f"VAR_{b}"),
                 fits.ImageHDU(mask, name=f"MASK_{b}")]
    fits.HDUList(hdus).writeto(tmp_path / "x.fits")
    ingest_fits([tmp_path / "x.fits"], tmp_path / "o", _fopts(survey="hsc"))
    s = read_folder(tmp_path / "o")
    assert s.bands == ("g", "r")
    assert s.images[0, 0, 0, 0] == 0 and s.ivar[0, 0, 0, 0] == 0 and s.ivar[0, 0, 5, 5] == 0
    np.testing.assert_allclose(s.ivar[0, 0, 1, 1], 3631**2 / 2.0, rtol=1e-6)   # var in nJy^2
    prov = s.attrs.config["objects"][0]["bands"]["g"]
    assert prov["n_nan"] == 1 and prov["n_masked"] == 1


def test_file_per_band_grouped_and_estimated_ivar(tmp_path):
    for objid in (10, 11):
        for b in ("G", "R"):
            h = _wcs(fits.Header())
            h["MAGZP"] = 22.5
            fits.PrimaryHDU(_blob(objid, noise=0.5), header=h).writeto(tmp_path / f"{objid}-HSC-{b}-x.fits")
    paths, skipped = ingest_fits([str(tmp_path / "*.fits")], tmp_path / "o",
                                 _fopts(survey="hsc", group_pattern=r"(?P<id>\d+)-HSC-(?P<band>[A-Z])"))
    s = read_folder(tmp_path / "o")
    assert list(s.labels["object_id"]) == [10, 11] and s.bands == ("g", "r")
    prov = s.attrs.config["objects"][0]["bands"]["g"]
    assert prov["ivar_estimated"] is True
    assert 1 / np.sqrt(s.ivar[0, 0, 0, 0]) == pytest.approx(0.5, rel=0.15)
    assert "modelled" in prov["psf"]


def test_missing_band_refused_or_skipped(tmp_path):
    for objid, bands in ((1, ("G", "R")), (2, ("G",))):
        for b in bands:
            fits.PrimaryHDU(_blob(objid), header=_wcs(fits.Header({"BUNIT": "nanomaggy"}))).writeto(
                tmp_path / f"{objid}-HSC-{b}.fits")
    opts = _fopts(survey="hsc", group_pattern=r"(?P<id>\d+)-HSC-(?P<band>[A-Z])")
    with pytest.raises(Sim2ObsDataError, match=r"object '2'.*lacks band\(s\) \['r'\]"):
        ingest_fits([tmp_path], tmp_path / "o", opts)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    opts.skip_bad = True
    _, skipped = ingest_fits([tmp_path], tmp_path / "o", opts)
    assert len(skipped) == 1 and "2-HSC-G" in skipped[0]["input"]
    assert list(read_folder(tmp_path / "o").labels["object_id"]) == [1]


def test_bad_files_named(tmp_path):
    fits.PrimaryHDU(_blob(0), header=fits.Header({"BUNIT": "nanomaggy", "FILTER": "g"})).writeto(tmp_path / "nowcs.fits")
    with pytest.raises(Sim2ObsDataError, match=r"nowcs.fits.*no celestial WCS"):
        ingest_fits([tmp_path / "nowcs.fits"], tmp_path / "o", _fopts())
    nan = np.full((STAMP, STAMP), np.nan, np.float32)
    fits.PrimaryHDU(nan, header=_wcs(fits.Header({"BUNIT": "nanomaggy", "FILTER": "g"}))).writeto(tmp_path / "nan.fits")
    with pytest.raises(Sim2ObsDataError, match=r"nan.fits.*NaN"):
        ingest_fits([tmp_path / "nan.fits"], tmp_path / "o", _fopts())
    _cube_file(tmp_path / "good.fits", 1)
    raw = (tmp_path / "good.fits").read_bytes()
    (tmp_path / "trunc.fits").write_bytes(raw[: len(raw) - 3000])
    with pytest.raises(Sim2ObsDataError, match=r"trunc.fits.*truncated"):
        ingest_fits([tmp_path / "trunc.fits"], tmp_path / "o", _fopts())
    assert not (tmp_path / "o").exists()
    # CLI: --skip-bad ingests the good one and lists the rest
    assert main(["ingest", str(tmp_path / "good.fits"), str(tmp_path / "trunc.fits"),
                 "--survey", "hsc", "--out", str(tmp_path / "o")]) == 1
    assert main(["ingest", str(tmp_path / "good.fits"), str(tmp_path / "trunc.fits"), "--skip-bad",
                 "--survey", "hsc", "--out", str(tmp_path / "o")]) == 0
    s = read_folder(tmp_path / "o")
    assert len(s) == 1 and "trunc.fits" in s.attrs.config["ingest"]["skipped"][0]["input"]


# --- resampling ------------------------------------------------------------------------------

def test_resample_conserves_flux_and_recentres(tmp_path):
    n = 60
    h = _wcs(fits.Header(), 0.084)
    h.update(BANDS="g", BUNIT="nanomaggy", OBJID=5)
    img = _blob(0, n=n, flux=1000.0, noise=0.01, cx=n // 2 + 4)     # source 4 px right of centre
    fits.PrimaryHDU(img[None], header=h).writeto(tmp_path / "hi.fits")
    with pytest.raises(Sim2ObsDataError, match="--no-resample"):
        ingest_fits([tmp_path / "hi.fits"], tmp_path / "o", _fopts(survey="hsc", stamp=24, resample=False))
    ingest_fits([tmp_path / "hi.fits"], tmp_path / "o", _fopts(survey="hsc", stamp=24))
    s = read_folder(tmp_path / "o")
    assert s.images.shape == (1, 1, 24, 24) and s.attrs.pixel_scale_arcsec == pytest.approx(0.168)
    assert s.images.sum() == pytest.approx(img.sum(), rel=0.02)
    iy, ix = np.unravel_index(np.argmax(s.images[0, 0]), (24, 24))
    assert (iy, ix) == (12, 12)
    # 2x coarser pixels integrate the interpolated cutout: a plain 2x2 sum would have 4x the input
    # variance (1e-4); the interpolant and the two pixel responses smooth the noise to ~3x, and
    # the ivar says so per pixel (sim2obs < 0.2.3 recorded the plain sum's 4x)
    var_out = 1.0 / s.ivar[0, 0, 6:18, 6:18]
    assert np.all((var_out > 2.5e-4) & (var_out < 3.5e-4))
    # ... which is the image's real noise level: the background (the source masked) scatters so
    y, x = np.mgrid[:24, :24]
    far = ((y - 12) ** 2 + (x - 12) ** 2 > 8**2) & (s.ivar[0, 0] > 0)
    assert np.std(s.images[0, 0][far]) == pytest.approx(np.sqrt(np.median(1.0 / s.ivar[0, 0][far])), rel=0.15)
    rec = s.attrs.config["objects"][0]["bands"]["g"]["regrid"]
    assert rec["from_arcsec"] == pytest.approx(0.084) and rec["to_arcsec"] == pytest.approx(0.168)


def test_masked_hot_pixel_does_not_decide_the_centre(tmp_path):
    """A masked hot pixel (ivar 0) brighter than the galaxy, near the centre: the cutout is
    still recentred on the galaxy, and the pixel's value reaches no kept new pixel (they equal
    those of the same cutout without it)."""
    n = 60
    h = _wcs(fits.Header(), 0.084)
    h.update(BANDS="g", BUNIT="nanomaggy", OBJID=6)
    img = _blob(0, n=n, flux=1000.0, noise=0.01, cx=n // 2 + 4)     # source 4 px right of centre
    ivar = np.full((1, n, n), 1e4, np.float32)
    ivar[0, n // 2, n // 2 - 4] = 0.0                                 # masked pixel 4 px left
    shards = []
    for name, value in (("hot", 1e4), ("cold", img[n // 2, n // 2 - 4])):
        im = img.copy()
        im[n // 2, n // 2 - 4] = value
        fits.HDUList([fits.PrimaryHDU(im[None], header=h), fits.ImageHDU(ivar, name="IVAR")]).writeto(tmp_path / f"{name}.fits")
        ingest_fits([tmp_path / f"{name}.fits"], tmp_path / name, _fopts(survey="hsc", stamp=24))
        shards.append(read_folder(tmp_path / name))
    hot, cold = shards
    kept = hot.ivar[0, 0] > 0
    assert np.unravel_index(np.argmax(hot.images[0, 0]), (24, 24)) == (12, 12)
    assert 0 < (~kept).sum() < 24
    np.testing.assert_array_equal(hot.images[0, 0][kept], cold.images[0, 0][kept])
    np.testing.assert_array_equal(hot.ivar, cold.ivar)


# --- catalogue join --------------------------------------------------------------------------

def _two_objects(tmp_path):
    for i in (1, 2):
        _cube_file(tmp_path / f"o{i}.fits", i)


@pytest.mark.parametrize("ext", ["csv", "fits"])
def test_catalog_join(tmp_path, ext):
    _two_objects(tmp_path)
    t = Table({"objid": [2, 1, 9], "zspec": [0.2, 0.1, 0.9]})
    t["logm"] = [10.5, 9.5, 11.0]
    t["logm"].unit = "mag"  # a FITS-standard unit, kept through the table
    t.write(tmp_path / f"cat.{ext}")
    ingest_fits([tmp_path / "o1.fits", tmp_path / "o2.fits"], tmp_path / "o",
                _fopts(survey="hsc", catalog=str(tmp_path / f"cat.{ext}"), id_column="objid"))
    s = read_folder(tmp_path / "o")
    np.testing.assert_allclose(s.labels["zspec"], [0.1, 0.2])
    np.testing.assert_allclose(s.labels["logm"], [9.5, 10.5])
    if ext == "fits":
        assert s.label_units["logm"] == "mag"


def test_catalog_duplicates_refused_missing_reported(tmp_path):
    _two_objects(tmp_path)
    Table({"objid": [1, 1, 2], "z": [0.1, 0.1, 0.2]}).write(tmp_path / "dup.csv")
    with pytest.raises(Sim2ObsDataError, match=r"dup.csv.*duplicate ids.*\['1'\]"):
        ingest_fits([tmp_path / "o1.fits", tmp_path / "o2.fits"], tmp_path / "o",
                    _fopts(survey="hsc", catalog=str(tmp_path / "dup.csv"), id_column="objid"))
    assert not (tmp_path / "o").exists()
    Table({"objid": [2], "z": [0.2]}).write(tmp_path / "part.csv")
    ingest_fits([tmp_path / "o1.fits", tmp_path / "o2.fits"], tmp_path / "o",
                _fopts(survey="hsc", catalog=str(tmp_path / "part.csv"), id_column="objid"))
    s = read_folder(tmp_path / "o")
    assert np.isnan(s.labels["z"][0]) and s.labels["z"][1] == pytest.approx(0.2)
    assert s.attrs.config["catalog_join"]["missing_ids"] == ["1"]


# --- HDF5 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("last", [False, True])
def test_hdf5_float_layouts(tmp_path, last):
    imgs = np.stack([np.stack([_blob(i), _blob(i + 10)]) for i in range(3)])   # (3, 2, H, W)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("cutouts", data=np.moveaxis(imgs, 1, 3) if last else imgs)
        f["cutouts"].attrs["BUNIT"] = "nJy"
        f.attrs["pixel_scale_arcsec"] = 0.168
        f.create_dataset("lab/id", data=np.array([5, 6, 7]))
        f.create_dataset("lab/z", data=np.array([0.1, 0.2, 0.3]))
        f["lab/z"].attrs["unit"] = "redshift"
    ingest_hdf5(tmp_path / "d.h5", tmp_path / "o", _fopts(survey="hsc", bands=("g", "r")),
                HDF5Keys(images="cutouts", labels="lab"))
    s = read_folder(tmp_path / "o")
    np.testing.assert_allclose(s.images, imgs / 3631, rtol=1e-6)
    assert list(s.labels["object_id"]) == [5, 6, 7] and s.label_units["z"] == "redshift"
    assert s.attrs.config["ingest"]["layout"] == ("channel-last" if last else "channel-first")


def test_hdf5_uint8_flagged_uncalibrated(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (2, STAMP, STAMP, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "g10.h5", "w") as f:
        f.create_dataset("images", data=rgb)
    assert main(["ingest", str(tmp_path / "g10.h5"), "--bands", "g", "r", "z", "--survey", "hsc",
                 "--out", str(tmp_path / "o")]) == 0
    s = read_folder(tmp_path / "o")
    assert s.attrs.flux_unit == "uncalibrated" and s.attrs.config["calibrated"] is False
    with pytest.raises(Sim2ObsError, match="not calibrated"):
        require_calibrated(s)
    # ambiguous: 3 bands and a 3x3 stamp -> channel order must be given
    with h5py.File(tmp_path / "amb.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(Sim2ObsDataError, match="--layout"):
        ingest_hdf5(tmp_path / "amb.h5", tmp_path / "o2", _fopts(bands=("g", "r", "z"), zeropoint=22.5,
                                                                 pixel_scale=0.2))
