"""``sim2obs demo``: the whole chain on the built-in mini-universe, in minutes on a laptop.

1. two mini-universes (IllustrisTNG layout): the *source* population (seed s) and a *target*
   population drawn with another seed (s + 1);
2. renders them as HSC-like cutouts: the source with ``realism='basic'``, the target as a
   "pseudo-real" survey with every observing effect (``realism='observed'``) and 40 % worse
   seeing -- a shift the forward model knows, so the target's truth can score the result;
3. ingests the real Hubble Deep Field example (uncalibrated; shown beside the mocks);
4. pretrains an encoder (SimCLR) on the source and the unlabelled target images;
5. adapts: a source-only head (``none``) and the chosen adapter (default ``sinkhorn``);
6. measures the gap between source and target before and after adaptation (``sim2obs gap``);
7. infers the target's stellar masses and redshifts with both runs, scored against truth;
8. writes ``OUT/index.html`` and ``OUT/index.md`` with the image grids, embedding maps, gap table
   and predicted-vs-true plots, and ``OUT/summary.json``.

Every stage reuses complete outputs of an earlier run in the same folder (a rerun resumes).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sim2obs._atomic import atomic_output
from sim2obs.errors import Sim2ObsValueError

LABELS = ("log_mstar", "redshift")
#: Observation redshifts drawn uniformly in this range for both domains (a photo-z-like task).
REDSHIFT_RANGE = (0.05, 0.4)
#: The target's seeing is this factor worse than HSC-Wide's (0.6-0.7", Aihara et al. 2018).
TARGET_PSF_SCALE = 1.4


@dataclass(frozen=True)
class DemoSizes:
    """Sizes of one demo run (the defaults fit in ~5 minutes on 2 CPU cores)."""

    n_source: int = 400
    n_target: int = 250
    stamp: int = 64
    pretrain_epochs: int = 20
    adapt_epochs: int = 40
    batch_size: int = 128
    n_boot: int = 50
    n_perm: int = 100
    n_morph: int = 50

    def __post_init__(self) -> None:
        if min(self.n_source, self.n_target) < 4 * 8 or self.stamp < 24:
            raise Sim2ObsValueError("demo sizes too small: need >= 32 galaxies per set, stamp >= 24")


QUICK = DemoSizes(n_source=96, n_target=64, stamp=56, pretrain_epochs=3, adapt_epochs=20,
                  batch_size=32, n_boot=10, n_perm=10, n_morph=6)


def _universe(path: Path, n_galaxies: int, seed: int, progress: bool) -> Path:
    from sim2obs.forward_models.simulations.mini import build_mini_universe

    return build_mini_universe(path, n_galaxies=n_galaxies, seed=seed, progress=progress)


def _universes(specs: list[tuple[Path, int, int]], workers: int, progress: bool) -> list[Path]:
    """Build the mini-universes ``(path, n_galaxies, seed)``; one process each when ``workers``
    allows (nothing else runs yet, so the cores are free). Same bytes either way: each universe
    depends only on its own seed."""
    import multiprocessing as mp

    if workers < 2 or len(specs) < 2:
        return [_universe(p, n, s, progress) for p, n, s in specs]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(min(workers, len(specs))) as pool:  # no per-galaxy bars from two processes
        return pool.starmap(_universe, [(p, n, s, False) for p, n, s in specs])


def _demo_universe_size(n: int) -> int:
    """A few spare galaxies in case some fall below the default selection (M* > 1e9 Msun, 100
    star particles; none did in 1,266 demo galaxies)."""
    return int(n * 1.05) + 4


def _render(universe: Path, n: int, out: Path, stamp: int, seed: int, realism: str,
            psf_fwhm_scale: float, workers: int, progress: bool, log) -> Path:
    """Render the first ``n`` galaxies of a mini-universe as HSC cutouts into ``out`` (resumes)."""
    import numpy as np

    from sim2obs.forward_models.pipeline import RenderJob, render_to_shards
    from sim2obs.forward_models.realism import RealismConfig
    from sim2obs.forward_models.render import RenderConfig
    from sim2obs.forward_models.simulations import open_source
    from sim2obs.forward_models.surveys import get_survey

    config = RenderConfig(
        stamp=stamp, redshift_range=REDSHIFT_RANGE, store_noiseless=False,
        psf_fwhm_scale=psf_fwhm_scale, realism=RealismConfig.from_level(realism),
    )
    source = open_source(f"tng:{universe}", progress=progress)
    ids = np.asarray(source.ids())[:n]
    job = RenderJob(source=source, survey=get_survey("hsc"), config=config, seed=seed)
    render_to_shards(job, ids, out, shard_size=max(n, 1), workers=workers, progress=progress, log=log)
    return out


def _pretrain(folders, out: Path, sizes: DemoSizes, seed: int, device: str, progress: bool, log) -> Path:
    from sim2obs.pretrain.train import CHECKPOINT, PretrainConfig, load_checkpoint, pretrain

    config = PretrainConfig(epochs=sizes.pretrain_epochs, batch_size=sizes.batch_size, seed=seed,
                            cross_survey=False, val_fraction=0.1)
    if (out / CHECKPOINT).exists():
        if int(load_checkpoint(out)["epoch"]) + 1 >= config.epochs:
            return out
        return pretrain(folders, out, config, device=device, resume=True, progress=progress, log=log)
    return pretrain(folders, out, config, device=device, progress=progress, log=log)


def _adapt(pre: Path, src: Path, tgt: Path, out: Path, method: str, sizes: DemoSizes, seed: int,
           device: str, progress: bool, log) -> Path:
    from sim2obs.adapters.loop import AdaptConfig, adapt

    config = AdaptConfig(method=method, labels=LABELS, epochs=sizes.adapt_epochs,
                         batch_size=min(sizes.batch_size, 128), seed=seed)
    if (out / "summary.json").exists():
        return out
    resume = (out / "checkpoint.pt").exists()
    return adapt(pre, src, tgt, out, config, device=device, resume=resume, progress=progress, log=log)


def run_demo(out: str | Path = "demo", quick: bool = False, method: str = "sinkhorn", seed: int = 0,
             workers: int | None = None, device: str = "auto", progress: bool = True,
             log: Callable[[str], None] | None = None, sizes: DemoSizes | None = None) -> dict:
    """Run the demo into ``out``; returns the summary (also ``out/summary.json``)."""
    from sim2obs.adapters import METHODS
    from sim2obs.data.examples import make_hdf_example
    from sim2obs.data.shards import read_folder
    from sim2obs.gap.report import run_gap
    from sim2obs.infer import infer
    from sim2obs.plots import image_grid

    if method not in METHODS or method == "none":
        raise Sim2ObsValueError(f"--method must be one of {', '.join(m for m in METHODS if m != 'none')}")
    log = log or (lambda s: None)
    sizes = sizes or (QUICK if quick else DemoSizes())
    workers = workers or min(2, os.cpu_count() or 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    times: dict[str, float] = {}
    n_steps = 8

    def step(k: int, what: str):
        log(f"[{k}/{n_steps}] {what}")
        return time.perf_counter()

    t = step(1, f"mini-universes: source (seed {seed}) and target (seed {seed + 1})")
    uni_s, uni_t = _universes(
        [(out / f"universe_n{sizes.n_source}_seed{seed}", _demo_universe_size(sizes.n_source), seed),
         (out / f"universe_n{sizes.n_target}_seed{seed + 1}", _demo_universe_size(sizes.n_target), seed + 1)],
        workers, progress)
    times["universes"] = time.perf_counter() - t

    t = step(2, f"render {sizes.n_source} source (basic) and {sizes.n_target} pseudo-real target "
                f"(observed, seeing x{TARGET_PSF_SCALE}) HSC cutouts")
    src = _render(uni_s, sizes.n_source, out / "mocks_source", sizes.stamp, seed, "basic", 1.0,
                  workers, progress, log)
    tgt = _render(uni_t, sizes.n_target, out / "mocks_target", sizes.stamp, seed + 1, "observed",
                  TARGET_PSF_SCALE, workers, progress, log)
    image_grid(read_folder(src, with_noiseless=False), figs / "grid_source.png", n=16, per_band=False,
               title="source: mini-universe, HSC basic")
    image_grid(read_folder(tgt, with_noiseless=False), figs / "grid_target.png", n=16, per_band=False,
               title="pseudo-real target: observed realism, worse seeing")
    times["render"] = time.perf_counter() - t

    t = step(3, "real example: Hubble Deep Field galaxies (scikit-image; uncalibrated)")
    hdf = out / "real_hdf"
    if not any(hdf.glob("*.h5")):
        make_hdf_example(hdf, log=log)
    image_grid(read_folder(hdf, with_noiseless=False), figs / "grid_hdf.png", n=16, per_band=False,
               title="real: Hubble Deep Field (display levels)")
    times["real_example"] = time.perf_counter() - t

    t = step(4, f"pretrain SimCLR on source + unlabelled target images ({sizes.pretrain_epochs} epochs)")
    pre = _pretrain([src, tgt], out / "run_pretrain", sizes, seed, device, progress, log)
    times["pretrain"] = time.perf_counter() - t

    t = step(5, f"adapt: source-only baseline and {method}")
    runs = {m: _adapt(pre, src, tgt, out / f"run_{m}", m, sizes, seed, device, progress, log)
            for m in ("none", method)}
    times["adapt"] = time.perf_counter() - t

    t = step(6, "gap between source and target, before and after adaptation")
    metrics_file = out / "gap" / "metrics.json"
    fresh = metrics_file.exists() and metrics_file.stat().st_mtime > (runs[method] / "checkpoint.pt").stat().st_mtime
    if fresh:
        gap = json.loads(metrics_file.read_text())
    else:
        gap = run_gap(src, tgt, out / "gap", model=pre, adapted=runs[method], n_boot=sizes.n_boot,
                      n_perm=sizes.n_perm, n_morph=sizes.n_morph, seed=seed, log=log)
    times["gap"] = time.perf_counter() - t

    t = step(7, "infer stellar mass and redshift of the target, scored against its truth")
    scores = {}
    for m, run in runs.items():
        _, sc = infer(run, [tgt], out / f"predictions_{m}.csv", plot=figs / f"pred_vs_true_{m}.png",
                      progress=progress)
        scores[m] = sc
    times["infer"] = time.perf_counter() - t

    step(8, "report")
    emb, emb_ad = gap["embedding"], gap["embedding_adapted"]
    summary = {
        "sizes": asdict(sizes), "method": method, "seed": seed, "labels": list(LABELS),
        "gap": {k: {"before": emb[k]["value"], "after": emb_ad[k]["value"],
                    "before_ci": emb[k]["ci"], "after_ci": emb_ad[k]["ci"]}
                for k in ("c2st_auc", "sinkhorn", "mmd2", "frechet")},
        "target_scores": scores, "seconds": times,
        "paths": {"source": str(src), "target": str(tgt), "real": str(hdf), "pretrain": str(pre),
                  **{f"run_{m}": str(r) for m, r in runs.items()}, "gap_report": str(out / "gap" / "report.html")},
    }
    with atomic_output(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    md = render_index(summary)
    from sim2obs.gap.report import markdown_to_html

    with atomic_output(out / "index.md") as tmp:
        Path(tmp).write_text(md)
    with atomic_output(out / "index.html") as tmp:
        Path(tmp).write_text(markdown_to_html(md, title="sim2obs demo"))
    log(terminal_summary(summary))
    log(f"report: {out / 'index.html'}")
    return summary


def render_index(s: dict) -> str:
    """The demo's Markdown page."""
    m = s["method"]
    lines = [
        "# sim2obs demo", "",
        f"Source: {s['sizes']['n_source']} mini-universe galaxies rendered as HSC-Wide cutouts "
        f"(`realism=basic`). Pseudo-real target: {s['sizes']['n_target']} galaxies of another "
        f"population seed, `realism=observed`, seeing x{TARGET_PSF_SCALE}. Target labels are used "
        "only to score the predictions.", "",
        "## Images", "",
        "![source](figures/grid_source.png)", "", "![target](figures/grid_target.png)", "",
        "![hdf](figures/grid_hdf.png)", "",
        "The Hubble Deep Field stamps are real galaxies but uncalibrated display levels; they are "
        "shown, not used for inference.", "",
        "## Gap between source and target", "",
        f"| metric | before (pretrained encoder) | after ({m}) |", "|---|---|---|",
    ]
    for k, v in s["gap"].items():
        lines.append(f"| {k} | {v['before']:.4g} [{v['before_ci'][0]:.3g}, {v['before_ci'][1]:.3g}] "
                     f"| {v['after']:.4g} [{v['after_ci'][0]:.3g}, {v['after_ci'][1]:.3g}] |")
    lines += ["", "c2st_auc is the cross-validated domain-classifier ROC AUC (0.5: "
              "indistinguishable). Embedding maps and more in the "
              "[full gap report](gap/report.html).", "",
              "![embedding before](gap/figures/embedding.png)", "",
              "![embedding after](gap/figures/embedding_adapted.png)", "",
              "## Stellar populations of the target", "",
              "| run | label | NMAD | bias | R² | 68 % coverage | 95 % coverage |",
              "|---|---|---|---|---|---|---|"]
    for run, sc in s["target_scores"].items():
        for lab, v in sc.items():
            lines.append(f"| {run} | {lab} | {v['nmad']:.4f} | {v['bias']:+.4f} | {v['r2']:.3f} | "
                         f"{v['coverage_68']:.2f} | {v['coverage_95']:.2f} |")
    lines += [""] + [f"![{r}](figures/pred_vs_true_{r}.png)\n" for r in s["target_scores"]]
    lines += ["## Time", "", ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items()), ""]
    return "\n".join(lines)


def terminal_summary(s: dict) -> str:
    g = s["gap"]
    rows = [f"gap (source vs pseudo-real target): domain AUC {g['c2st_auc']['before']:.3f} -> "
            f"{g['c2st_auc']['after']:.3f}, Sinkhorn {g['sinkhorn']['before']:.4g} -> "
            f"{g['sinkhorn']['after']:.4g} ({s['method']})"]
    for run, sc in s["target_scores"].items():
        rows.append(f"{run:>9}: " + "; ".join(
            f"{lab} NMAD {v['nmad']:.3f} bias {v['bias']:+.3f} cov68 {v['coverage_68']:.2f}"
            for lab, v in sc.items()))
    rows.append(f"total {sum(s['seconds'].values()):.0f} s")
    return "\n".join(rows)
