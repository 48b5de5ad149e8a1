"""StreamingShardDataset: every sample once per epoch over ranks x workers, shuffling that changes
with the epoch and not with reruns, memory flat in the number of shards, pretraining with --stream."""

import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch

from sim2obs.data.dataset import ShardDataset
from sim2obs.data.manifest import update_manifest
from sim2obs.data.streaming import StreamingShardDataset, collate_same_pairs
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError


def _ids(batches):
    return [int(i) for b in batches for i in b]


def _epoch(folder, rank, world, workers, epoch=0, **kw):
    ds = StreamingShardDataset(folder, rank=rank, world_size=world, **kw)
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=workers,
        collate_fn=lambda items: [it["object_id"] for it in items])
    return _ids(loader)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, make_shards):
    # 100 objects in shards of 7: uneven shards, and 100 = 4 x 25 splits evenly over 4 readers
    return make_shards(tmp_path_factory.mktemp("stream") / "hsc", n=100, shard_size=7, stamp=16, seed=4)


def test_items_match_shard_dataset(folder):
    ref = ShardDataset(folder, label_keys=("log_mstar", "nope"))
    by_id = {int(ref.object_id[i]): i for i in range(len(ref))}
    ds = StreamingShardDataset(folder, label_keys=("log_mstar", "nope"), rank=0, world_size=1)
    items = list(ds)
    assert len(items) == 100 and len(ds) == 100
    for item in items[:10]:
        want = ref[by_id[item["object_id"]]]
        assert set(item) == set(want) and item["survey"] == want["survey"] == "hsc"
        np.testing.assert_array_equal(item["image"], want["image"])
        np.testing.assert_array_equal(item["ivar"], want["ivar"])
        assert item["labels"]["log_mstar"] == want["labels"]["log_mstar"]
        assert np.isnan(item["labels"]["nope"])
    np.testing.assert_array_equal(ds.raw(12)["image"], ref.raw(12)["image"])
    sub = StreamingShardDataset(folder, bands=("i", "g"), split="train", rank=0, world_size=1)
    ref_sub = ShardDataset(folder, bands=("i", "g"), split="train")
    np.testing.assert_array_equal(sub.raw(5)["image"], ref_sub.raw(5)["image"])  # rows skipped too


def test_every_sample_once_with_two_ranks_of_two_workers(folder):
    per_rank = [_epoch(folder, rank, 2, workers=2, shuffle_buffer=16) for rank in (0, 1)]
    assert [len(r) for r in per_rank] == [50, 50]  # equal: DDP ranks run the same steps
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == list(range(100))  # each object exactly once, none dropped (100 = 4 x 25)
    ds = StreamingShardDataset(folder, rank=0, world_size=2)
    assert ds.samples_per_reader(num_workers=2) == 25
    assert ds.batches_per_epoch(batch_size=4, num_workers=2) == 12  # 2 workers x 6 full batches


def test_drop_and_pad_when_not_divisible(folder):
    # 3 ranks x 2 workers = 6 readers for 100 samples: drop 4, or pad with 2 repeats
    dropped = [i for r in range(3) for i in _epoch(folder, r, 3, workers=2)]
    assert len(dropped) == 96 and len(set(dropped)) == 96
    padded = [i for r in range(3) for i in _epoch(folder, r, 3, workers=2, partition="pad")]
    counts = Counter(padded)
    assert len(padded) == 102 and set(counts) == set(range(100)) and max(counts.values()) == 2
    # more readers than samples: 'pad' still gives every reader one equal block
    tiny = StreamingShardDataset(folder, rank=0, world_size=1, split="val", val_fraction=0.04,
                                 partition="pad")
    n = len(tiny)
    pieces = [tiny.plan(r, n + 3) for r in range(n + 3)]
    assert all(sum(stop - first for _, first, stop in p) == 1 for p in pieces)
    # the dropped samples change with the epoch (the shard order does)
    other = [i for r in range(3) for i in _epoch(folder, r, 3, workers=2, epoch=1)]
    assert set(range(100)) - set(dropped) != set(range(100)) - set(other)


def test_shuffle_depends_on_epoch_and_seed_only(folder):
    e0 = _epoch(folder, 0, 1, workers=0, shuffle_buffer=32)
    assert e0 == _epoch(folder, 0, 1, workers=0, shuffle_buffer=32)  # deterministic
    e1 = _epoch(folder, 0, 1, workers=0, epoch=1, shuffle_buffer=32)
    assert sorted(e0) == sorted(e1) == list(range(100)) and e0 != e1
    assert e0 != _epoch(folder, 0, 1, workers=0, shuffle_buffer=32, seed=5)
    assert e0 != sorted(e0)  # the buffer mixes within and across shards
    plain = _epoch(folder, 0, 1, workers=0, shuffle=False)
    assert plain == list(range(100))


def test_split_matches_shard_dataset(folder):
    for split in ("train", "val"):
        ref = ShardDataset(folder, split=split, val_fraction=0.3, split_seed=2)
        ds = StreamingShardDataset(folder, split=split, val_fraction=0.3, split_seed=2, rank=0,
                                   world_size=1)
        assert sorted(it["object_id"] for it in ds) == sorted(ref.object_id.tolist())


def test_memory_is_flat_in_the_number_of_shards(tmp_path, make_shards):
    """Peak traced memory of one epoch (buffer of 8 items) for 4 and 24 shards of 16 objects."""
    peaks = {}
    for n_shards in (4, 24):
        folder = make_shards(tmp_path / f"s{n_shards}", n=16 * n_shards, shard_size=16, stamp=32)
        update_manifest(folder)
        ds = StreamingShardDataset(folder, shuffle_buffer=8, read_rows=4, rank=0, world_size=1)
        tracemalloc.start()
        n = sum(1 for _ in ds)
        peaks[n_shards] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert n == 16 * n_shards
    shard_bytes = 16 * 3 * 32 * 32 * 4 * 2  # images + ivar of one shard
    assert peaks[24] < 1.3 * peaks[4]  # 6x the shards, about the same peak
    assert peaks[24] < 2 * shard_bytes  # never the whole folder (24 shards) in memory


def test_rank_defaults_and_errors(folder, tmp_path):
    ds = StreamingShardDataset(folder)  # no process group: rank 0 of 1
    assert (ds.rank, ds.world_size) == (0, 1)
    with pytest.raises(Sim2ObsValueError, match="both rank and world_size"):
        StreamingShardDataset(folder, rank=1)
    with pytest.raises(Sim2ObsValueError, match="rank < world_size"):
        StreamingShardDataset(folder, rank=2, world_size=2)
    with pytest.raises(Sim2ObsValueError, match="partition"):
        StreamingShardDataset(folder, partition="wrap")
    with pytest.raises(FileNotFoundError):
        StreamingShardDataset(tmp_path / "none")


def test_corrupt_shard_while_streaming(tmp_path, make_shards):
    folder = make_shards(tmp_path / "c", n=32, shard_size=16, stamp=16)
    ds = StreamingShardDataset(folder, rank=0, world_size=1, shuffle=False)
    p = folder / "hsc-00001.h5"
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(Sim2ObsDataError, match="hsc-00001.h5.*truncated or corrupt.*--rebuild"):
        list(ds)


def test_collate_same_pairs(folder):
    items = list(StreamingShardDataset(folder, rank=0, world_size=1, shuffle=False))[:3]
    a, b = collate_same_pairs(items)
    assert a["image"].shape == (3, 3, 16, 16) and b is a


TINY = dict(epochs=2, batch_size=16, encoder_kwargs={"width": 8, "depths": [1, 1], "stem_stride": 2},
            embed_dim=16, proj_hidden=32, proj_dim=16, val_fraction=0.2, norm="group")


def test_pretrain_stream_runs_and_resumes_identically(synthetic_folders, tmp_path):
    from sim2obs.pretrain.train import PretrainConfig, load_checkpoint, pretrain

    cfg = PretrainConfig(stream=True, shuffle_buffer=32, **TINY)
    full = pretrain([synthetic_folders[0]], tmp_path / "full", cfg, progress=False)
    part = pretrain([synthetic_folders[0]], tmp_path / "part", cfg, progress=False, stop_after_epoch=1)
    pretrain([synthetic_folders[0]], part, cfg, progress=False, resume=True)
    a, b = load_checkpoint(full)["model"], load_checkpoint(part)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert load_checkpoint(full)["config"]["stream"] is True


def test_pretrain_stream_refuses_cross_survey_pairs(synthetic_folders, tmp_path):
    from sim2obs.pretrain.train import PretrainConfig, pretrain

    cfg = PretrainConfig(stream=True, bands=("g", "r", "i"), **TINY)
    with pytest.raises(Sim2ObsValueError, match="--no-cross-survey"):
        pretrain(list(synthetic_folders), tmp_path / "x", cfg, progress=False)
    # without cross-survey pairs two surveys stream; batches carry each item's survey (the row
    # of the augmentations' per-survey tables)
    cfg = PretrainConfig(stream=True, bands=("g", "r", "i"), cross_survey=False, **TINY)
    pretrain(list(synthetic_folders), tmp_path / "y", cfg, progress=False, max_steps_per_epoch=2)


def test_collate_gives_survey_rows(synthetic_folders):
    from sim2obs.data.streaming import StreamingShardDataset, collate_same_pairs

    ds = StreamingShardDataset(list(synthetic_folders), bands=("g", "r", "i"), shuffle_buffer=0)
    items = list(ds)
    hsc = next(it for it in items if it["survey"] == "hsc")
    lsst = next(it for it in items if it["survey"] == "lsst")
    a, b = collate_same_pairs([hsc, lsst, hsc], survey_names=("lsst", "hsc"))
    assert a["survey"].tolist() == [1, 0, 1] and b is a
    assert "survey" not in collate_same_pairs([hsc])[0]


def test_cli_stream_options():
    from sim2obs.cli import build_parser

    args = build_parser().parse_args(["pretrain", "f", "--out", "r", "--stream", "--shuffle-buffer", "64"])
    assert args.stream and args.shuffle_buffer == 64
    with pytest.raises(Sim2ObsValueError, match="shuffle_buffer"):
        from sim2obs.pretrain.train import PretrainConfig

        PretrainConfig(stream=True, shuffle_buffer=-1)


def test_band_lists_checked_as_in_shard_dataset(synthetic_folders):
    """Folders with different band lists need bands named (the extra one is not dropped)."""
    with pytest.raises(Sim2ObsDataError, match="different band lists need --bands"):
        StreamingShardDataset(list(synthetic_folders), rank=0, world_size=1)
    with pytest.raises(Sim2ObsDataError, match=r"without \['z'\]"):
        StreamingShardDataset(list(synthetic_folders), bands=("g", "z"), rank=0, world_size=1)
    ds = StreamingShardDataset(list(synthetic_folders), bands=("g", "r", "i"), rank=0, world_size=1)
    assert ds.bands == ("g", "r", "i")
