"""Training views: cross-survey pairs, the augmentation presets, per-survey tables, and views
made in DataLoader workers that do not depend on the number of workers."""

from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import torch

from sim2obs.errors import Sim2ObsValueError
from sim2obs.pretrain.train import PretrainConfig, load_checkpoint, pretrain

TINY = dict(epochs=2, batch_size=16, encoder_kwargs={"width": 8, "depths": [1, 1], "stem_stride": 2},
            embed_dim=16, proj_hidden=32, proj_dim=16, val_fraction=0.2)


def test_cross_survey_pairs(synthetic_folders, tmp_path):
    from sim2obs.data.dataset import ShardDataset
    from sim2obs.pretrain.views import PairDataset

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
    from sim2obs.pretrain.views import PairDataset, build_augment, survey_names

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


def test_augment_presets_run_and_match_the_cli(synthetic_folders, tmp_path):
    import argparse

    from sim2obs.cli import build_parser
    from sim2obs.pretrain.reobserve import Reobserve
    from sim2obs.pretrain.views import AUGMENT_PRESETS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, flag in (("pretrain", "--augment"), ("benchmark", "--pretrain-augment")):
        action = next(a for a in sub.choices[name]._actions if flag in a.option_strings)
        assert tuple(action.choices) == AUGMENT_PRESETS
    run = pretrain([synthetic_folders[0]], tmp_path / "rot", PretrainConfig(augment="reobserve-rotate", **TINY),
                   progress=False, max_steps_per_epoch=1)
    assert load_checkpoint(run)["config"]["augment"] == "reobserve-rotate"
    from sim2obs.data.dataset import ShardDataset
    from sim2obs.pretrain.views import build_augment

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
    from sim2obs.pretrain.views import EpochSampler, PairDataset, _collate

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
    from sim2obs.pretrain.views import LoaderViews, PairDataset, build_augment

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


def test_bf16_loader_views_travel_in_bf16_with_the_same_training(synthetic_folders, tmp_path, monkeypatch):
    """bf16 runs with --augment-on loader: the workers send views already rounded to bfloat16
    (half the bytes); autocast would have rounded the float32 views the same way at the first
    convolution, so the weights are bit-identical to a run whose views travel in float32."""
    import sim2obs.pretrain.train as train_mod
    from sim2obs.data.dataset import Normalizer, ShardDataset
    from sim2obs.pretrain.views import LoaderViews, PairDataset, build_augment

    cfg = PretrainConfig(augment_on="loader", precision="bf16", channels_last=True, **TINY)
    cpu = torch.device("cpu")
    assert train_mod._loader_views_dtype(cfg, cpu) == torch.bfloat16
    assert train_mod._loader_views_dtype(dataclasses_replace(cfg, precision="fp32"), cpu) is None
    bf16 = pretrain([synthetic_folders[0]], tmp_path / "bf16", cfg, progress=False, max_steps_per_epoch=3)
    monkeypatch.setattr(train_mod, "_loader_views_dtype", lambda config, device: None)
    fp32 = pretrain([synthetic_folders[0]], tmp_path / "fp32", cfg, progress=False, max_steps_per_epoch=3)
    a, b = (load_checkpoint(r)["model"] for r in (bf16, fp32))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # the views themselves: the float32 ones rounded, in channels_last
    ds = ShardDataset([synthetic_folders[0]])
    norm, aug = Normalizer.from_noise(ds), build_augment(cfg, ds)
    keys = [(0, 3), (0, 7)]
    x32 = PairDataset(ds, False, 0, views=LoaderViews(aug, norm, 0, True)).__getitems__(keys)[0]
    x16 = PairDataset(ds, False, 0, views=LoaderViews(aug, norm, 0, True, torch.bfloat16)).__getitems__(keys)[0]
    assert x16.dtype == torch.bfloat16 and x16.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x16, x32.to(torch.bfloat16), rtol=0, atol=0)
