"""Shard-folder manifests: written atomically, used to open folders without opening shards,
updated incrementally, and corrupt shards reported with the file and the fix."""

import json
import os

import h5py
import numpy as np
import pytest

from sim2obs.cli import main
from sim2obs.data import manifest as M
from sim2obs.data.dataset import ShardDataset
from sim2obs.data.manifest import (
    MANIFEST_NAME,
    ShardEntry,
    check_folders,
    decode_ids,
    encode_ids,
    load_manifest,
    update_manifest,
    verify_folder,
)
from sim2obs.data.shards import shard_filename
from sim2obs.errors import Sim2ObsDataError


@pytest.fixture
def folder(make_shards, tmp_path):
    return make_shards(tmp_path / "hsc", n=40, shard_size=16, seed=3)


def test_ids_round_trip():
    for ids in (np.arange(5, 1005), np.array([7, -3, 2**40, 0]), np.array([], dtype=np.int64)):
        np.testing.assert_array_equal(decode_ids(encode_ids(ids)), ids)
    assert len(encode_ids(np.arange(100_000))) < 2_000  # sorted ids compress to almost nothing


def test_manifest_content_and_incremental_update(folder, make_shards):
    report = update_manifest(folder)
    assert (report.n_shards, report.n_objects, report.n_read, report.n_reused) == (3, 40, 3, 0)
    d = json.loads((folder / MANIFEST_NAME).read_text())
    assert d["format_version"] == 1 and d["checksum_algorithm"] == "sha256"
    assert d["survey"] == "hsc" and d["bands"] == ["g", "r", "i"]
    assert [s["name"] for s in d["shards"]] == [shard_filename("hsc", i) for i in range(3)]
    assert [s["n_objects"] for s in d["shards"]] == [16, 16, 8]
    first = d["shards"][0]
    assert first["size_bytes"] == (folder / first["name"]).stat().st_size
    assert len(first["sha256"]) == 64 and first["stamp"] == [32, 32] and first["has_ivar"]
    m = load_manifest(folder)
    np.testing.assert_array_equal(m.entries[first["name"]].object_ids(), np.arange(16))
    # nothing changed: everything reused; a rewritten shard is re-read; a deleted one dropped
    assert update_manifest(folder).n_reused == 3
    make_shards(folder, n=16, shard_size=16, seed=9)  # rewrites hsc-00000.h5 only
    (folder / shard_filename("hsc", 2)).unlink()
    r = update_manifest(folder)
    assert (r.n_read, r.n_reused, r.n_removed, r.n_shards) == (1, 1, 1, 2)
    assert not list(folder.glob(".*.tmp"))  # written atomically, nothing left behind


def test_dataset_uses_a_fresh_manifest_without_opening_shards(folder, monkeypatch):
    reference = ShardDataset(folder, split="train", val_fraction=0.25)
    assert reference.n_from_manifest == 0
    update_manifest(folder)

    def no_open(*args, **kwargs):
        raise AssertionError("a shard was opened although the manifest is up to date")

    monkeypatch.setattr(M.ShardEntry, "from_file", classmethod(lambda cls, *a, **k: no_open()))
    ds = ShardDataset(folder, split="train", val_fraction=0.25)
    assert ds.n_from_manifest == 3
    np.testing.assert_array_equal(ds.object_id, reference.object_id)
    np.testing.assert_array_equal(ds.file_of, reference.file_of)
    assert ds.bands == reference.bands and ds.stamp == reference.stamp
    monkeypatch.undo()
    # a changed shard (mtime differs) is opened again; the others still come from the manifest
    p = folder / shard_filename("hsc", 1)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert ShardDataset(folder).n_from_manifest == 2


def test_ten_thousand_shards_open_from_the_manifest(tmp_path, monkeypatch):
    """10^4 shard files: the dataset reads the manifest and stats the files, opens none."""
    folder = tmp_path / "many"
    folder.mkdir()
    entries = {}
    for i in range(10_000):
        p = folder / shard_filename("big", i)
        p.write_bytes(b"")  # never opened: a stand-in for a real shard
        st = p.stat()
        entries[p.name] = ShardEntry(
            name=p.name, n_objects=3, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns, sha256="0" * 64,
            survey="hsc", bands=("g", "r"), pixel_scale_arcsec=0.168, stamp=(16, 16), domain="sim",
            has_ivar=True, object_ids_encoded=encode_ids(np.arange(3 * i, 3 * i + 3)))
    M.Manifest(folder, entries).write()
    monkeypatch.setattr(h5py, "File", lambda *a, **k: pytest.fail("an HDF5 file was opened"))
    ds = ShardDataset(folder)
    assert len(ds) == 30_000 and ds.n_from_manifest == 10_000
    np.testing.assert_array_equal(ds.object_id, np.arange(30_000))


def test_truncated_shard_is_named_with_the_fix(folder):
    update_manifest(folder)
    p = folder / shard_filename("hsc", 1)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(Sim2ObsDataError, match="hsc-00001.h5.*truncated or corrupt.*--rebuild"):
        ShardDataset(folder)
    problems = verify_folder(folder)
    assert len(problems) == 1 and "hsc-00001.h5" in problems[0] and "truncated" in problems[0]
    with pytest.raises(Sim2ObsDataError, match="hsc-00001.h5.*not a readable HDF5 shard"):
        update_manifest(folder, rebuild=True)
    r = update_manifest(folder, on_error="skip")  # the hooks' mode: leave it out, do not fail
    assert r.skipped == ("hsc-00001.h5",) and r.n_shards == 2


def test_verify_detects_a_checksum_mismatch(folder, capsys):
    update_manifest(folder)
    assert verify_folder(folder) == []
    p = folder / shard_filename("hsc", 0)
    with h5py.File(p) as f:
        offset = f["images"].id.get_offset()  # a pixel, so that the file stays readable
    data = bytearray(p.read_bytes())
    data[offset + 5] ^= 0xFF  # flip bits in place: same size, and keep the mtime
    st = p.stat()
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Sim2ObsDataError, match="hsc-00000.h5': checksum mismatch.*--rebuild"):
        check_folders([folder])
    assert main(["manifest", str(folder), "--verify"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["manifest", str(folder), "--rebuild"]) == 0  # accept the file as it is now
    assert main(["manifest", str(folder), "--verify"]) == 0
    assert "all match" in capsys.readouterr().err


def test_verify_lists_unlisted_and_missing_shards(folder, make_shards):
    update_manifest(folder)
    (folder / shard_filename("hsc", 2)).unlink()
    make_shards(folder, n=8, shard_size=8, survey="extra", seed=5)
    problems = verify_folder(folder)
    assert any("hsc-00002.h5' is listed in the manifest but missing" in p for p in problems)
    assert any("extra-00000.h5' is not in the manifest" in p for p in problems)


def test_bad_manifest_file(folder):
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(Sim2ObsDataError, match="not a readable sim2obs manifest.*--rebuild"):
        load_manifest(folder)
    assert len(ShardDataset(folder)) == 40  # readers fall back to opening the shards
    assert update_manifest(folder).n_shards == 3  # and an update replaces it
    with pytest.raises(Sim2ObsDataError, match="no manifest.json"):
        verify_folder(folder.parent)


class ToySource:
    """A deterministic in-memory galaxy source (as in tests/forward_models/test_pipeline.py)."""

    name = "toy"
    redshift = 0.0
    cosmology = "Planck15"

    def load(self, object_id):
        from sim2obs.forward_models.galaxy import Galaxy, StarParticles, truth_labels

        rng = np.random.default_rng(object_id)
        n = 300
        r = rng.exponential(1.0, n)
        th = rng.uniform(0, 2 * np.pi, n)
        pos = np.stack([r * np.cos(th), r * np.sin(th), rng.normal(0, 0.1, n)], 1)
        stars = StarParticles(pos, np.full(n, 1e7), rng.uniform(0.1, 10, n), np.full(n, 0.02))
        return Galaxy(object_id, stars, 0.0, truth_labels(stars, 0.0), "toy")

    def describe(self):
        return {"kind": "toy"}


def test_render_writes_the_manifest(tmp_path):
    from sim2obs.forward_models.pipeline import RenderJob, render_to_shards
    from sim2obs.forward_models.render import RenderConfig
    from sim2obs.forward_models.surveys import get_survey

    job = RenderJob(ToySource(), get_survey("sdss").with_bands(["r"]),
                    RenderConfig(stamp=16, psf_stamp=9, redshift=0.05), seed=1)
    render_to_shards(job, np.arange(3), tmp_path, shard_size=2, progress=False)
    m = load_manifest(tmp_path)
    assert sorted(m.entries) == ["sdss-00000.h5", "sdss-00001.h5"] and m.n_objects == 3
    assert verify_folder(tmp_path) == []


def test_ingest_writes_the_manifest(tmp_path):
    from sim2obs.data.ingest import IngestOptions
    from sim2obs.data.ingest_hdf5 import HDF5Keys, ingest_hdf5

    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("cutouts", data=rng.normal(1.0, 0.1, (5, 2, 24, 24)).astype(np.float32))
        f["cutouts"].attrs["BUNIT"] = "nanomaggy"
        f.attrs["pixel_scale_arcsec"] = 0.168
        f.create_dataset("ids", data=np.arange(10, 15))
    opts = IngestOptions(survey="hsc", bands=("g", "r"), psf_fwhm=0.7, shard_size=3)
    ingest_hdf5(tmp_path / "d.h5", tmp_path / "o", opts, HDF5Keys(images="cutouts", ids="ids"))
    m = load_manifest(tmp_path / "o")
    assert m.n_objects == 5 and len(m.entries) == 2
    np.testing.assert_array_equal(ShardDataset(tmp_path / "o").object_id, np.arange(10, 15))
    assert verify_folder(tmp_path / "o") == []
