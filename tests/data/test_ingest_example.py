"""The built-in Hubble Deep Field example: real galaxies, uncalibrated and refused where flux matters."""

import numpy as np
import pytest

from sim2obs.cli import main
from sim2obs.data.ingest import require_calibrated
from sim2obs.data.shards import read_folder
from sim2obs.errors import Sim2ObsDataError


@pytest.fixture(scope="module")
def hdf(tmp_path_factory):
    out = tmp_path_factory.mktemp("hdf") / "real"
    assert main(["ingest", "--example", "hdf", "--out", str(out)]) == 0
    return read_folder(out)


def test_hdf_example_content(hdf):
    assert len(hdf) > 50 and hdf.images.shape[1:] == (3, 64, 64)
    assert hdf.attrs.domain == "real" and hdf.attrs.survey == "hdf-example"
    assert hdf.attrs.flux_unit == "uncalibrated" and hdf.attrs.config["calibrated"] is False
    assert "not fluxes" in hdf.attrs.config["calibration_note"]
    assert len(set(hdf.labels["object_id"].tolist())) == len(hdf)
    # galaxies are centred: the central region is brighter than the stamp border on average
    centre = hdf.images[:, :, 24:40, 24:40].mean()
    border = np.concatenate([hdf.images[:, :, :4].ravel(), hdf.images[:, :, -4:].ravel()]).mean()
    assert centre > border
    assert (hdf.labels["concentration"] < 3.0).all() and (hdf.labels["r50_pixel"] >= 2.5).all()
    det = hdf.attrs.config["ingest"]["detection"]
    assert det["rejected_point_like"] > 0 and det["rejected_edge"] > 0
    np.testing.assert_allclose(hdf.psf.sum(axis=(2, 3)), 1, rtol=1e-5)


def test_hdf_example_refused_where_flux_is_needed(hdf, tmp_path):
    with pytest.raises(Sim2ObsDataError, match="not calibrated"):
        require_calibrated(hdf)
    with pytest.raises(Sim2ObsDataError, match="not calibrated"):
        require_calibrated(hdf.attrs)
    assert main(["export", "--fits", hdf.path, str(tmp_path / "f")]) == 1
