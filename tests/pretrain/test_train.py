"""Training loop: runs, resumes to identical weights, DDP matches single process, bad input."""

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError
from sim2obs.pretrain.train import (
    CHECKPOINT,
    PretrainConfig,
    autocast_dtype,
    load_checkpoint,
    load_encoder,
    pretrain,
    resolve_device,
)

TINY = dict(epochs=2, batch_size=16, encoder_kwargs={"width": 8, "depths": [1, 1], "stem_stride": 2},
            embed_dim=16, proj_hidden=32, proj_dim=16, val_fraction=0.2)


def test_run_writes_checkpoint_config_metrics(synthetic_folders, tmp_path):
    run = pretrain([synthetic_folders[0]], tmp_path / "run", PretrainConfig(**TINY), progress=False)
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)  # no pickle execution needed
    assert ckpt["epoch"] == 1
    assert ckpt["normalizer"]["bands"] == ["g", "r", "i"]
    assert (run / "config.json").is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    # the same rows as JSON lines, with numbers as numbers
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for row, rec in zip(rows, records, strict=True):
        assert set(rec) == set(row)
        assert rec["train_loss"] == pytest.approx(float(row["train_loss"]), rel=1e-12)
    enc, norm, _ = load_encoder(run)
    assert enc(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_resume_gives_the_same_weights(synthetic_folders, tmp_path, method):
    cfg = PretrainConfig(method=method, **TINY)
    full = pretrain([synthetic_folders[0]], tmp_path / "full", cfg, progress=False)
    part = pretrain([synthetic_folders[0]], tmp_path / "part", cfg, progress=False, stop_after_epoch=1)
    assert load_checkpoint(part)["epoch"] == 0
    pretrain([synthetic_folders[0]], part, cfg, progress=False, resume=True)
    a, b = load_checkpoint(full)["model"], load_checkpoint(part)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    rows = list(csv.DictReader((part / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    records = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]


def test_resume_says_when_the_run_started_under_another_version(synthetic_folders, tmp_path):
    """A checkpoint written by another sim2obs version resumes, and the log says the result may
    differ from an uninterrupted run (the augmentations' code may have changed)."""
    cfg = PretrainConfig(**TINY)
    part = pretrain([synthetic_folders[0]], tmp_path / "part", cfg, progress=False, stop_after_epoch=1,
                    max_steps_per_epoch=1)
    ckpt = load_checkpoint(part)
    ckpt["sim2obs_version"] = "0.0.1"
    torch.save(ckpt, part / CHECKPOINT)
    lines: list[str] = []
    pretrain([synthetic_folders[0]], part, cfg, progress=False, resume=True, max_steps_per_epoch=1,
             log=lines.append)
    assert any("written by sim2obs 0.0.1" in line for line in lines), lines
    assert load_checkpoint(part)["epoch"] == 1


def test_resume_says_which_options_it_ignores(synthetic_folders, tmp_path):
    """--resume continues with the run's saved settings: the log names the command line's other
    values as ignored, and a finished run says there is nothing to train."""
    run = pretrain([synthetic_folders[0]], tmp_path / "run", PretrainConfig(**TINY), progress=False,
                   max_steps_per_epoch=1)
    lines: list[str] = []
    pretrain([synthetic_folders[0]], run, PretrainConfig(**{**TINY, "epochs": 4}), progress=False,
             resume=True, max_steps_per_epoch=1, log=lines.append)
    text = "\n".join(lines)
    assert "ignored: epochs=4 (the run's: 2)" in text and "nothing to train" in text
    assert load_checkpoint(run)["epoch"] == 1
    assert "bands=" not in text  # a setting left at its default was not asked for: not listed

    # the cap on steps per epoch is the run's too (the schedule depends on it)
    part = pretrain([synthetic_folders[0]], tmp_path / "part", PretrainConfig(**TINY), progress=False,
                    max_steps_per_epoch=1, stop_after_epoch=1)
    lines.clear()
    pretrain([synthetic_folders[0]], part, PretrainConfig(**TINY), progress=False, resume=True,
             log=lines.append)
    assert any("at most 1; asked: None" in line for line in lines), lines
    rows = list(csv.DictReader((part / "metrics.csv").open()))
    assert [int(r["steps"]) for r in rows] == [1, 2]


def test_resume_refuses_other_data(synthetic_folders, tmp_path):
    """A run resumes only on the data it was trained on: other folders (here the other survey,
    with another band count that would otherwise fail deep in load_state_dict), or a subset of
    its folders, are refused with both named; the same shards moved elsewhere resume."""
    import shutil

    cfg = PretrainConfig(**TINY, bands=("g", "r", "i"))
    two = pretrain(list(synthetic_folders), tmp_path / "two", cfg, progress=False, stop_after_epoch=1,
                   max_steps_per_epoch=1)
    data = load_checkpoint(two)["data"]
    assert data["bands"] == ["g", "r", "i"] and set(data["galaxies"]) == {"hsc", "lsst"}
    assert json.loads((two / "config.json").read_text())["data"] == data
    for folders in ([synthetic_folders[1]], [synthetic_folders[0]], synthetic_folders[::-1]):
        with pytest.raises(Sim2ObsValueError, match="resume with the run's own folders") as info:
            pretrain(list(folders), two, cfg, progress=False, resume=True, max_steps_per_epoch=1)
        assert "'hsc'" in str(info.value) and str(folders[0]) in str(info.value)
    assert load_checkpoint(two)["epoch"] == 0  # nothing written by the refused calls
    moved = [shutil.copytree(f, tmp_path / "moved" / f.name) for f in synthetic_folders]
    pretrain(moved, two, cfg, progress=False, resume=True, max_steps_per_epoch=1)
    assert load_checkpoint(two)["epoch"] == 1

    # a checkpoint from before the data record: the bands are still compared
    one = pretrain([synthetic_folders[1]], tmp_path / "one", PretrainConfig(**TINY), progress=False,
                   stop_after_epoch=1, max_steps_per_epoch=1)
    ckpt = load_checkpoint(one)
    del ckpt["data"]
    torch.save(ckpt, one / CHECKPOINT)
    with pytest.raises(Sim2ObsValueError, match=r"without \['z'\].*trained on other data: resume with"):
        pretrain([synthetic_folders[0]], one, PretrainConfig(**TINY), progress=False, resume=True)

    # a run of sim2obs 0.2.0 on two folders without --bands (it took the first folder's bands,
    # recorded in the checkpoint): resumes, on the bands it was trained on
    old = pretrain(list(synthetic_folders), tmp_path / "old", cfg, progress=False, stop_after_epoch=1,
                   max_steps_per_epoch=1)
    ckpt = load_checkpoint(old)
    ckpt["config"]["bands"] = None
    for key in ("data", "max_steps_per_epoch"):
        del ckpt[key]
    torch.save(ckpt, old / CHECKPOINT)
    pretrain(list(synthetic_folders), old, PretrainConfig(**TINY), progress=False, resume=True,
             max_steps_per_epoch=1)
    assert load_checkpoint(old)["epoch"] == 1 and load_checkpoint(old)["bands"] == ["g", "r", "i"]


def test_refused_run_leaves_no_folder(synthetic_folders, tmp_path):
    with pytest.raises(Sim2ObsValueError, match="lower --batch-size"):
        pretrain([synthetic_folders[0]], tmp_path / "new" / "run", PretrainConfig(**{**TINY, "batch_size": 4096}),
                 progress=False)
    assert not (tmp_path / "new").exists()


def test_resume_with_dropout_gives_the_same_weights(synthetic_folders, tmp_path):
    """Dropout draws from the global RNG: re-seeded from (seed, epoch, rank) each epoch, so a
    resumed run (a new process would start from a fresh RNG) draws the same masks."""
    vit = dict(TINY, encoder="vit", encoder_kwargs={"image_size": 32, "patch_size": 8, "dim": 16,
                                                     "depth": 1, "heads": 2, "dropout": 0.3})
    cfg = PretrainConfig(**vit)
    full = pretrain([synthetic_folders[0]], tmp_path / "full", cfg, progress=False, max_steps_per_epoch=2)
    part = pretrain([synthetic_folders[0]], tmp_path / "part", cfg, progress=False, stop_after_epoch=1,
                    max_steps_per_epoch=2)
    torch.manual_seed(12345)  # whatever the process did in between
    torch.rand(100)
    pretrain([synthetic_folders[0]], part, cfg, progress=False, resume=True, max_steps_per_epoch=2)
    a, b = load_checkpoint(full)["model"], load_checkpoint(part)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_cross_survey_pairs(synthetic_folders, tmp_path):
    from sim2obs.data.dataset import ShardDataset
    from sim2obs.pretrain.train import PairDataset

    ds = ShardDataset(list(synthetic_folders), bands=("g", "r", "i"))
    pairs = PairDataset(ds, cross_survey=True, seed=0)
    for i in (0, 5, len(ds) - 1):
        partners = pairs.partners[i]
        assert partners.size == 1
        j = int(partners[0])
        assert ds.object_id[j] == ds.object_id[i]  # the same galaxy ...
        assert ds.surveys[ds.file_of[j]] != ds.surveys[ds.file_of[i]]  # ... seen by the other survey
        a, b = pairs[i]
        assert not torch.equal(a["image"], b["image"])
    pretrain(list(synthetic_folders), tmp_path / "x", PretrainConfig(bands=("g", "r", "i"), **TINY),
             progress=False)


def test_multi_survey_augmentations_use_each_surveys_values(synthetic_folders, make_shards, tmp_path):
    """HSC + LSST: reddening uses each survey's own filter curves and worse seeing each survey's
    own PSF FWHM in its own pixels, selected per sample by the batch's survey indices."""
    from sim2obs.data.dataset import ShardDataset
    from sim2obs.data.shards import read_shard, write_shard
    from sim2obs.forward_models.surveys import get_survey
    from sim2obs.pretrain.augment import GalacticReddening, PSFDegrade, extinction_coefficients
    from sim2obs.pretrain.reobserve import Reobserve
    from sim2obs.pretrain.train import PairDataset, build_augment, survey_names

    bands = ("g", "r", "i")
    made = make_shards(tmp_path / "made", n=96, survey="lsst", bands=bands, seed=2)
    lsst_wide = tmp_path / "lsst"
    lsst_wide.mkdir()
    for path in sorted(made.glob("*.h5")):  # LSST-like seeing: 0.9 arcsec instead of 0.7
        shard = read_shard(path)
        labels = {**shard.labels, **{f"psf_fwhm_{b}": np.full(len(shard.labels["object_id"]), 0.9) for b in bands}}
        write_shard(lsst_wide / path.name, dataclasses_replace(shard, labels=labels))
    ds = ShardDataset([synthetic_folders[0], lsst_wide], bands=bands)
    assert survey_names(ds) == ("hsc", "lsst")
    reobserve = build_augment(PretrainConfig(bands=bands, **TINY), ds).transforms[0]
    assert isinstance(reobserve, Reobserve)
    physical = build_augment(PretrainConfig(bands=bands, augment="physical", **TINY), ds).transforms
    red = next(t for t in physical if isinstance(t, GalacticReddening))
    torch.testing.assert_close(reobserve.reddening.extinction_coeffs, red.extinction_coeffs)
    for row, name in enumerate(("hsc", "lsst")):
        expect = extinction_coefficients([b.filter for b in get_survey(name).with_bands(bands).bands])
        np.testing.assert_allclose(red.extinction_coeffs[row].numpy(), expect, rtol=1e-6)
    assert not np.allclose(red.extinction_coeffs[0], red.extinction_coeffs[1])
    psf = next(t for t in physical if isinstance(t, PSFDegrade))
    torch.testing.assert_close(reobserve.psf.fwhm_in_pix, psf.fwhm_in_pix)
    # 0.7 and 0.9 arcsec seeing at 0.168 arcsec per pixel, rows in survey order
    np.testing.assert_allclose(psf.fwhm_in_pix.numpy(), np.array([[0.7] * 3, [0.9] * 3]) / 0.168, rtol=1e-6)
    pairs = PairDataset(ds, cross_survey=True, seed=0)
    a, b = pairs.__getitems__([0, len(ds) - 1])
    expect_a = [survey_names(ds).index(ds.surveys[ds.file_of[i]]) for i in (0, len(ds) - 1)]
    assert a["survey"].tolist() == expect_a and b["survey"].tolist() == [1 - v for v in expect_a]
    # one survey: plain (B,) vectors, as before per-survey tables existed
    one = build_augment(PretrainConfig(bands=bands, **TINY), ShardDataset([lsst_wide], bands=bands))
    assert one.transforms[0].reddening.extinction_coeffs.ndim == 1
    # a survey sim2obs does not know, without PSF labels (ingested real data): the others' median
    real = tmp_path / "real"
    real.mkdir()
    for path in sorted(made.glob("*.h5")):
        shard = read_shard(path)
        labels = {k: v for k, v in shard.labels.items() if not k.startswith("psf_fwhm")}
        attrs = dataclasses_replace(shard.attrs, survey="my-telescope")
        write_shard(real / path.name, dataclasses_replace(shard, labels=labels, attrs=attrs))
    messages = []
    mixed = build_augment(PretrainConfig(bands=bands, **TINY),
                          ShardDataset([synthetic_folders[0], lsst_wide, real], bands=bands), messages.append)
    reob = mixed.transforms[0]
    np.testing.assert_allclose(reob.psf.fwhm_in_pix[2].numpy(), np.full(3, 0.8 / 0.168), rtol=1e-6)
    np.testing.assert_allclose(reob.reddening.extinction_coeffs[2].numpy(),
                               np.median(reob.reddening.extinction_coeffs[:2].numpy(), axis=0), rtol=1e-6)
    assert any("my-telescope" in m and "PSF FWHM" in m for m in messages)
    assert any("my-telescope" in m and "extinction" in m for m in messages)


def test_zero_masked_run_hides_masked_pixels(synthetic_folders, tmp_path):
    """--zero-masked: cosmic rays under ivar = 0 reach neither the views nor the embeddings; the
    option travels with the normaliser in the checkpoint."""
    from sim2obs.data.dataset import ShardDataset
    from sim2obs.data.shards import read_shard, write_shard
    from sim2obs.pretrain.augment import Compose
    from sim2obs.pretrain.evaluate import compute_embeddings
    from sim2obs.pretrain.train import PairDataset, prepare_views

    masked = tmp_path / "masked"
    masked.mkdir()
    for path in sorted(Path(synthetic_folders[0]).glob("*.h5")):
        shard = read_shard(path)
        images, ivar = shard.images.copy(), shard.ivar.copy()
        images[:, 0, 3:6, 10] = 50.0  # a bad column segment, masked in ivar
        ivar[:, 0, 3:6, 10] = 0.0
        write_shard(masked / path.name, dataclasses_replace(shard, images=images, ivar=ivar))
    run = pretrain([masked], tmp_path / "run", PretrainConfig(zero_masked=True, **TINY), progress=False,
                   max_steps_per_epoch=1)
    encoder, norm, _ = load_encoder(run)
    assert norm.zero_masked
    ds = ShardDataset(masked)
    a, b = PairDataset(ds, cross_survey=False, seed=0).__getitems__([0, 1])
    xa, _ = prepare_views(a, b, Compose([]), norm, None, torch.device("cpu"))
    assert torch.equal(xa[:, 0, 3:6, 10], torch.zeros(2, 3))
    assert not torch.equal(xa[:, 0, 3:6, 9], torch.zeros(2, 3))  # its neighbours are data
    # the clean images with the same pixels set to 0 are what the encoder sees of the masked ones
    zeroed = _embed_zeroed(encoder, norm, ShardDataset(synthetic_folders[0]))
    np.testing.assert_allclose(compute_embeddings(encoder, norm, ds), zeroed, rtol=0, atol=1e-7)
    unmasked = compute_embeddings(encoder, dataclasses_replace(norm, zero_masked=False), ds)
    assert np.abs(unmasked - zeroed).max() > 1e-5  # without the option the bad column shows (100x atol)


def _embed_zeroed(encoder, norm, ds):
    images = torch.from_numpy(np.stack([ds.raw(i)["image"] for i in range(len(ds))]))
    images[:, 0, 3:6, 10] = 0.0
    with torch.no_grad():
        return encoder.eval()(norm(images)).numpy()


def test_augment_presets_run_and_match_the_cli(synthetic_folders, tmp_path):
    import argparse

    from sim2obs.cli import build_parser
    from sim2obs.pretrain.reobserve import Reobserve
    from sim2obs.pretrain.train import AUGMENT_PRESETS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, flag in (("pretrain", "--augment"), ("benchmark", "--pretrain-augment")):
        action = next(a for a in sub.choices[name]._actions if flag in a.option_strings)
        assert tuple(action.choices) == AUGMENT_PRESETS
    run = pretrain([synthetic_folders[0]], tmp_path / "rot", PretrainConfig(augment="reobserve-rotate", **TINY),
                   progress=False, max_steps_per_epoch=1)
    assert load_checkpoint(run)["config"]["augment"] == "reobserve-rotate"
    from sim2obs.data.dataset import ShardDataset
    from sim2obs.pretrain.train import build_augment

    first = build_augment(PretrainConfig(augment="reobserve-rotate", **TINY), ShardDataset(synthetic_folders[0])).transforms[0]
    assert isinstance(first, Reobserve) and first.rotation is not None
    # the default: the shift inside Reobserve (noise topped up after it), then the flips only
    from sim2obs.pretrain.augment import RandomRot90Flip, RandomShift

    default = build_augment(PretrainConfig(**TINY), ShardDataset(synthetic_folders[0])).transforms
    assert [type(t) for t in default] == [Reobserve, RandomRot90Flip]
    assert default[0].max_shift == 1.0 and default[0].rotation is None
    physical = build_augment(PretrainConfig(augment="physical", **TINY), ShardDataset(synthetic_folders[0])).transforms
    assert isinstance(physical[-1], RandomShift)  # v3's chain unchanged
    with pytest.raises(Sim2ObsValueError, match="augment must be one of"):
        PretrainConfig(augment="full")


def test_epoch_reaches_persistent_workers(synthetic_folders, make_shards, tmp_path):
    """Three surveys (two partners per galaxy): the partner drawn for epoch 1 must be epoch 1's
    in a persistent worker too, whose copy of the dataset never sees set_epoch."""
    from sim2obs.data.dataset import ShardDataset
    from sim2obs.pretrain.train import EpochSampler, PairDataset, _collate

    third = make_shards(tmp_path / "des", n=96, survey="des", bands=("g", "r", "i"), seed=3)
    ds = ShardDataset([*synthetic_folders, third], bands=("g", "r", "i"))
    pairs = PairDataset(ds, cross_survey=True, seed=0)
    assert all(pairs.partners[i].size == 2 for i in range(len(ds)))
    draws = [[pairs.partner(i, epoch) for i in range(len(ds))] for epoch in (0, 1)]
    assert draws[0] != draws[1]  # the partner choice does change with the epoch

    def second_views(num_workers):
        sampler = EpochSampler(torch.utils.data.SequentialSampler(pairs))
        loader = torch.utils.data.DataLoader(pairs, batch_size=48, sampler=sampler, collate_fn=_collate,
                                             num_workers=num_workers, persistent_workers=num_workers > 0)
        out = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            out.append(torch.cat([b["image"] for _, b in loader]))
        return out

    expected = [torch.from_numpy(ds.raw_many(d)[0]) for d in draws]
    for num_workers in (0, 1):
        got = second_views(num_workers)
        for epoch in (0, 1):
            torch.testing.assert_close(got[epoch], expected[epoch], rtol=0, atol=0)


def test_augment_on_loader_same_run_for_any_num_workers(synthetic_folders, tmp_path):
    from sim2obs.data.dataset import Normalizer, ShardDataset
    from sim2obs.pretrain.train import LoaderViews, PairDataset, build_augment

    cfg = PretrainConfig(augment_on="loader", **TINY)
    runs = [pretrain([synthetic_folders[0]], tmp_path / f"w{w}", dataclasses_replace(cfg, num_workers=w),
                     progress=False, max_steps_per_epoch=3) for w in (0, 2)]
    a, b = (load_checkpoint(r)["model"] for r in runs)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # the views: normalised, augmented (not the bare stretch), a function of (seed, epoch, indices)
    ds = ShardDataset([synthetic_folders[0]])
    norm = Normalizer.from_noise(ds)
    views = LoaderViews(build_augment(cfg, ds), norm, seed=0)
    pairs = PairDataset(ds, cross_survey=False, seed=0, views=views)
    keys = [(0, 3), (0, 7), (0, 11)]
    xa, xb = pairs.__getitems__(keys)
    assert xa.shape == xb.shape == (3, 3, 32, 32) and xa.dtype == torch.float32
    torch.testing.assert_close(pairs.__getitems__(keys)[0], xa, rtol=0, atol=0)
    assert not torch.equal(xa, xb)  # two augmentations of the same image
    assert not torch.equal(pairs.__getitems__([(1, 3), (1, 7), (1, 11)])[0], xa)  # new epoch, new draws
    bare = norm(torch.from_numpy(ds.raw_many([3, 7, 11])[0]))
    assert not torch.allclose(xa, bare)
    from sim2obs.cli import main

    out = tmp_path / "cli"
    assert main(["pretrain", str(synthetic_folders[0]), "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--embed-dim", "16", "--augment-on", "loader",
                 "--num-workers", "1", "--device", "cpu", "--quiet", "--zero-masked"]) == 0
    assert load_checkpoint(out)["config"]["augment_on"] == "loader"
    assert load_checkpoint(out)["normalizer"]["zero_masked"] is True
    with pytest.raises(Sim2ObsValueError, match="augment_on"):
        PretrainConfig(augment_on="gpu")
    with pytest.raises(Sim2ObsValueError, match="--stream"):
        PretrainConfig(augment_on="loader", stream=True)


def test_bad_input(synthetic_folders, tmp_path):
    for order in (synthetic_folders[::-1], synthetic_folders):  # (g, r, i, z) and (g, r, i)
        # without --bands, folders with different band lists are an error in either order (the
        # extra band is not silently dropped); the message names both shards and the common bands
        with pytest.raises(Sim2ObsDataError, match=r"different band lists need --bands") as info:
            pretrain(list(order), tmp_path / "a", PretrainConfig(**TINY), progress=False)
        assert str(order[0]) in str(info.value) and str(order[1]) in str(info.value)
        assert "['g', 'r', 'i']" in str(info.value)
    with pytest.raises(Sim2ObsDataError, match=r"without \['z'\]"):
        pretrain(list(synthetic_folders), tmp_path / "a", PretrainConfig(**TINY, bands=("g", "z")),
                 progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no shard files"):
        pretrain([empty], tmp_path / "b", PretrainConfig(**TINY), progress=False)
    pretrain([synthetic_folders[0]], tmp_path / "c", PretrainConfig(**TINY), progress=False)
    with pytest.raises(Sim2ObsValueError, match="--resume"):
        pretrain([synthetic_folders[0]], tmp_path / "c", PretrainConfig(**TINY), progress=False)
    with pytest.raises(Sim2ObsValueError, match="batch"):
        pretrain([synthetic_folders[0]], tmp_path / "d", PretrainConfig(**{**TINY, "batch_size": 4096}),
                 progress=False)
    with pytest.raises(Sim2ObsValueError, match="method"):
        PretrainConfig(method="magic")


def test_device_and_precision_choices():
    assert resolve_device("cpu").type == "cpu"
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(Sim2ObsValueError, match="no CUDA"):
            resolve_device("cuda")


def test_cuda_device_is_the_local_rank(monkeypatch):
    """Under torchrun each process takes GPU LOCAL_RANK, for --device cuda as for auto."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES per process
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_bf16_channels_last_run(synthetic_folders, tmp_path):
    cfg = PretrainConfig(**{**TINY, "epochs": 1, "precision": "bf16", "channels_last": True})
    run = pretrain([synthetic_folders[0]], tmp_path / "bf16", cfg, progress=False)
    assert np.isfinite(float(next(csv.DictReader((run / "metrics.csv").open()))["train_loss"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_amp_run(synthetic_folders, tmp_path):
    run = pretrain([synthetic_folders[0]], tmp_path / "gpu", PretrainConfig(**{**TINY, "epochs": 1}),
                   device="cuda", progress=False)
    assert load_checkpoint(run)["epoch"] == 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_match_single_process(synthetic_folders, tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch: the loss per epoch matches
    the single-process run (GroupNorm + gathered embeddings make the maths identical; only float
    summation order differs)."""
    args = ["pretrain", str(synthetic_folders[0]), "--epochs", "2", "--batch-size", "16",
            "--embed-dim", "16", "--augment", "none", "--device", "cpu", "--quiet", "--norm", "group",
            "--val-fraction", "0.2"]
    single = tmp_path / "single"
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "sim2obs", *args, "--out", str(single)], check=True,
                   env=env, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "sim2obs", *args, "--out", str(ddp)],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    s = [float(r["train_loss"]) for r in csv.DictReader((single / "metrics.csv").open())]
    d = [float(r["train_loss"]) for r in csv.DictReader((ddp / "metrics.csv").open())]
    np.testing.assert_allclose(d, s, rtol=2e-3)


def test_damaged_checkpoint_and_bad_val_fraction_say_what_to_do(synthetic_folders, tmp_path):
    run = pretrain([synthetic_folders[0]], tmp_path / "run", PretrainConfig(**{**TINY, "epochs": 1}),
                   progress=False, max_steps_per_epoch=1)
    data = (run / CHECKPOINT).read_bytes()
    for damaged in (data[: len(data) // 2], b"not a checkpoint at all"):
        (run / CHECKPOINT).write_bytes(damaged)
        with pytest.raises(Sim2ObsDataError, match="truncated, corrupt or not a PyTorch file.*restore it "
                                                   "from a copy or train the run again"):
            load_checkpoint(run)
    torch.save({"weights": torch.zeros(2)}, run / CHECKPOINT)  # readable, but not a run's
    with pytest.raises(Sim2ObsDataError, match=r"not a sim2obs run checkpoint.*pretrain"):
        load_checkpoint(run)
    torch.save({"model": {}, "x": run}, run / CHECKPOINT)  # a pickled Path: refused unpickled
    with pytest.raises(Sim2ObsDataError, match="loading them could run code") as info:
        load_checkpoint(run)
    assert "weights_only" not in str(info.value) and "was damaged" not in str(info.value)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(Sim2ObsValueError, match=r"--val-fraction.*0 <= it < 1"):
            PretrainConfig(val_fraction=bad)


def test_cli_caps_steps_and_names_the_device(synthetic_folders, tmp_path, capsys):
    from sim2obs.cli import main

    out = tmp_path / "cli"
    assert main(["pretrain", str(synthetic_folders[0]), "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--embed-dim", "16", "--max-steps-per-epoch", "1",
                 "--device", "auto", "--quiet"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["steps"]) for r in rows] == [1]
    err = capsys.readouterr().err
    assert "device: " in err and "--device auto" in err
    assert "validation embeddings)" in err and "run saved in" in err
    assert main(["pretrain", str(synthetic_folders[0]), "--out", str(tmp_path / "x"),
                 "--max-steps-per-epoch", "0"]) == 1
    assert "--max-steps-per-epoch must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
