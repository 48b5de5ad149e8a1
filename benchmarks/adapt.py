"""Alignment-loss cost: sim2obs's Sinkhorn adapter vs POT, forward + backward, in one run.

On the same seeded clouds (source x ~ N(0, I_D), target y ~ N(e_0, I_D), N points each,
D = 128 by default) it times one evaluation of the loss *and* its gradient w.r.t. both clouds,
and records the peak memory of that evaluation, for

* ``ours``: :class:`sim2obs.adapters.sinkhorn.SinkhornAdapter` (geomloss, debiased, eps-scaling
  with scaling 0.9, float32) at the training default blur 0.5 and at a small blur 0.01 (both in
  units of the pooled RMS inter-point distance c, so eps = (0.01 c)^2);
* ``emd2``: POT's exact OT ``ot.emd2(a, b, M)`` with M = |x - y|^2 / 2 (geomloss's p = 2 cost,
  so the two values are comparable) built with POT's torch backend, float64, gradient through
  M (POT returns the plan as dM); network simplex, single-threaded (POT's default);
* ``sinkhorn``: POT's entropic solver (``ot.sinkhorn(..., method="sinkhorn_log")``, the solver
  behind ``ot.sinkhorn2``) at the *same* eps as ``ours`` small, POT's default cap of 1000
  iterations and stopThr 1e-9, float64; the loss is ``sum(plan * M)`` as ``ot.sinkhorn2``
  computes it, differentiated with the plan held fixed (the envelope gradient; ``ot.sinkhorn2``
  itself backpropagates through every iteration, O(iterations x N^2) memory).

It prints one table with the times, peak memories and values side by side, the relative
difference of our small-blur debiased divergence from exact OT (target: within 1 %), and the time
ratios. Every measurement runs in a fresh subprocess (so peak memory is that of the measured call
alone): peak RSS growth on the CPU (``/proc/self/clear_refs`` resets the high-water mark; glibc
is told to return freed blocks so earlier calls do not hide later ones), or
``torch.cuda.max_memory_allocated`` growth on a GPU. POT's exact solver grows ~N^3: sizes whose
time, extrapolated from the previous size, exceeds ``--budget`` seconds are skipped (and said so).

Usage: ``python benchmarks/adapt.py [--quick] [--sizes 512 2048 8192] [--dim 128]
[--threads 1] [--budget 300] [--device auto]``. Timings on a shared machine are noisy; compare the
ratios within one run. ``--threads`` (default 1) applies to every method: POT's simplex is
single-threaded, and on a busy 2-core machine one torch thread was faster than two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings

SMALL_BLUR = 0.01
DEFAULT_BLUR = 0.5
#: POT's network-simplex iteration cap: large enough for N = 8192 (POT's default, 1e5, is not)
EMD_MAX_ITER = 100_000_000
#: empirical growth exponents used to extrapolate the next size's time (emd: ~N^3 upper bound of
#: the network simplex on dense problems; entropic solvers: N^2 per iteration, fixed iterations)
GROWTH = {"emd2": 3.0, "sinkhorn": 2.0, "ours": 2.0}


# ----------------------------------------------------------------------------------------------
# worker: one measurement in a fresh process
# ----------------------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _clouds(n: int, d: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g)
    y[:, 0] += 1.0
    return x, y


def _evaluate(method: str, x, y, blur: float, eps: float):
    """One forward + backward; returns (value in feature units, extra info)."""
    import torch

    if method == "ours":
        from sim2obs.adapters.sinkhorn import SinkhornAdapter

        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        out = SinkhornAdapter(blur=blur)(xs, ys)
        out.loss.backward()
        return out.diagnostics["divergence"] * out.diagnostics["scale"] ** 2, {}
    import ot

    xd = x.double().requires_grad_(True)
    yd = y.double().requires_grad_(True)
    m = ot.dist(xd, yd) / 2  # squared Euclidean / 2, differentiable (torch backend)
    a = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64, device=x.device)
    b = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64, device=y.device)
    if method == "emd2":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = ot.emd2(a, b, m, numItermax=EMD_MAX_ITER)
        loss.backward()
        return float(loss), {"warnings": [str(w.message)[:80] for w in caught]}
    if method == "sinkhorn":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan, log = ot.sinkhorn(a, b, m.detach(), eps, method="sinkhorn_log", numItermax=1000,
                                    stopThr=1e-9, log=True)
        loss = (plan * m).sum()
        loss.backward()
        err = log.get("err", [float("nan")])
        return float(loss), {"iterations": int(log.get("niter", -1)),
                             "marginal_err": float(err[-1]) if len(err) else float("nan"),
                             "warnings": [str(w.message)[:80] for w in caught]}
    raise ValueError(method)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    x, y = _clouds(spec["n"], spec["dim"], spec["seed"])
    x, y = x.to(dev), y.to(dev)
    from sim2obs.adapters.sinkhorn import pooled_rms_distance

    eps = (SMALL_BLUR * pooled_rms_distance(x, y)) ** 2
    # warm-up (imports, lazy initialisation) on a small slice
    k = min(spec["n"], 256)
    _evaluate(spec["method"], x[:k], y[:k], spec["blur"], eps)
    times, value, info, peak_mb, peak_kind = [], float("nan"), {}, float("nan"), "n/a"
    for r in range(spec["repeats"]):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            ok = _reset_peak()
            base = _rss_kb("VmRSS")
        t = time.perf_counter()
        value, info = _evaluate(spec["method"], x, y, spec["blur"], eps)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if r == 0:
            if dev.type == "cuda":
                peak_mb, peak_kind = (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda"
            elif ok:
                peak_mb, peak_kind = (_rss_kb("VmHWM") - base) / 1024, "rss"
    return {"time": min(times), "times": times, "value": value, "peak_mb": peak_mb,
            "peak_kind": peak_kind, "eps": eps, **info}


def run_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(spec["threads"]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        return {"skipped": "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:100]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# parent: run everything, print the table
# ----------------------------------------------------------------------------------------------


def _fmt_t(r: dict | None) -> str:
    if r is None or "skipped" in r:
        return "skipped"
    return f"{r['time']:.3g} s"


def _fmt_m(r: dict | None) -> str:
    if r is None or "skipped" in r or not math.isfinite(r["peak_mb"]):
        return "-"
    return f"{r['peak_mb']:.0f} MB"


def _ratio(a: dict | None, b: dict | None) -> str:
    if a is None or b is None or "skipped" in a or "skipped" in b:
        return "-"
    return f"{a['time'] / b['time']:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="N = 256, 512 only (smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=300.0,
                    help="skip a POT size whose extrapolated time exceeds this many seconds")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    sizes = args.sizes or ([256, 512] if args.quick else [512, 2048, 8192])
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                        else "cpu")
    print(f"clouds: N(0, I_{args.dim}) vs N(e_0, I_{args.dim}), N points each, seed {args.seed}; "
          f"device {device}, torch threads {args.threads}, load avg {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("ours = SinkhornAdapter (geomloss, debiased, scaling 0.9, float32); blur in units of "
          "the pooled RMS distance c; POT eps = (0.01 c)^2; values in |x-y|^2/2 units\n")
    methods = [("ours", DEFAULT_BLUR), ("ours", SMALL_BLUR), ("emd2", SMALL_BLUR),
               ("sinkhorn", SMALL_BLUR)]
    results: dict[tuple[str, float, int], dict] = {}
    last: dict[tuple[str, float], tuple[int, float]] = {}
    notes = []
    for n in sizes:
        for method, blur in methods:
            key = (method, blur)
            repeats = 3 if n <= 1024 else 1
            if key in last:
                n0, t0 = last[key]
                est = t0 * (n / n0) ** GROWTH[method] * repeats
                if method != "ours" and est > args.budget:
                    results[(method, blur, n)] = {"skipped": f"est. {est:.0f} s > budget"}
                    notes.append(f"{method} at N={n} skipped: ~{est:.0f} s extrapolated from "
                                 f"{t0:.1f} s at N={n0} (N^{GROWTH[method]:.0f}) > --budget "
                                 f"{args.budget:.0f} s")
                    continue
            spec = {"method": method, "blur": blur, "n": n, "dim": args.dim, "seed": args.seed,
                    "threads": args.threads, "device": device if method != "emd2" else "cpu",
                    "repeats": repeats}
            timeout = max(args.budget * 3, 600.0) if method == "ours" else args.budget * 2 + 60
            r = run_worker(spec, timeout)
            results[(method, blur, n)] = r
            if "skipped" not in r:
                last[key] = (n, r["time"])
                for w in r.get("warnings", []):
                    notes.append(f"{method} N={n}: warning: {w}")
            else:
                notes.append(f"{method} N={n}: {r['skipped']}")
            print(f"  done {method:8s} blur={blur:<4} N={n:5d}: {_fmt_t(r)}", flush=True)

    head = (f"{'N':>5} | {'ours b=0.5':>10} {'mem':>8} | {'ours b=0.01':>11} {'mem':>8} | "
            f"{'POT emd2':>9} {'mem':>8} | {'POT sinkhorn':>12} {'mem':>8} {'iters':>5} | "
            f"{'emd2/ours':>9} {'sink/ours':>9} {'emd2/ours':>9}")
    sub = (f"{'':>5} | {'':>10} {'':>8} | {'':>11} {'':>8} | {'':>9} {'':>8} | {'':>12} {'':>8} "
           f"{'':>5} | {'(b=0.01)':>9} {'(b=0.01)':>9} {'(b=0.5)':>9}")
    print("\nforward + backward time (best of 3 runs for N <= 1024, one run above) and peak memory "
          "of the call")
    print(head)
    print(sub)
    print("-" * len(head))
    for n in sizes:
        od = results.get(("ours", DEFAULT_BLUR, n))
        os_ = results.get(("ours", SMALL_BLUR, n))
        em = results.get(("emd2", SMALL_BLUR, n))
        sk = results.get(("sinkhorn", SMALL_BLUR, n))
        iters = str(sk.get("iterations", "-")) if sk and "skipped" not in sk else "-"
        print(f"{n:>5} | {_fmt_t(od):>10} {_fmt_m(od):>8} | {_fmt_t(os_):>11} {_fmt_m(os_):>8} | "
              f"{_fmt_t(em):>9} {_fmt_m(em):>8} | {_fmt_t(sk):>12} {_fmt_m(sk):>8} {iters:>5} | "
              f"{_ratio(em, os_):>9} {_ratio(sk, os_):>9} {_ratio(em, od):>9}")

    print("\nvalues (|x-y|^2/2 units): exact OT = W2^2/2; ours small blur vs exact (target: "
          "within 1 %)")
    head2 = (f"{'N':>5} | {'exact OT (emd2)':>15} | {'ours b=0.01':>11} {'rel. diff':>9} | "
             f"{'POT sinkhorn':>12} {'rel. diff':>9} {'marg. err':>9} | {'ours b=0.5':>10}")
    print(head2)
    print("-" * len(head2))
    worst = 0.0
    for n in sizes:
        od = results.get(("ours", DEFAULT_BLUR, n))
        os_ = results.get(("ours", SMALL_BLUR, n))
        em = results.get(("emd2", SMALL_BLUR, n))
        sk = results.get(("sinkhorn", SMALL_BLUR, n))
        ok = lambda r: r is not None and "skipped" not in r  # noqa: E731
        exact = em["value"] if ok(em) else float("nan")
        rel = (os_["value"] - exact) / exact if ok(os_) else float("nan")
        rel_sk = (sk["value"] - exact) / exact if ok(sk) else float("nan")
        if math.isfinite(rel):
            worst = max(worst, abs(rel))
        print(f"{n:>5} | {exact:>15.5g} | {os_['value'] if ok(os_) else float('nan'):>11.5g} "
              f"{rel:>+9.3%} | {sk['value'] if ok(sk) else float('nan'):>12.5g} {rel_sk:>+9.3%} "
              f"{sk.get('marginal_err', float('nan')) if ok(sk) else float('nan'):>9.2g} | "
              f"{od['value'] if ok(od) else float('nan'):>10.5g}")
    if any(k[0] == "emd2" and "skipped" not in v for k, v in results.items()):
        verdict = "PASS" if worst <= 0.01 else "FAIL"
        print(f"\nlargest |relative difference| ours (blur 0.01) vs exact OT: {worst:.3%} "
              f"(target 1 %): {verdict}")
    mem_kind = {r.get("peak_kind") for r in results.values() if "peak_kind" in r}
    print(f"memory: {', '.join(sorted(mem_kind))} (rss = peak resident-set growth of the call in a "
          "fresh process; cuda = max_memory_allocated growth)")
    for note in notes:
        print("note:", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
