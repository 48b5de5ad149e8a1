"""Pretraining throughput: ``sim2obs pretrain`` vs a bare reference loop, in one run.

* bare loop: the same model (encoder + projection head), the same global batch and loss, on
  tensors already in memory, with the cheapest possible views (flips) -- the ceiling;
* sim2obs: :func:`sim2obs.pretrain.train.pretrain` reading HDF5 shards lazily, with the default
  physical augmentations, normalisation, metrics and checkpointing;
* loader only: reading + augmenting + normalising batches without a model, through the same
  :func:`~sim2obs.pretrain.train.prepare_views` as pretrain (must be much faster than training,
  or the data pipeline is the bottleneck);
* fp32 vs bf16 autocast + channels_last, and the GPU when one is present.

Ratios are taken within this run (machines here are noisy). Usage:
``python benchmarks/pretrain.py [--n 512] [--batch-size 64] [--steps 6] [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_synthetic_shards  # noqa: E402  (synthetic shards with known noise)

from sim2obs import encoders  # noqa: E402
from sim2obs.data.dataset import Normalizer, ShardDataset  # noqa: E402
from sim2obs.pretrain.losses import NTXentLoss  # noqa: E402
from sim2obs.pretrain.train import (  # noqa: E402
    PairDataset,
    PretrainConfig,
    SSLModel,
    _collate,
    autocast_dtype,
    build_augment,
    prepare_views,
    pretrain,
)


def bare_loop(x: torch.Tensor, cfg: PretrainConfig, steps: int, device: torch.device) -> float:
    """Samples/s of the minimal training loop on in-memory tensors."""
    torch.manual_seed(0)
    enc = encoders.build(cfg.encoder, x.shape[1], cfg.embed_dim, **cfg.encoder_kwargs)
    model = SSLModel(enc, cfg.proj_hidden, cfg.proj_dim).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = NTXentLoss(cfg.temperature)
    amp = autocast_dtype(cfg.precision, device)
    x = x.to(device)
    bs = cfg.batch_size

    def one(i):
        b = x[(i * bs) % (len(x) - bs):][:bs]
        v1, v2 = b, torch.flip(b, dims=(-1,))
        if cfg.channels_last:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            _, z1 = model(torch.asinh(v1))
            _, z2 = model(torch.asinh(v2))
            loss = loss_fn(z1.float(), z2.float())
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
    """Samples/s of sim2obs pretrain (training loop time, as logged in metrics.csv)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = pretrain([folder], Path(tmp) / "run", cfg, device=device, progress=False,
                       max_steps_per_epoch=steps)
        import csv

        rows = list(csv.DictReader((run / "metrics.csv").open()))
        return float(rows[-1]["samples_per_s"])


def loader_rate(folder: Path, cfg: PretrainConfig, steps: int, device: torch.device) -> float:
    ds = ShardDataset([folder], split="train", val_fraction=cfg.val_fraction)
    norm = Normalizer.from_noise(ds)
    aug = build_augment(cfg, ds).to(device)
    loader = torch.utils.data.DataLoader(PairDataset(ds, True, 0), batch_size=cfg.batch_size,
                                         shuffle=True, drop_last=True, collate_fn=_collate,
                                         num_workers=cfg.num_workers)
    g = torch.Generator().manual_seed(0)
    n = 0
    t = time.perf_counter()
    for i, (a, b) in enumerate(loader):
        prepare_views(a, b, aug, norm, g, device, cfg.channels_last)  # what pretrain does per step
        n += cfg.batch_size
        if i + 1 >= steps:
            break
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="galaxies in the synthetic shards")
    p.add_argument("--stamp", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run, < 1 min)")
    args = p.parse_args()
    if args.quick:
        args.n, args.stamp, args.batch_size, args.steps = 128, 32, 32, 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_synthetic_shards(Path(tmp) / "shards", n=args.n, bands=("g", "r", "i", "z", "y"),
                                       stamp=args.stamp, shard_size=256)
        x = torch.from_numpy(np.concatenate(
            [ShardDataset([folder]).raw(i)["image"][None] for i in range(args.n)]))
        print(f"{args.n} synthetic 5-band {args.stamp}x{args.stamp} galaxies, global batch "
              f"{args.batch_size}, {args.steps} timed steps, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        for dev in devices:
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
            for label, prec, cl in (("fp32", "fp32", False), ("bf16+channels_last", "bf16", True)):
                cfg = PretrainConfig(batch_size=args.batch_size, precision=prec, channels_last=cl,
                                     val_fraction=0.05, epochs=1, warmup_epochs=0.0)
                bare = bare_loop(x, cfg, args.steps, dev)
                ours = sim2obs_rate(folder, cfg, args.steps, dev.type)
                load = loader_rate(folder, cfg, args.steps, dev)
                print(f"[{name}, {label:18s}] bare loop {bare:8.1f} samples/s | sim2obs pretrain "
                      f"{ours:8.1f} ({ours / bare:4.2f}x bare, target >= 0.9) | loader+augment "
                      f"{load:8.1f} ({load / ours:4.1f}x training, target >= 3)")


if __name__ == "__main__":
    main()
