"""Dask rendering (one task per shard) on a 2-worker LocalCluster of processes: the same bytes as
the local path, a worker killed mid-run costs nothing but a retry, and a rerun skips shards."""

import hashlib
import logging
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

from sim2obs.data.shards import read_folder  # noqa: E402
from sim2obs.errors import MissingDependencyError, Sim2ObsValueError  # noqa: E402
from sim2obs.forward_models.galaxy import Galaxy, StarParticles, truth_labels  # noqa: E402
from sim2obs.forward_models.pipeline import RenderJob, render_to_shards  # noqa: E402
from sim2obs.forward_models.render import RenderConfig  # noqa: E402
from sim2obs.forward_models.surveys import get_survey  # noqa: E402

# The worker processes cannot import this test module by name: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

IDS = np.arange(100, 107, dtype=np.int64)


@dataclass(frozen=True)
class ToySource:
    """A deterministic source (galaxies regenerated from their id), as in test_pipeline.py.

    ``fail_id`` raises a sim2obs error; with ``flaky_marker`` the first load of ``kill_id``
    raises an OSError. With ``kill_marker`` set, the first load of ``kill_id`` in a process other than ``parent_pid``
    creates the marker file and SIGKILLs its own (worker) process; later loads proceed.
    """

    kill_marker: str | None = None
    kill_id: int = -1
    parent_pid: int = -1
    fail_id: int = -1
    flaky_marker: str | None = None
    name: str = "toy"
    redshift: float = 0.0
    cosmology: str = "Planck15"

    def ids(self):
        return IDS

    def load(self, object_id):
        if (self.kill_marker and object_id == self.kill_id and os.getpid() != self.parent_pid
                and not os.path.exists(self.kill_marker)):
            with open(self.kill_marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if self.flaky_marker and object_id == self.kill_id and not os.path.exists(self.flaky_marker):
            open(self.flaky_marker, "w").close()
            raise OSError("transient read error")
        if object_id == self.fail_id:
            raise Sim2ObsValueError(f"bad galaxy {object_id}")
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


def make_job(source=None):
    return RenderJob(source or ToySource(), get_survey("sdss").with_bands(["g", "r", "i"]),
                     RenderConfig(stamp=32), seed=3)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.CRITICAL) as c:
        yield c


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    render_to_shards(make_job(), IDS, out, shard_size=3, workers=1, progress=False)
    return digest(out)


def test_dask_gives_serial_bytes_and_rerun_skips(cluster, serial, tmp_path):
    logs = []
    paths = render_to_shards(make_job(), IDS, tmp_path, shard_size=3, progress=False,
                             dask=cluster.scheduler_address, log=logs.append)
    assert [p.name for p in paths] == ["sdss-00000.h5", "sdss-00001.h5", "sdss-00002.h5"]
    assert digest(tmp_path) == serial
    assert not list(tmp_path.glob(".*.tmp"))
    before = {p.name: p.stat().st_mtime_ns for p in paths}
    (tmp_path / "sdss-00001.h5").unlink()
    render_to_shards(make_job(), IDS, tmp_path, shard_size=3, progress=False,
                     dask=cluster.scheduler_address, log=logs.append)
    assert digest(tmp_path) == serial
    after = {p.name: p.stat().st_mtime_ns for p in paths}
    assert after["sdss-00000.h5"] == before["sdss-00000.h5"]
    assert after["sdss-00002.h5"] == before["sdss-00002.h5"]
    assert any("2 of 3 shards already complete" in m for m in logs)


def test_killed_worker_is_retried(cluster, serial, tmp_path):
    marker = tmp_path / "killed"
    source = ToySource(kill_marker=str(marker), kill_id=104, parent_pid=os.getpid())
    out = tmp_path / "out"
    with distributed.Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        render_to_shards(make_job(source), IDS, out, shard_size=3, progress=False, dask=client)
        client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker
        new_pids = set(client.run(os.getpid).values())
    assert marker.exists()  # a worker really died (in the middle of shard 1)
    killed = int(marker.read_text())
    assert killed in pids and killed not in new_pids
    shard = read_folder(out)
    np.testing.assert_array_equal(shard.labels["object_id"], IDS)  # none lost, none twice
    # Same images as the serial run (the provenance differs only by the source's fields).
    ref_dir = tmp_path / "ref"
    render_to_shards(make_job(), IDS, ref_dir, shard_size=3, progress=False)
    ref = read_folder(ref_dir)
    np.testing.assert_array_equal(shard.images, ref.images)
    np.testing.assert_array_equal(shard.noiseless, ref.noiseless)


def test_transient_error_is_retried(cluster, serial, tmp_path):
    marker = tmp_path / "failed-once"
    source = ToySource(flaky_marker=str(marker), kill_id=101)
    out = tmp_path / "out"
    render_to_shards(make_job(source), IDS, out, shard_size=3, progress=False,
                     dask=cluster.scheduler_address)
    assert marker.exists()
    np.testing.assert_array_equal(read_folder(out).labels["object_id"], IDS)


def test_dask_errors(cluster, tmp_path, monkeypatch):
    with pytest.raises(Sim2ObsValueError, match="exclusive"):
        render_to_shards(make_job(), IDS, tmp_path, dask="local:2", workers=2, progress=False)
    with pytest.raises(Sim2ObsValueError, match="local:N"):
        render_to_shards(make_job(), IDS, tmp_path, dask="local:0", progress=False)
    with pytest.raises(Sim2ObsValueError, match="scheduler address"):
        render_to_shards(make_job(), IDS, tmp_path, dask="somehost:8786", progress=False)
    # An error of sim2obs inside a task is raised on the client, not retried.
    bad = make_job(ToySource(fail_id=105))
    with pytest.raises(Sim2ObsValueError, match="bad galaxy 105"):
        render_to_shards(bad, IDS, tmp_path / "bad", shard_size=3, progress=False,
                         dask=cluster.scheduler_address)
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(MissingDependencyError, match=r'sim2obs\[dask\]'):
        render_to_shards(make_job(), IDS, tmp_path, dask="local:2", progress=False)
