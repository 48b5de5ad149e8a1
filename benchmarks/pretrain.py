"""Pretraining throughput: ``sim2obs pretrain`` vs a bare reference loop, in one run.

* bare loop: the same model (encoder + projection head), the same global batch and loss, on
  views already made and in memory (the stretched image and its mirror) -- the ceiling;
* sim2obs: :func:`sim2obs.pretrain.train.pretrain` reading HDF5 shards lazily, with the default
  ``reobserve`` views, normalisation, gradient clipping and the schedule: the rate logged for
  its last epoch (the training loop; the validation pass, metrics row and checkpoint that follow
  each epoch are not in it, and the first epoch holds the start-up, as the bare loop's untimed
  warm-up step does);
* loader only: reading + augmenting + normalising batches without a model, exactly as pretrain
  makes them (must be much faster than training, or the data pipeline is the bottleneck);
* two ways to share the CPU: (a) everything on all threads, augmentations in the training
  process (``--augment-on device``, the default); (b) one core for the data: the model on
  ``threads - 1`` threads and the augmentations in one DataLoader worker in parallel
  (``--augment-on loader --num-workers 1``), compared with the bare loop on the same
  ``threads - 1`` threads;
* fp32 vs bf16 autocast + channels_last, and the GPU when one is present;
* where the data path's time goes: each stage on one thread, per step.

Ratios are taken within this run (machines here are noisy). Usage:
``python benchmarks/pretrain.py [--n 1536] [--batch-size 64] [--steps 20] [--quick]``; with
``SIM2OBS_RETAIN_FREED_MEMORY=0`` glibc's malloc returns freed blocks to the system as before
0.2.3 (:mod:`sim2obs._memory`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_synthetic_shards  # noqa: E402  (synthetic shards with known noise)

from sim2obs import encoders  # noqa: E402
from sim2obs._memory import retain_freed_memory  # noqa: E402
from sim2obs.data.dataset import Normalizer, ShardDataset  # noqa: E402
from sim2obs.pretrain.losses import NTXentLoss  # noqa: E402
from sim2obs.pretrain.train import PretrainConfig, SSLModel, autocast_dtype, pretrain  # noqa: E402
from sim2obs.pretrain.views import LoaderViews, PairDataset, _collate, build_augment, prepare_views  # noqa: E402


def bare_loop(x: torch.Tensor, cfg: PretrainConfig, steps: int, device: torch.device) -> float:
    """Samples/s of the minimal training loop on in-memory tensors: both views (the
    stretched image and its mirror) made before timing, so only the model step is timed."""
    torch.manual_seed(0)
    enc = encoders.build(cfg.encoder, x.shape[1], cfg.embed_dim, **cfg.encoder_kwargs)
    model = SSLModel(enc, cfg.proj_hidden, cfg.proj_dim).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = NTXentLoss(cfg.temperature)
    amp = autocast_dtype(cfg.precision, device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    view1 = torch.asinh(x).to(device).contiguous(memory_format=fmt)  # stretched once, outside the loop
    view2 = torch.flip(view1, dims=(-1,)).contiguous(memory_format=fmt)
    bs = cfg.batch_size

    def one(i):
        start = (i * bs) % (len(x) - bs)
        v1, v2 = view1[start:start + bs], view2[start:start + bs]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            _, z1 = model(v1)
            _, z2 = model(v2)
        loss = loss_fn(z1.float(), z2.float())  # float32, outside autocast, as pretrain does
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        one(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - t)


def sim2obs_rate(folder: Path, cfg: PretrainConfig, steps: int, device: str) -> float:
    """Samples/s of sim2obs pretrain: its last epoch's rate in metrics.csv (training loop time;
    the first epoch holds the start-up: worker processes, first kernels)."""
    import csv

    with tempfile.TemporaryDirectory() as tmp:
        run = pretrain([folder], Path(tmp) / "run", cfg, device=device, progress=False,
                       max_steps_per_epoch=steps)
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        return float(rows[-1]["samples_per_s"])


def loader_rate(folder: Path, cfg: PretrainConfig, steps: int, device: torch.device) -> float:
    """Samples/s of the data path alone (batches made as pretrain makes them; the first batch,
    with the workers' start-up, is not timed)."""
    ds = ShardDataset([folder], split="train", val_fraction=cfg.val_fraction)
    norm = Normalizer.from_noise(ds)
    aug = build_augment(cfg, ds).to(device)
    views = (LoaderViews(build_augment(cfg, ds), norm, cfg.seed, cfg.channels_last and device.type == "cpu",
                         dtype=autocast_dtype(cfg.precision, device))
             if cfg.augment_on == "loader" else None)  # its own (CPU) copy, as pretrain builds it
    loader = torch.utils.data.DataLoader(PairDataset(ds, True, 0, views=views), batch_size=cfg.batch_size,
                                         shuffle=True, drop_last=True, collate_fn=_collate,
                                         num_workers=cfg.num_workers)
    # on a GPU the noise fields are drawn there, from a CUDA generator, as pretrain draws them
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(0)
    n, t = 0, 0.0
    for i, (a, b) in enumerate(loader):
        if views is None:
            prepare_views(a, b, aug, norm, g, device, cfg.channels_last)  # what pretrain does per step
        else:
            fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
            a.to(device).contiguous(memory_format=fmt), b.to(device).contiguous(memory_format=fmt)
        if i == 0:
            t = time.perf_counter()
            continue
        n += cfg.batch_size
        if i >= steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()  # the last batch's kernels have run
    return n / (time.perf_counter() - t)


def data_path_ms(folder: Path, cfg: PretrainConfig, repeats: int = 10) -> dict[str, float]:
    """Milliseconds per step (a batch of pairs: 2 x batch_size stamps) of each stage of the data
    path on one thread, as a DataLoader worker runs it: HDF5 read, stacking, each augmentation,
    the arcsinh stretch."""
    ds = ShardDataset([folder], split="train", val_fraction=cfg.val_fraction)
    norm = Normalizer.from_noise(ds)
    aug = build_augment(cfg, ds)
    pairs = PairDataset(ds, True, 0)
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        times[name] = times.get(name, 0.0) + (time.perf_counter() - t) * 1e3
        return out

    try:
        for rep in range(repeats + 1):
            if rep == 1:
                times.clear()  # the first round warms up
            idx = rng.choice(len(ds), cfg.batch_size, replace=False).tolist()
            a, b = timed("HDF5 read", pairs.__getitems__, idx)
            x = timed("stack views", torch.cat, [a["image"], b["image"]])
            ivar = torch.cat([a["ivar"], b["ivar"]])
            for t in aug.transforms:
                ctx = {"ivar": ivar} if "ivar" in getattr(t, "context_keys", ()) else {}
                x = timed(type(t).__name__, t, x, g, **ctx)
            timed("arcsinh stretch", norm, x)
    finally:
        torch.set_num_threads(threads)
    return {k: v / repeats for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1536, help="galaxies in the synthetic shards")
    p.add_argument("--stamp", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps (training: per epoch, 2 epochs)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run, < 1 min)")
    args = p.parse_args()
    # as the sim2obs command does for its process (and pretrain for its DataLoader workers), so the
    # bare loop and sim2obs run under the same allocator settings; SIM2OBS_RETAIN_FREED_MEMORY=0
    # compares with glibc's default (sim2obs < 0.2.3)
    retained = retain_freed_memory()
    if args.quick:
        args.n, args.stamp, args.batch_size, args.steps = 160, 32, 32, 3
    threads = torch.get_num_threads()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_synthetic_shards(Path(tmp) / "shards", n=args.n, bands=("g", "r", "i", "z", "y"),
                                       stamp=args.stamp, shard_size=256)
        x = torch.from_numpy(ShardDataset([folder]).raw_many(np.arange(args.n))[0])
        print(f"{args.n} synthetic 5-band {args.stamp}x{args.stamp} galaxies, global batch "
              f"{args.batch_size}, {args.steps} timed steps, torch {torch.__version__}, "
              f"{threads} threads, freed memory {'kept (mallopt)' if retained else 'released (glibc default)'}")
        for dev in devices:
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
            # (label, model threads, where the augmentations run, DataLoader workers)
            shares = [(f"{threads} threads, augment on device", threads, "device", 0)]
            if dev.type == "cpu" and threads > 1:
                shares.append((f"{threads - 1} model thread(s) + 1 loader worker", threads - 1, "loader", 1))
            elif dev.type == "cuda":
                shares.append(("augment in 1 loader worker (CPU)", threads, "loader", 1))
            for share, n_threads, augment_on, workers in shares:
                torch.set_num_threads(n_threads)
                for label, prec, cl in (("fp32", "fp32", False), ("bf16+channels_last", "bf16", True)):
                    cfg = PretrainConfig(batch_size=args.batch_size, precision=prec, channels_last=cl,
                                         val_fraction=0.05, epochs=2, warmup_epochs=0.0,
                                         augment_on=augment_on, num_workers=workers)
                    bare = bare_loop(x, cfg, args.steps, dev)
                    ours = sim2obs_rate(folder, cfg, args.steps, dev.type)
                    load = loader_rate(folder, cfg, args.steps, dev)
                    print(f"[{name}, {share}, {label}] bare loop {bare:7.1f} samples/s | sim2obs "
                          f"pretrain {ours:7.1f} ({ours / bare:4.2f}x bare, target >= 0.9) | loader"
                          f"+augment {load:7.1f} ({load / ours:4.1f}x training, target >= 3)")
                    if dev.type == "cpu" and augment_on == "loader" and threads > 1:
                        # the data pipeline's capacity on the whole machine: one worker per thread
                        # (what k workers give a training run with k cores to spare)
                        every = loader_rate(folder, dataclasses.replace(cfg, num_workers=threads),
                                            args.steps, dev)
                        print(f"    loader+augment alone in {threads} workers: {every:7.1f} samples/s "
                              f"({every / ours:4.1f}x the training rate above)")
            torch.set_num_threads(threads)
        cfg = PretrainConfig(batch_size=args.batch_size, val_fraction=0.05)
        ms = data_path_ms(folder, cfg)
        print(f"data path per step ({2 * args.batch_size} stamps), one thread: "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()) + f"; total {sum(ms.values()):.0f} ms")


if __name__ == "__main__":
    main()
