"""``sim2obs gap``, ``sim2obs similar`` and ``sim2obs anomalies``: measuring the sim-to-real
gap and searching embeddings."""

from __future__ import annotations

from pathlib import Path

from sim2obs.cli import _log, _usage


def add_gap(sub) -> None:
    p = sub.add_parser(
        "gap",
        help="measure the gap between two shard folders (e.g. mocks vs real): metrics and report",
        description=(
            "Compare two shard folders in embedding space (with --model: classifier AUC, "
            "Sinkhorn, MMD^2, Fréchet, PRDC with bootstrap intervals) and in pixel/morphology "
            "space (magnitudes, colours, statmorph shapes, noise; KS/AD tests, effect sizes). "
            "Writes REPORT/metrics.json, report.md, report.html and figures/."
        ),
    )
    p.add_argument("dir_a", type=Path, help="first shard folder (e.g. mocks)")
    p.add_argument("dir_b", type=Path, help="second shard folder (e.g. real cutouts)")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--model", type=Path, default=None,
                   help="run folder of `sim2obs pretrain` to embed both sets (without it: "
                        "morphology only)")
    p.add_argument("--adapted", type=Path, default=None,
                   help="an adapted run folder: embedding metrics before and after adaptation")
    p.add_argument("--resample", action="store_true",
                   help="redraw set B on set A's pixel scale and stamp when they differ")
    p.add_argument("--bands", nargs="+", default=None, help="compare only these bands")
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples (default 100)")
    p.add_argument("--n-perm", type=int, default=200, help="permutations (default 200)")
    p.add_argument("--n-morph", type=int, default=300,
                   help="galaxies per set for statmorph (random subset; default 300)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto (CUDA > MPS > CPU), cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the bootstrap, permutations and morphology subset (default: 0)")
    p.set_defaults(func=_cmd_gap)


def _cmd_gap(args) -> int:
    from sim2obs.gap.report import run_gap

    if args.adapted is not None and args.model is None:
        raise _usage("--adapted needs --model (the run before adaptation) to compare against")
    for name in ("n_boot", "n_perm", "n_morph"):
        if getattr(args, name) < 0:
            raise _usage(f"--{name.replace('_', '-')} must be >= 0")
    metrics = run_gap(args.dir_a, args.dir_b, args.out, model=args.model, adapted=args.adapted,
                      resample=args.resample, bands=args.bands, n_boot=args.n_boot,
                      n_perm=args.n_perm, n_morph=args.n_morph, seed=args.seed,
                      device=args.device, log=_log)
    emb = metrics.get("embedding")
    if emb:
        _log(f"classifier AUC {emb['c2st_auc']['value']:.3f} {emb['c2st_auc']['ci']}, "
             f"MMD^2 p = {emb['mmd2']['p_value']:.3g}")
    _log(f"report: {args.out / 'report.html'}")
    return 0


def add_similar(sub) -> None:
    p = sub.add_parser("similar", help="nearest neighbours of one galaxy in embedding space",
                       description="Exact kNN over one or more embeddings files (sim and real "
                                   "together); prints the neighbours and draws them.")
    p.add_argument("embeddings", nargs="+", type=Path, help="embeddings file(s) of `sim2obs embed`")
    p.add_argument("--query", required=True, type=int, help="object_id of the query galaxy")
    p.add_argument("-k", type=int, default=16, help="number of neighbours incl. the query")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine",
                   help="distance between embeddings: cosine (default) or euclidean")
    p.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto",
                   help="kNN search: exact (scipy cKDTree), faiss (pip install \"sim2obs[faiss]\"), "
                        "auto = faiss above 1e5 objects when installed")
    p.add_argument("--shards", nargs="+", type=Path, default=None,
                   help="shard folder(s) holding the images, for --out")
    p.add_argument("--out", type=Path, default=None, help="PNG grid of the neighbours (needs --shards)")
    p.set_defaults(func=_cmd_similar)


def _cmd_similar(args) -> int:
    from sim2obs.gap.search import similar

    if args.out is not None and not args.shards:
        raise _usage("--out needs --shards (the folders holding the images)")
    rows = similar(args.embeddings, args.query, k=args.k, metric=args.metric,
                   backend=args.backend)
    print("rank,object_id,distance,file")
    for i, r in enumerate(rows):
        print(f"{i},{r['object_id']},{r['distance']:.6g},{r['file']}")
    if args.out is not None:
        _write_grid(args.shards, [r["object_id"] for r in rows], args.out, "neighbours",
                    lambda n: f"{n} nearest to object {args.query} ({args.metric})")
    return 0


def add_anomalies(sub) -> None:
    p = sub.add_parser("anomalies", help="rank galaxies by distance to a reference set (e.g. real vs sim)",
                       description="Mean distance of each galaxy to its k nearest reference "
                                   "galaxies, over the reference set's own typical value; high "
                                   "scores have no counterpart in the reference set.")
    p.add_argument("embeddings", type=Path, help="embeddings file to rank (e.g. real)")
    p.add_argument("--reference", required=True, type=Path, help="reference embeddings (e.g. sim)")
    p.add_argument("--out", required=True, type=Path, help="ranked CSV")
    p.add_argument("-k", type=int, default=5,
                   help="score = distance to the k-th nearest reference galaxy (default: 5)")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine",
                   help="distance between embeddings: cosine (default) or euclidean")
    p.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto",
                   help="kNN search: exact (scipy cKDTree), faiss (pip install \"sim2obs[faiss]\"), "
                        "auto = faiss above 1e5 objects when installed")
    p.add_argument("--shards", nargs="+", type=Path, default=None, help="shard folder(s) of the ranked set")
    p.add_argument("--grid", type=Path, default=None, help="PNG of the top-ranked (needs --shards)")
    p.add_argument("--top", type=int, default=16, help="galaxies in --grid")
    p.set_defaults(func=_cmd_anomalies)


def _cmd_anomalies(args) -> int:
    from sim2obs.gap.search import anomalies, load_many

    if args.grid is not None and not args.shards:
        raise _usage("--grid needs --shards (the folders holding the images)")
    e, ids, _, _ = load_many([args.embeddings])
    ref, _, _, _ = load_many([args.reference])
    res = anomalies(e, ref, k=args.k, metric=args.metric, backend=args.backend)
    from sim2obs._atomic import atomic_output

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp, open(tmp, "w") as f:
        f.write("rank,object_id,knn_distance,score\n")
        for rank, i in enumerate(res["order"]):
            f.write(f"{rank},{int(ids[i])},{res['knn_distance'][i]:.6g},{res['score'][i]:.6g}\n")
    _log(f"wrote {args.out} ({len(ids)} galaxies ranked against {len(ref)} reference galaxies)")
    if args.grid is not None:
        _write_grid(args.shards, [int(ids[i]) for i in res["order"][: args.top]], args.grid,
                    "top-ranked", lambda n: f"top {n} anomalies (kNN distance to {args.reference.name})")
    return 0


def _write_grid(shards, object_ids, path, what: str, title) -> None:
    """PNG grid of the galaxies ``object_ids`` found in ``shards``; ``title(n)`` for n found."""
    from sim2obs.gap.search import shards_by_id
    from sim2obs.plots import image_grid

    shard = shards_by_id(shards, object_ids)
    if shard is None:
        raise _usage(f"none of the {what} is in {[str(s) for s in shards]}")
    image_grid(shard, path, n=len(shard), per_band=False, title=title(len(shard)))
    _log(f"wrote {path}")
