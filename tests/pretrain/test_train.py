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


def test_warm_up_fits_short_runs_and_resumes_keep_their_own():
    """Default warm-up: 2 epochs, at most a tenth of the run (a 1-epoch run reaches the peak rate
    and decays); an explicit value, or the 2.0 that runs of sim2obs < 0.2.2 recorded, is kept."""
    assert PretrainConfig(epochs=1).warmup_epochs_used == pytest.approx(0.1)
    assert PretrainConfig(epochs=10).warmup_epochs_used == pytest.approx(1.0)
    assert PretrainConfig(epochs=50).warmup_epochs_used == 2.0
    assert PretrainConfig(epochs=1, warmup_epochs=0.5).warmup_epochs_used == 0.5
    old = PretrainConfig.from_dict({**PretrainConfig(epochs=5).to_dict(), "warmup_epochs": 2.0})
    assert old.warmup_epochs_used == 2.0


def test_one_epoch_run_reaches_the_peak_rate_and_decays(synthetic_folders, tmp_path):
    from sim2obs.pretrain.train import _lr_lambda

    cfg = PretrainConfig(**{**TINY, "epochs": 1})
    run = pretrain([synthetic_folders[0]], tmp_path / "one", cfg, progress=False)
    steps = int(next(csv.DictReader((run / "metrics.csv").open()))["steps"])
    warm = int(cfg.warmup_epochs_used * steps) or 1
    factors = [_lr_lambda(warm, steps)(k) for k in range(steps)]
    assert max(factors) == 1.0 and factors[-1] < 0.5  # peak reached, then the cosine decay
    lr_end = float(next(csv.DictReader((run / "metrics.csv").open()))["lr"])
    assert lr_end == pytest.approx(cfg.lr * _lr_lambda(warm, steps)(steps), rel=1e-6)


def test_resume_with_another_number_of_processes_is_said_and_recorded(synthetic_folders, tmp_path):
    """A run started by 2 processes and resumed by 1: the log says the weights will differ from
    the uninterrupted run and how to reproduce it; config.json and the checkpoint record the
    processes of each start."""
    from sim2obs.pretrain.checkpoint import save_checkpoint

    cfg = PretrainConfig(**{**TINY, "epochs": 2})
    run = pretrain([synthetic_folders[0]], tmp_path / "run", cfg, progress=False, stop_after_epoch=1)
    ckpt = load_checkpoint(run)
    assert ckpt["world_sizes"] == [1]
    save_checkpoint(run / CHECKPOINT, {**ckpt, "world_size": 2, "world_sizes": [2]})  # as torchrun wrote it
    lines: list[str] = []
    pretrain([synthetic_folders[0]], run, cfg, resume=True, progress=False, log=lines.append)
    note = next(line for line in lines if line.startswith("note:") and "processes" in line)
    assert "trained with 2 processes and resumes with 1" in note and "--nproc_per_node 2" in note
    assert json.loads((run / "config.json").read_text())["world_sizes"] == [2, 1]
    assert load_checkpoint(run)["world_sizes"] == [2, 1]


def test_run_arguments_that_are_not_runs_say_what_to_pass(synthetic_folders, tmp_path):
    """The checkpoint file itself is accepted as the run; a shard folder passed as the run (the
    arguments swapped) and a shard file passed as a folder are named for what they are."""
    from sim2obs.data.shards import list_shards
    from sim2obs.errors import Sim2ObsFileNotFoundError
    from sim2obs.pretrain.checkpoint import checkpoint_hash

    run = pretrain([synthetic_folders[0]], tmp_path / "run", PretrainConfig(**{**TINY, "epochs": 1}),
                   progress=False, max_steps_per_epoch=1)
    encoder, _, _ = load_encoder(run / CHECKPOINT)
    assert checkpoint_hash(run / CHECKPOINT) == checkpoint_hash(run)
    with pytest.raises(Sim2ObsFileNotFoundError, match="holds shards, not a run.*swapped"):
        load_encoder(synthetic_folders[0])
    shard = list_shards(synthetic_folders[0])[0]
    with pytest.raises(Sim2ObsFileNotFoundError, match=f"is a file.*pass its folder '{shard.parent}'"):
        list_shards(shard)


def test_identical_runs_write_identical_checkpoint_bytes(synthetic_folders, tmp_path):
    """The same command twice gives checkpoint files of the same bytes, so checkpoint_hash (the
    provenance written into embeddings, probe and adapt records) identifies the model, not the
    attempt (torch.save to a temporary path used to name the archive's folder after it)."""
    from sim2obs.pretrain.checkpoint import checkpoint_hash

    cfg = PretrainConfig(**{**TINY, "epochs": 1})
    runs = [pretrain([synthetic_folders[0]], tmp_path / name, cfg, progress=False, max_steps_per_epoch=1)
            for name in ("a", "b")]
    a, b = ((run / CHECKPOINT).read_bytes() for run in runs)
    assert a == b
    assert checkpoint_hash(runs[0]) == checkpoint_hash(runs[1])


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


def test_run_stopped_before_its_first_checkpoint_leaves_no_folder(synthetic_folders, tmp_path, monkeypatch):
    """Ctrl-C (or bad data found while reading) before the first checkpoint: the folder this call
    made goes (nothing in it could be resumed); a folder that existed -- a resumed run -- stays."""
    import sim2obs.pretrain.train as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    cfg = PretrainConfig(**{**TINY, "epochs": 2})
    run = pretrain([synthetic_folders[0]], tmp_path / "kept", cfg, progress=False, stop_after_epoch=1)
    monkeypatch.setattr(train, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain([synthetic_folders[0]], tmp_path / "new", cfg, progress=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt):
        pretrain([synthetic_folders[0]], run, cfg, resume=True, progress=False)
    assert (run / CHECKPOINT).is_file()


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


def test_zero_masked_run_hides_masked_pixels(synthetic_folders, tmp_path):
    """--zero-masked: cosmic rays under ivar = 0 reach neither the views nor the embeddings; the
    option travels with the normaliser in the checkpoint."""
    from sim2obs.data.dataset import ShardDataset
    from sim2obs.data.shards import read_shard, write_shard
    from sim2obs.pretrain.augment import Compose
    from sim2obs.pretrain.evaluate import compute_embeddings
    from sim2obs.pretrain.views import PairDataset, prepare_views

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


@pytest.mark.slow
def test_compiled_run_matches_eager_and_saves_plain_weights(synthetic_folders, tmp_path, monkeypatch):
    """--compile: the same run through torch.compile (inductor on the CPU) has the eager run's
    training and validation losses (to 1e-4 and 1e-3: fused kernels round differently), and its
    checkpoint holds the plain model's keys (no '_orig_mod.' prefix), so embed/probe and an eager
    --resume load it. (Weights are not compared element by element: AdamW's first steps move a
    parameter by ~lr times the sign of its gradient, which rounding flips where that is ~0.)"""
    cfg = PretrainConfig(**{**TINY, "epochs": 1, "precision": "fp32", "channels_last": False})
    compiled_models = []
    real_compile = torch.compile

    def spy(model, *args, **kwargs):  # the run really goes through torch.compile
        compiled_models.append(model)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        runs[name] = pretrain([synthetic_folders[0]], tmp_path / name, dataclasses_replace(cfg, compile=compile_),
                              progress=False, max_steps_per_epoch=2)
    assert len(compiled_models) == 1 and hasattr(compiled_models[0], "encoder")
    rows = {k: next(csv.DictReader((run / "metrics.csv").open())) for k, run in runs.items()}
    # the mean loss of the two steps to 1e-4; the validation loss, after both AdamW updates (where
    # a gradient ~0 flips sign a parameter moves by 2 lr the other way), to 1e-3
    for col, rel in (("train_loss", 1e-4), ("val_loss", 1e-3)):
        assert float(rows["compiled"][col]) == pytest.approx(float(rows["eager"][col]), rel=rel), col
    eager, compiled = (load_checkpoint(runs[k]) for k in ("eager", "compiled"))
    assert eager["model"].keys() == compiled["model"].keys()
    assert compiled["config"]["compile"] is True
    encoder, _, _ = load_encoder(runs["compiled"])
    assert sum(p.numel() for p in encoder.parameters()) > 0


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


def test_a_callers_one_rank_group_runs_the_ddp_path(synthetic_folders, tmp_path):
    """A process group the caller initialised -- here one gloo rank, as a one-GPU machine can
    run nccl -- is joined, not created: the run goes through DDP and the gathered loss (the log
    names the group), matches the single-process run, and leaves the caller's group alone; under
    torchrun the group pretrain created is destroyed when it returns."""
    script = f"""
import csv, sys, torch.distributed as dist
from sim2obs.pretrain.train import PretrainConfig, pretrain
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
cfg = PretrainConfig(epochs=1, batch_size=16, embed_dim=16, proj_hidden=32, proj_dim=16, val_fraction=0.2,
                     encoder_kwargs={{"width": 8, "depths": [1, 1], "stem_stride": 2}}, norm="group")
lines = []
for name in ("ddp", "plain"):
    if name == "plain":
        dist.destroy_process_group()
    run = pretrain([sys.argv[1]], sys.argv[2] + "/" + name, cfg, device="cpu", progress=False,
                   max_steps_per_epoch=2, log=lines.append)
    print(name, list(csv.DictReader(open(run / "metrics.csv")))[0]["train_loss"])
    if name == "ddp":
        print("still initialised:", dist.is_initialized())
print("\\n".join(lines))
"""
    res = subprocess.run([sys.executable, "-c", script, str(synthetic_folders[0]), str(tmp_path)],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "still initialised: True" in out and "1 process;" in out
    losses = dict(line.split() for line in out.splitlines() if line.startswith(("ddp ", "plain ")))
    assert float(losses["ddp"]) == pytest.approx(float(losses["plain"]), rel=1e-5)


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


def test_non_finite_loss_stops_the_run_naming_the_step(synthetic_folders, tmp_path, monkeypatch):
    """A loss that turns NaN stops the run with the epoch and step named; the checkpoint of the
    last finished epoch stays as it was (finite weights), so --resume starts from it."""
    import math

    import sim2obs.pretrain.train as train_mod

    real = train_mod._make_loss
    calls = {"n": 0}

    def poisoned(config, gather):
        fn = real(config, gather=gather)

        def loss(za, zb):
            calls["n"] += 1
            out = fn(za, zb)
            return out * float("nan") if calls["n"] == 5 else out  # epoch 2, its 2nd step (3 per epoch)
        return loss

    monkeypatch.setattr(train_mod, "_make_loss", poisoned)
    cfg = PretrainConfig(**{**TINY, "val_fraction": 0.0})
    with pytest.raises(Sim2ObsValueError, match=r"loss became nan at epoch 2 step 2: lower --lr"):
        pretrain([synthetic_folders[0]], tmp_path / "run", cfg, progress=False, max_steps_per_epoch=3)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(math.isfinite(float(r["train_loss"])) for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
