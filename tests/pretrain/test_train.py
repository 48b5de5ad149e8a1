"""Training loop: runs, resumes to identical weights, DDP matches single process, bad input."""

import csv
import os
import subprocess
import sys

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


def test_bad_input(synthetic_folders, tmp_path):
    with pytest.raises(Sim2ObsDataError, match="missing"):
        # second folder lacks 'z'
        pretrain([synthetic_folders[1], synthetic_folders[0]], tmp_path / "a", PretrainConfig(**TINY),
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


def test_bf16_channels_last_run(synthetic_folders, tmp_path):
    cfg = PretrainConfig(**{**TINY, "epochs": 1, "precision": "bf16", "channels_last": True})
    run = pretrain([synthetic_folders[0]], tmp_path / "bf16", cfg, progress=False)
    assert np.isfinite(float(next(csv.DictReader((run / "metrics.csv").open()))["train_loss"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_amp_run(synthetic_folders, tmp_path):
    run = pretrain([synthetic_folders[0]], tmp_path / "gpu", PretrainConfig(**{**TINY, "epochs": 1}),
                   device="cuda", progress=False)
    assert load_checkpoint(run)["epoch"] == 0


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
                          "--master_port", "29517", "-m", "sim2obs", *args, "--out", str(ddp)],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    s = [float(r["train_loss"]) for r in csv.DictReader((single / "metrics.csv").open())]
    d = [float(r["train_loss"]) for r in csv.DictReader((ddp / "metrics.csv").open())]
    np.testing.assert_allclose(d, s, rtol=2e-3)
