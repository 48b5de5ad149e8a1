"""``sim2obs adapt`` and ``sim2obs infer``: the adaptation and inference subcommands."""

from __future__ import annotations

from pathlib import Path

from sim2obs.cli import _log, _usage

LABELS = ("log_mstar", "log_sfr", "log_zstar", "age_gyr", "redshift")


def add_adapt(sub) -> None:
    from sim2obs.adapters import METHODS

    p = sub.add_parser(
        "adapt",
        help="train a stellar-population head on simulations, aligned to unlabelled real data",
        description=(
            "Fine-tune a pretrained encoder's features and a heteroscedastic regression head on "
            "labelled source shards while an adapter aligns them with unlabelled target shards. "
            "The checkpoint is chosen without target labels (DEV, You et al. 2019); intervals are "
            "calibrated on held-out source data. Target labels, if present, are only reported. "
            "Writes RUN2/checkpoint.pt, config.json, metrics.csv, summary.json."
        ),
    )
    p.add_argument("run", type=Path, help="pretraining run folder (`sim2obs pretrain`)")
    p.add_argument("--source", nargs="+", type=Path, required=True, help="labelled (simulated) shard folder(s)")
    p.add_argument("--target", nargs="+", type=Path, required=True, help="unlabelled (real) shard folder(s)")
    p.add_argument("--out", type=Path, required=True, help="new run folder")
    p.add_argument("--method", choices=METHODS, default="sinkhorn",
                   help="alignment method; none = source-only baseline (default sinkhorn)")
    p.add_argument("--labels", nargs="+", default=["log_mstar"],
                   help=f"labels to predict (e.g. {' '.join(LABELS)})")
    p.add_argument("--finetune", choices=("none", "last", "all"), default="none",
                   help="what trains besides bottleneck and head: none (frozen encoder, seconds), "
                        "last (last encoder stage) or all")
    p.add_argument("--epochs", type=int, default=30, help="passes over the source galaxies (default: 30)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="source and target galaxies per step, each (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--adapter-weight", type=float, default=None,
                   help="weight of the alignment loss (default: 1, or 1000 for coral whose loss "
                        "carries 1/(4 d^2))")
    p.add_argument("--ensemble", type=int, default=1, help="deep-ensemble members (default 1)")
    p.add_argument("--selection", choices=("dev", "source-val", "last"), default="dev",
                   help="checkpoint choice: dev (importance-weighted, needs no target labels), "
                        "source-val or last")
    p.add_argument("--blur", type=float, default=None, help="Sinkhorn blur (feature units)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="source validation fraction")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, mps")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation, the batches and the ensemble members (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_adapt)


def _cmd_adapt(args) -> int:
    from sim2obs.adapters.loop import AdaptConfig, adapt

    options = {}
    if args.blur is not None:
        if args.method != "sinkhorn":
            raise _usage("--blur applies to --method sinkhorn only")
        options["blur"] = args.blur
    config = AdaptConfig(
        method=args.method, labels=tuple(args.labels), finetune=args.finetune, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, adapter_weight=args.adapter_weight,
        adapter_options=options, ensemble=args.ensemble, selection=args.selection,
        val_fraction=args.val_fraction, seed=args.seed,
    )
    run = adapt(args.run, args.source, args.target, args.out, config, device=args.device,
                resume=args.resume, progress=not args.quiet, log=_log)
    _log(f"adapted run saved in {run}; predict with `sim2obs infer {run} DIR --out predictions.csv`")
    return 0


def add_infer(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="stellar-population estimates with 68%% intervals for a shard folder",
        description=(
            "Write a CSV with object_id and, per label, the estimate and its 16th/84th "
            "percentiles (calibrated). When the shards carry truth labels, also print bias, NMAD, "
            "outlier fraction, R^2 and interval coverage, and draw a predicted-vs-true plot."
        ),
    )
    p.add_argument("run", type=Path, help="adapted run folder (`sim2obs adapt`)")
    p.add_argument("folders", nargs="+", type=Path, help="shard folder(s)")
    p.add_argument("--out", type=Path, required=True, help="predictions CSV")
    p.add_argument("--fits", type=Path, default=None, help="also write a FITS table")
    p.add_argument("--plot", type=Path, default=None,
                   help="predicted-vs-true PNG (default: next to --out when truth exists)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto (CUDA > MPS > CPU), cuda, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args) -> int:
    import json

    from sim2obs.infer import infer

    plot = args.plot or args.out.with_name(args.out.stem + "_vs_true.png")
    pred, sc = infer(args.run, args.folders, args.out, fits=args.fits, plot=plot,
                     device=args.device, progress=not args.quiet)
    _log(f"{len(pred.object_id)} galaxies -> {args.out}")
    if sc:
        print(f"{'label':<12} {'n':>6} {'bias':>8} {'NMAD':>8} {'outliers':>9} {'R2':>6} "
              f"{'cov68':>6} {'cov95':>6}")
        for n, s in sc.items():
            print(f"{n:<12} {s['n']:>6} {s['bias']:>+8.4f} {s['nmad']:>8.4f} "
                  f"{100 * s['outlier_fraction']:>8.1f}% {s['r2']:>6.3f} {s['coverage_68']:>6.3f} "
                  f"{s['coverage_95']:>6.3f}")
        with open(args.out.with_suffix(".scores.json"), "w") as fh:
            json.dump(sc, fh, indent=2)
        _log(f"predicted-vs-true plot: {plot}")
    return 0


def add_demo(sub) -> None:
    from sim2obs.adapters import METHODS

    p = sub.add_parser(
        "demo",
        help="the whole chain on the built-in mini-universe (minutes on a laptop)",
        description=(
            "Build two mini-universes, render a source survey and a pseudo-real target (observed "
            "realism, worse seeing), ingest the Hubble Deep Field example, pretrain, adapt, "
            "measure the gap before/after, infer stellar mass and redshift, and write "
            "OUT/index.html with the figures. A rerun in the same folder reuses finished stages."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default demo/)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (under a minute on 2 idle CPU cores; used by CI)")
    p.add_argument("--method", choices=[m for m in METHODS if m != "none"], default="sinkhorn",
                   help="adapter compared with the source-only baseline (default sinkhorn)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: up to 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from sim2obs.demo import run_demo

    run_demo(args.out, quick=args.quick, method=args.method, seed=args.seed, workers=args.workers,
             device=args.device, progress=not args.quiet, log=_log)
    return 0


def add_benchmark(sub) -> None:
    from sim2obs.adapters import METHODS

    p = sub.add_parser(
        "benchmark",
        help="the versioned sim-to-real benchmark (adapters vs source-only vs oracle)",
        description=(
            "sim2real: source = mini-universe rendered with basic realism; target = another "
            "population seed with observed realism and 1.4x worse seeing (split into adaptation "
            "and test galaxies). Per seed: pretrains an encoder, runs none, each adapter at 1, 3, "
            "10, 30 x its default weight (one kept without target labels: the best-aligned run "
            "within ln 1.1 of the best source-validation NLL) and the oracle; plus a "
            "label-efficiency curve. Writes OUT/results.json and OUT/results.md (~35 min on 2 "
            "CPU cores; a rerun into the same OUT reuses finished stages)."
        ),
    )
    p.add_argument("name", choices=("sim2real",), help="benchmark to run")
    p.add_argument("--out", type=Path, default=Path("bench"),
                   help="output folder; a rerun into it reuses finished stages (default: bench/)")
    p.add_argument("--seeds", type=int, default=3,
                   help="repetitions with other pretraining and adaptation seeds; the data are "
                        "fixed by the protocol (default: 3)")
    p.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "none"], default=None,
                   help="adapters to compare (default: all)")
    p.add_argument("--pretrained", type=Path, default=None,
                   help="use this pretraining run for every seed instead of pretraining one per seed")
    p.add_argument("--pretrain-augment", choices=("reobserve", "reobserve-rotate", "physical", "geometric", "none"),
                   default=None,
                   help="an experiment outside the protocol: pretrain with these views instead of "
                        "the protocol's ('physical' for v3); recorded in results.json and the "
                        "results.md title")
    p.add_argument("--no-label-efficiency", action="store_true",
                   help="skip the label-efficiency curve (pretrained vs random-init encoder "
                        "fine-tuned on 10, 100, 1000 target labels)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a result)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes")
    p.add_argument("--device", default="auto", help="auto (default: CUDA > MPS > CPU), cpu, cuda, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args) -> int:
    from sim2obs.benchmark import run_benchmark

    run_benchmark(args.out, seeds=args.seeds, methods=args.methods, quick=args.quick,
                  pretrained=args.pretrained, label_efficiency=not args.no_label_efficiency,
                  workers=args.workers, device=args.device, progress=not args.quiet, log=_log,
                  pretrain_augment=args.pretrain_augment)
    return 0
