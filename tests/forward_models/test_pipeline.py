"""Shard pipeline: identical bytes for 1 and 2 workers, resume, refusal of mismatched reruns."""

import hashlib

import numpy as np
import pytest

from sim2obs.data.shards import read_folder, read_shard
from sim2obs.errors import Sim2ObsValueError
from sim2obs.forward_models.galaxy import Galaxy, StarParticles, truth_labels
from sim2obs.forward_models.pipeline import RenderJob, plan_shards, render_to_shards
from sim2obs.forward_models.render import RenderConfig
from sim2obs.forward_models.surveys import get_survey


class ToySource:
    """A deterministic in-memory source (galaxies regenerated from their id)."""

    name = "toy"
    redshift = 0.0
    cosmology = "Planck15"

    def ids(self):
        return np.arange(100, 107, dtype=np.int64)

    def load(self, object_id):
        rng = np.random.default_rng(object_id)
        n = 800
        r = rng.exponential(1.0, n)
        th = rng.uniform(0, 2 * np.pi, n)
        pos = np.stack([r * np.cos(th), r * np.sin(th), rng.normal(0, 0.1, n)], 1)
        stars = StarParticles(pos, np.full(n, 1e7), rng.uniform(0.1, 10, n), np.full(n, 0.02))
        return Galaxy(object_id, stars, 0.0, truth_labels(stars, 0.0), "toy")

    def describe(self):
        return {"kind": "toy"}


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.h5"))}


@pytest.fixture(scope="module")
def job():
    return RenderJob(ToySource(), get_survey("sdss").with_bands(["g", "r", "i"]),
                     RenderConfig(stamp=32), seed=3)


def test_workers_give_identical_bytes(job, tmp_path):
    ids = job.source.ids()
    render_to_shards(job, ids, tmp_path / "one", shard_size=3, workers=1, progress=False)
    render_to_shards(job, ids, tmp_path / "two", shard_size=3, workers=2, progress=False)
    one, two = digest(tmp_path / "one"), digest(tmp_path / "two")
    assert list(one) == ["sdss-00000.h5", "sdss-00001.h5", "sdss-00002.h5"]
    assert one == two


def test_shard_content(job, tmp_path):
    render_to_shards(job, job.source.ids(), tmp_path, shard_size=4, progress=False)
    shard = read_folder(tmp_path)
    assert shard.images.shape == (7, 3, 32, 32)
    assert shard.psf.shape == (7, 3, 25, 25)
    np.testing.assert_allclose(shard.psf.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(shard.labels["object_id"], np.arange(100, 107))
    assert shard.label_units["log_mstar"] == "log10(Msun)"
    assert shard.label_units["mag_r"].startswith("mag")
    first = read_shard(tmp_path / "sdss-00000.h5")
    assert first.attrs.config["job"]["seed"] == 3
    assert first.attrs.config["job"]["render"]["stamp"] == 32
    assert first.attrs.bands == ("g", "r", "i")
    assert first.attrs.domain == "sim"


def test_resume_skips_complete_shards_and_refuses_other_settings(job, tmp_path):
    ids = job.source.ids()
    render_to_shards(job, ids, tmp_path, shard_size=3, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.h5")}
    (tmp_path / "sdss-00001.h5").unlink()  # as if the run had died there
    render_to_shards(job, ids, tmp_path, shard_size=3, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.h5")}
    assert after["sdss-00000.h5"] == before["sdss-00000.h5"]
    assert after["sdss-00002.h5"] == before["sdss-00002.h5"]
    assert "sdss-00001.h5" in after
    other = RenderJob(job.source, job.survey, RenderConfig(stamp=32), seed=4)
    with pytest.raises(Sim2ObsValueError, match="other settings"):
        render_to_shards(other, ids, tmp_path, shard_size=3, progress=False)
    assert not list(tmp_path.glob(".*.tmp"))


def test_plan_and_empty():
    assert [len(c) for c in plan_shards(np.arange(10), 4)] == [4, 4, 2]
    with pytest.raises(Sim2ObsValueError):
        plan_shards(np.arange(3), 0)
