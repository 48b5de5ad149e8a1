"""Export mocks to FITS and ingest them back: identical images, ivar, PSF and labels."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from sim2obs.cli import main
from sim2obs.data.export import export_fits
from sim2obs.data.shards import read_folder


@pytest.fixture(scope="module")
def mocks(tmp_path_factory, make_shards):
    root = tmp_path_factory.mktemp("export")
    return make_shards(root / "mock", n=6, shard_size=4, stamp=24)


@pytest.mark.parametrize("layout", ["cube", "per-band"])
def test_round_trip_identical(mocks, tmp_path, layout):
    assert main(["export", "--fits", str(mocks), str(tmp_path / "fits"), "--layout", layout]) == 0
    assert main(["ingest", str(tmp_path / "fits"), "--survey", "hsc", "--out", str(tmp_path / "back")]) == 0
    a, b = read_folder(mocks), read_folder(tmp_path / "back")
    assert b.attrs.domain == "real" and b.bands == a.bands
    assert b.attrs.pixel_scale_arcsec == pytest.approx(a.attrs.pixel_scale_arcsec)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.ivar, b.ivar)
    np.testing.assert_array_equal(np.broadcast_to(a.psf, b.psf.shape), b.psf)
    assert set(a.labels) == set(b.labels)
    for k in a.labels:
        np.testing.assert_array_equal(a.labels[k], b.labels[k])
    prov = b.attrs.config["objects"][0]["bands"]["g"]
    assert prov["calibration"]["method"] == "BUNIT" and prov["pixel_scale_from"] == "WCS"
    assert b.attrs.config["calibrated"] is True


def test_export_headers(mocks, tmp_path):
    paths = export_fits(mocks, tmp_path)
    assert len(paths) == 6
    with fits.open(paths[0]) as h:
        hdr = h[0].header
        assert hdr["BUNIT"] == "nanomaggy" and hdr["MAGZERO"] == 22.5 and hdr["BANDS"] == "g,r,i"
        assert hdr["RADECSRC"] == "placeholder"
        w = WCS(hdr, naxis=2)
        assert w.wcs.ctype[0] == "RA---TAN"
        np.testing.assert_allclose(proj_plane_pixel_scales(w) * 3600, [0.168, 0.168])
        assert [x.name for x in h] == ["PRIMARY", "IVAR", "PSF", "LABELS"]
        assert h["LABELS"].data["object_id"][0] == hdr["OBJID"]


def test_export_refuses_uncalibrated(tmp_path):
    from sim2obs.data.shards import Shard, ShardAttrs, write_shard
    from sim2obs.errors import Sim2ObsDataError

    attrs = ShardAttrs("x", ("a",), 0.2, "real", "t", config={"calibrated": False}, flux_unit="uncalibrated")
    write_shard(tmp_path / "s" / "x-00000.h5", Shard(np.ones((1, 1, 8, 8), np.float32),
                np.ones((1, 1, 3, 3), np.float32) / 9, {"object_id": np.array([1])}, attrs))
    with pytest.raises(Sim2ObsDataError, match="not calibrated"):
        export_fits(tmp_path / "s", tmp_path / "o")
    (p,) = export_fits(tmp_path / "s", tmp_path / "o", allow_uncalibrated=True)
    assert fits.getheader(p)["BUNIT"] == "uncalibrated"
