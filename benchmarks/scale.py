#!/usr/bin/env python
"""Benchmark: scaling out -- Dask rendering throughput and streaming-loader memory.

(a) **Rendering, 1 vs 2 Dask workers.** ``render_to_shards(job, ids, out, dask=client)`` on the
    built-in ``mini`` source (HSC grizy, 64x64 stamps, ``RenderConfig(stamp=64)``, seed 0, as
    ``sim2obs render --source mini --survey hsc`` builds it), with a ``LocalCluster`` of 1 and of
    2 single-threaded worker processes (what ``--dask local:1`` / ``local:2`` start). Each
    configuration runs in a fresh subprocess, which:

    1. starts the cluster and a client (timed and printed, but *not* part of the rate);
    2. warms every worker up by rendering 2 one-galaxy shards per worker into a scratch folder
       (imports, SSP library and band-flux tables; not timed);
    3. times one ``render_to_shards`` call over N galaxies in shards of ``--shard-size``: task
       submission, rendering, the workers' atomic HDF5 writes and the client's manifest update
       (hashing the new shards), i.e. the wall time a user waits once the cluster is up.

    Best of ``--repeats`` runs, the two configurations alternating. The ratio of the two rates
    is the speed-up (target >= 1.8x on 2 cores). The CPU used by *other* processes on the machine
    during each run is printed: a busy neighbour lowers the speed-up.

(b) **Loader memory, 10 vs 100 shards.** Synthetic shards of ``--objects`` galaxies (3 bands,
    ``--stamp`` pixels, float32 images + ivar, written with ``write_shard`` and a manifest) are
    read for one epoch through a ``DataLoader(batch_size=32)`` over

    * ``StreamingShardDataset`` (shuffle buffer ``--shuffle-buffer`` items), and
    * for contrast, the random-access ``ShardDataset`` with a shuffling sampler.

    Each run is a fresh subprocess; the number printed is the growth of the process's peak RSS
    (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after the dataset is built) during
    the epoch. Flat means the 100-shard figure is about the 10-shard one (ratio ~1).

Usage::

    python benchmarks/scale.py            # ~2-3 minutes on 2 idle cores
    python benchmarks/scale.py --quick    # smoke run, < 1 minute
    python benchmarks/scale.py --only render   # or --only memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render import OtherLoad, _peak_rss_mib  # noqa: E402  (shared helpers of benchmarks/render.py)

SURVEY = "hsc"
STAMP = 64


# ---------------------------------------------------------------------------------------------
# (a) rendering with Dask
# ---------------------------------------------------------------------------------------------

def render_child(spec: dict) -> dict:
    """In a subprocess: cluster up, warm up, time one render_to_shards."""
    import logging

    import distributed

    from sim2obs.forward_models.pipeline import RenderJob, render_to_shards
    from sim2obs.forward_models.render import RenderConfig
    from sim2obs.forward_models.simulations import open_source
    from sim2obs.forward_models.surveys import get_survey

    source = open_source("mini", progress=False)
    ids = np.asarray(source.ids())
    job = RenderJob(source=source, survey=get_survey(SURVEY), config=RenderConfig(stamp=STAMP),
                    seed=0)
    n_workers = spec["workers"]
    t = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR)
    client = distributed.Client(cluster)
    startup = time.perf_counter() - t
    try:
        out = Path(spec["out"])
        warm = ids[-2 * n_workers:]  # not among the timed ones
        render_to_shards(job, warm, out / "warmup", shard_size=1, progress=False, dask=client)
        timed = ids[: spec["n"]]
        cpu0 = sum(client.run(_process_cpu_s).values())
        with OtherLoad() as load:
            t = time.perf_counter()
            render_to_shards(job, timed, out / "run", shard_size=spec["shard_size"],
                             progress=False, dask=client)
            seconds = time.perf_counter() - t
        worker_cpu = sum(client.run(_process_cpu_s).values()) - cpu0
    finally:
        client.close()
        cluster.close()
    return {"seconds": seconds, "startup_s": startup, "other_cores": load.cores,
            "n": int(len(timed)), "worker_cpu_s": worker_cpu}


def _process_cpu_s() -> float:
    """CPU seconds of the calling (worker) process."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def time_render(n: int, shard_size: int, repeats: int, tmp: Path) -> dict:
    runs: dict[int, dict] = {}
    order = [1, 2]
    for rep in range(repeats):
        for w in (order if rep % 2 == 0 else order[::-1]):
            spec = {"workers": w, "n": n, "shard_size": shard_size,
                    "out": str(tmp / f"render-w{w}-r{rep}")}
            r = _run_child("render", spec)
            if w not in runs or r["seconds"] < runs[w]["seconds"]:
                runs[w] = r
    return runs


def report_render(runs: dict, shard_size: int, repeats: int) -> None:
    n = runs[1]["n"]
    print(f"(a) render_to_shards(..., dask=<LocalCluster of W workers>), source 'mini', {SURVEY} "
          f"grizy {STAMP}x{STAMP}, {n} galaxies in shards of {shard_size}, best of {repeats}:")
    print(f"  {'workers':>7} {'gal/s':>7} {'seconds':>8} {'cluster start':>14} "
          f"{'worker CPU/gal':>15} {'workers busy':>13} {'other load':>11}")
    for w, r in sorted(runs.items()):
        busy = r["worker_cpu_s"] / (r["seconds"] * w)
        print(f"  {w:7d} {r['n'] / r['seconds']:7.2f} {r['seconds']:8.2f} {r['startup_s']:12.1f} s "
              f"{r['worker_cpu_s'] / r['n']:13.3f} s {100 * busy:11.0f} % {r['other_cores']:7.2f} cores")
    speed = runs[1]["seconds"] / runs[2]["seconds"]
    print(f"  1 -> 2 Dask workers speed-up: {speed:.2f}x; target >= 1.8x: "
          f"{'met' if speed >= 1.8 else 'MISSED'}")
    cpu_ratio = (runs[2]["worker_cpu_s"] / runs[2]["n"]) / (runs[1]["worker_cpu_s"] / runs[1]["n"])
    print(f"  worker CPU per galaxy, 2 vs 1 workers: {cpu_ratio:.2f}x (1.00 = no parallel overhead; "
          "busy = worker CPU / (wall x workers): below 100 % the workers waited for a core or a task)")
    print("  (timed: one render_to_shards call after cluster start-up and a warm-up render on every "
          "worker; includes task submission, HDF5 writes and the manifest update)")
    busy = max(r["other_cores"] for r in runs.values())
    if busy > 0.25:
        print(f"  WARNING: other processes used up to {busy:.2f} of {os.cpu_count()} cores during "
              "these runs; the speed-up is a lower bound, rerun on a quiet machine")


# ---------------------------------------------------------------------------------------------
# (b) loader memory
# ---------------------------------------------------------------------------------------------

def write_shards(folder: Path, n_shards: int, objects: int, stamp: int, seed: int = 0) -> Path:
    """``n_shards`` synthetic shards of noise (3 bands) with consecutive ids, and a manifest."""
    from sim2obs.data.manifest import update_manifest
    from sim2obs.data.shards import Shard, ShardAttrs, shard_filename, write_shard

    rng = np.random.default_rng(seed)
    bands = ("g", "r", "i")
    for s in range(n_shards):
        images = rng.normal(0.0, 0.05, (objects, len(bands), stamp, stamp)).astype(np.float32)
        shard = Shard(images=images, ivar=np.full_like(images, 400.0),
                      psf=np.full((1, len(bands), 5, 5), 1 / 25, np.float32),
                      labels={"object_id": np.arange(s * objects, (s + 1) * objects)},
                      attrs=ShardAttrs(SURVEY, bands, 0.168, "sim", "synthetic", seed))
        write_shard(folder / shard_filename("bench", s), shard)
    update_manifest(folder)
    return folder


def memory_child(spec: dict) -> dict:
    """In a subprocess: build the dataset, then one epoch; peak RSS growth during the epoch."""
    import torch

    from sim2obs.data.dataset import ShardDataset
    from sim2obs.data.streaming import StreamingShardDataset, collate_images

    torch.set_num_threads(1)
    if spec["kind"] == "stream":
        ds = StreamingShardDataset(spec["folder"], shuffle_buffer=spec["buffer"], seed=0,
                                   rank=0, world_size=1)
        loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate_images)
    else:
        ds = ShardDataset(spec["folder"])
        loader = torch.utils.data.DataLoader(
            ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0),
            collate_fn=collate_images)
    base = _peak_rss_mib(reset=True)
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    seconds = time.perf_counter() - t
    peak = _peak_rss_mib()
    return {"n": n, "base_mib": base, "peak_mib": peak, "growth_mib": peak - base,
            "seconds": seconds}


def time_memory(objects: int, stamp: int, buffer: int, tmp: Path) -> dict:
    results = {}
    for n_shards in (10, 100):
        folder = write_shards(tmp / f"shards-{n_shards}", n_shards, objects, stamp)
        for kind in ("stream", "map"):
            results[(kind, n_shards)] = _run_child(
                "memory", {"folder": str(folder), "kind": kind, "buffer": buffer})
    return results


def report_memory(res: dict, objects: int, stamp: int, buffer: int) -> None:
    item_kib = 3 * stamp * stamp * 4 * 2 / 1024
    shard_mib = objects * item_kib / 1024
    print(f"(b) one epoch, DataLoader(batch_size=32, num_workers=0), shards of {objects} objects x "
          f"3 bands x {stamp}x{stamp} (images + ivar: {shard_mib:.1f} MiB per shard):")
    print(f"  {'loader':<40} {'shards':>6} {'samples':>8} {'peak RSS growth':>16} {'samples/s':>10}")
    names = {"stream": f"StreamingShardDataset (buffer {buffer})",
             "map": "ShardDataset, shuffled sampler"}
    for kind in ("stream", "map"):
        for n_shards in (10, 100):
            r = res[(kind, n_shards)]
            print(f"  {names[kind]:<40} {n_shards:6d} {r['n']:8d} {r['growth_mib']:12.1f} MiB "
                  f"{r['n'] / r['seconds']:10.0f}")
    for kind in ("stream", "map"):
        a, b = res[(kind, 10)]["growth_mib"], res[(kind, 100)]["growth_mib"]
        print(f"  {names[kind]}: 100 vs 10 shards peak-RSS growth ratio {b / max(a, 1e-9):.2f} "
              f"({a:.1f} -> {b:.1f} MiB; data read: {10 * shard_mib:.0f} -> {100 * shard_mib:.0f} MiB)")
    print(f"  (buffer of {buffer} items = {buffer * item_kib / 1024:.1f} MiB; peak RSS = VmHWM reset "
          "after the dataset is built, fresh process per run)")


# ---------------------------------------------------------------------------------------------

def _run_child(what: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", what,
                           json.dumps(spec)], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} child failed ({spec}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run, < 1 minute")
    parser.add_argument("--only", choices=("render", "memory"))
    parser.add_argument("--n-galaxies", type=int, default=None,
                        help="galaxies rendered per run (default 64, --quick 16)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="galaxies per shard / Dask task (default 4, --quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="render runs per configuration "
                        "(default 2, --quick 1)")
    parser.add_argument("--objects", type=int, default=None,
                        help="objects per synthetic shard (default 64, --quick 32)")
    parser.add_argument("--stamp", type=int, default=None, help="synthetic stamp (default 64, --quick 32)")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        what, spec = args._child
        fn = render_child if what == "render" else memory_child
        print(json.dumps(fn(json.loads(spec))))
        return
    q = args.quick
    n = args.n_galaxies or (16 if q else 64)
    shard_size = args.shard_size or (2 if q else 4)
    repeats = args.repeats or (1 if q else 2)
    objects = args.objects or (32 if q else 64)
    stamp = args.stamp or (32 if q else 64)
    t0 = time.perf_counter()
    print(f"sim2obs scale benchmark: {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="sim2obs-scale-") as tmp:
        if args.only != "memory":
            print()
            report_render(time_render(n, shard_size, repeats, Path(tmp)), shard_size, repeats)
        if args.only != "render":
            print()
            report_memory(time_memory(objects, stamp, args.shuffle_buffer, Path(tmp)), objects,
                          stamp, args.shuffle_buffer)
    print()
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
