"""The ``sim2obs`` command line: one entry point, one subcommand per stage (DESIGN.md)."""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path

from sim2obs._memory import retain_freed_memory
from sim2obs.errors import Sim2ObsError

EPILOG = "Each subcommand has its own --help. Docs: README.md; file formats: DESIGN.md."


def _log(msg: str) -> None:
    print(f"sim2obs: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# mini-universe
# ----------------------------------------------------------------------------------------------

def _add_mini(sub) -> None:
    p = sub.add_parser(
        "mini-universe",
        help="write a small simulated universe in IllustrisTNG's on-disk layout",
        description=(
            "Draw a galaxy population from published scaling relations (stellar mass function, "
            "star-forming main sequence, size-mass, mass-metallicity, bulge fraction) and write "
            "it as an IllustrisTNG snapshot + group catalogue + offsets, readable by "
            "illustris_python and by `sim2obs render --source tng:DIR`."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (gets output/ and postprocessing/)")
    p.add_argument("--n-galaxies", type=int, default=500, help="number of subhalos (default 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--snapshot", type=int, default=99, help="snapshot number (default 99, as TNG z=0)")
    p.add_argument("--redshift", type=float, default=0.0, help="snapshot redshift (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_mini)


def _cmd_mini(args) -> int:
    from sim2obs.forward_models.simulations.mini import build_mini_universe

    path = build_mini_universe(args.out, n_galaxies=args.n_galaxies, seed=args.seed,
                               snapshot=args.snapshot, redshift=args.redshift,
                               progress=not args.quiet)
    _log(f"mini-universe with {args.n_galaxies} galaxies written to {path} "
         f"(render it with: sim2obs render --source tng:{path} --snapshot {args.snapshot} ...)")
    return 0


# ----------------------------------------------------------------------------------------------
# render
# ----------------------------------------------------------------------------------------------

def _add_render(sub) -> None:
    from sim2obs.forward_models.realism import EFFECTS

    p = sub.add_parser(
        "render",
        help="render simulated galaxies into survey cutouts (HDF5 shards)",
        description=(
            "Forward-model star particles through PopStar SSPs, the survey's filters, PSF, pixels "
            "and noise, and write calibrated cutouts in nanomaggies to shard files "
            "(DESIGN.md format). Reruns resume: complete shards are kept."
        ),
        epilog=(
            "sources: 'mini' (built-in mini-universe, built and cached on first use), "
            "'tng:PATH' (IllustrisTNG basePath, or a folder holding output/), "
            "'tng-cutout:FILE_OR_DIR' (TNG web-API cutouts), 'eagle:PATH' (EAGLE particle data). "
            "surveys: sdss, des, hsc, lsst, euclid, hst-cosmos, or a .toml/.yaml survey file."
        ),
    )
    p.add_argument("--source", default="mini", help="galaxy source (default: mini)")
    p.add_argument("--snapshot", type=int, default=None, help="snapshot number (TNG default 99)")
    p.add_argument("--survey", required=True, help="survey name or survey file")
    p.add_argument("--bands", nargs="+", default=None, help="subset of the survey's bands, in this order")
    p.add_argument("--n", type=int, default=None, help="number of galaxies (default: all selected)")
    p.add_argument("--out", required=True, type=Path, help="output folder for the shards")
    p.add_argument("--name", default=None, help="shard file prefix (default: survey name)")
    p.add_argument("--stamp", type=int, default=64, help="cutout size in pixels (default 64)")
    p.add_argument("--psf-stamp", type=int, default=25, help="stored PSF image size, odd (default 25)")
    p.add_argument("--realism", choices=("basic", "observed"), default="basic",
                   help="basic: sky, Poisson and read noise; observed: also per-galaxy seeing, "
                        "correlated noise, neighbours, stars, sky residuals, artifacts")
    p.add_argument("--realism-effects", nargs="+", choices=EFFECTS, default=None,
                   help="with --realism observed: only these effects (default all)")
    p.add_argument("--psf-fwhm-scale", type=float, default=1.0,
                   help="multiply every band's PSF FWHM (e.g. 1.3 for worse seeing)")
    p.add_argument("--orientation", choices=("random", "face-on", "edge-on", "as-is"), default="random",
                   help="line of sight: random (default: uniform on the sphere, per galaxy), "
                        "face-on or edge-on (about the stellar angular momentum), as-is (the "
                        "simulation's z axis); recorded in the labels")
    z = p.add_mutually_exclusive_group()
    z.add_argument("--redshift", type=float, default=None,
                   help="observe every galaxy at this redshift (default: the snapshot's, 0.1 for z=0)")
    z.add_argument("--redshift-range", type=float, nargs=2, metavar=("ZMIN", "ZMAX"), default=None,
                   help="draw each galaxy's redshift uniformly in this range (photo-z labels)")
    p.add_argument("--dust", choices=("none", "calzetti", "charlot_fall"), default="none",
                   help="dust attenuation (default none)")
    p.add_argument("--ssp", choices=("popstar", "bc03"), default="popstar",
                   help="SSP library: popstar (Molla et al. 2009, shipped) or bc03 (Bruzual & "
                        'Charlot 2003, needs pip install "sim2obs[bc03]")')
    p.add_argument("--spectra", action="store_true", help="also store integrated observed spectra")
    p.add_argument("--no-noiseless", action="store_true", help="do not store noiseless images")
    p.add_argument("--min-mstar", type=float, default=1e9, help="minimum stellar mass in Msun (default 1e9)")
    p.add_argument("--min-particles", type=int, default=100, help="minimum star particles (default 100)")
    p.add_argument("--shard-size", type=int, default=1000, help="galaxies per shard file (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--dask", metavar="local:N|ADDRESS", default=None,
                   help="render with Dask, one task per shard: local:N starts a LocalCluster of N "
                        "worker processes; tcp://host:8786 uses a running scheduler (workers must "
                        'see --out and the simulation files). Needs pip install "sim2obs[dask]"; '
                        "same bytes as --workers for the same seed")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_render)


def _cmd_render(args) -> int:
    import numpy as np

    from sim2obs.forward_models.pipeline import RenderJob, render_to_shards
    from sim2obs.forward_models.realism import RealismConfig
    from sim2obs.forward_models.render import RenderConfig
    from sim2obs.forward_models.simulations import open_source
    from sim2obs.forward_models.simulations.base import Selection
    from sim2obs.forward_models.stellar_pops import Dust
    from sim2obs.forward_models.surveys import get_survey

    survey = get_survey(args.survey)
    if args.bands:
        survey = survey.with_bands(args.bands)
    if args.realism == "basic" and args.realism_effects:
        raise _usage("--realism-effects needs --realism observed")
    config = RenderConfig(
        stamp=args.stamp, psf_stamp=args.psf_stamp, orientation=args.orientation,
        redshift=args.redshift,
        redshift_range=tuple(args.redshift_range) if args.redshift_range else None,
        psf_fwhm_scale=args.psf_fwhm_scale, dust=Dust(model=args.dust), ssp_library=args.ssp,
        store_noiseless=not args.no_noiseless, spectra=args.spectra,
        realism=RealismConfig.from_level(args.realism, args.realism_effects),
    )
    if args.n is not None and args.n < 1:
        raise _usage("--n must be >= 1")
    selection = Selection(min_mstar_msun=args.min_mstar, min_particles=args.min_particles)
    source = open_source(args.source, snapshot=args.snapshot, selection=selection,
                         n_hint=args.n, progress=not args.quiet)
    ids = np.asarray(source.ids())
    if args.n is not None:
        if args.n > ids.size:
            _log(f"the source has {ids.size} galaxies passing the selection; rendering all of them "
                 f"(asked for {args.n})")
        ids = ids[: args.n]
    job = RenderJob(source=source, survey=survey, config=config, seed=args.seed)
    paths = render_to_shards(job, ids, args.out, name=args.name, shard_size=args.shard_size,
                             workers=args.workers, progress=not args.quiet, log=_log,
                             dask=args.dask)
    _log(f"{ids.size} galaxies of '{source.name}' as seen by {survey.title} "
         f"({', '.join(survey.band_names)}) -> {len(paths)} shard(s) in {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# show
# ----------------------------------------------------------------------------------------------

def _add_show(sub) -> None:
    p = sub.add_parser(
        "show",
        help="PNG grid of cutouts: colour composites and per-band panels with labels",
        description="Draw the first N cutouts of a shard folder (or file) as a PNG image grid.",
    )
    p.add_argument("shards", type=Path, help="shard folder or a single shard file")
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--n", type=int, default=12, help="number of galaxies (default 12)")
    p.add_argument("--rgb", nargs=3, default=None, metavar=("R", "G", "B"),
                   help="bands for the colour composite (default: three spread across the survey)")
    p.add_argument("--labels", nargs="+", default=["log_mstar", "log_ssfr", "redshift"],
                   help="labels to print under each galaxy")
    p.add_argument("--no-bands", action="store_true", help="colour composites only")
    p.set_defaults(func=_cmd_show)


def _cmd_show(args) -> int:
    from sim2obs.data.shards import read_folder, read_shard
    from sim2obs.plots import image_grid

    shard = read_shard(args.shards) if args.shards.is_file() else read_folder(args.shards)
    path = image_grid(shard, args.out, n=args.n, rgb_bands=args.rgb, label_keys=tuple(args.labels),
                      per_band=not args.no_bands)
    _log(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# pretrain / embed / probe
# ----------------------------------------------------------------------------------------------

def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining of an image encoder on shard folders",
        description=(
            "Train an encoder with SimCLR or VICReg on mock shards. With several folders of "
            "different surveys, the same simulated galaxy seen by two surveys is a positive pair. "
            "Writes RUN/checkpoint.pt (every epoch), config.json and metrics.csv (the same rows "
            "in metrics.jsonl). Data-parallel: "
            "torchrun --nproc_per_node 2 -m sim2obs pretrain ..."
        ),
    )
    p.add_argument("folders", nargs="+", type=Path, help="shard folders (one survey setting each)")
    p.add_argument("--out", type=Path, default=None, help="run folder (new run)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                   help="continue a run from its last checkpoint (same result as an uninterrupted "
                        "run): --resume RUN, or --resume with --out RUN")
    p.add_argument("--method", choices=("simclr", "vicreg"), default="simclr",
                   help="simclr (default): contrastive NT-Xent (Chen et al. 2020); vicreg: "
                        "variance-invariance-covariance, no negatives (Bardes et al. 2022)")
    p.add_argument("--encoder", choices=("resnet", "vit"), default="resnet",
                   help="resnet (default): a small ResNet-style CNN, any stamp size; vit: a small "
                        "Vision Transformer (8x8-pixel patches)")
    p.add_argument("--epochs", type=int, default=50, help="passes over the training galaxies (default: 50)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="global batch size in pairs, summed over all processes (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak AdamW learning rate, after the linear warm-up and before the cosine "
                        "decay (default: 1e-3)")
    p.add_argument("--embed-dim", type=int, default=128,
                   help="dimension of the embeddings (the encoder's output, before the projection "
                        "head; default: 128)")
    p.add_argument("--norm", choices=("batch", "group"), default="batch",
                   help="resnet normalisation (default: batch); 'group' (and no BatchNorm in the "
                        "projection head) makes CPU DDP runs match single-process ones")
    p.add_argument("--temperature", type=float, default=0.1,
                   help="SimCLR NT-Xent temperature (default: 0.1)")
    p.add_argument("--bands", nargs="+", default=None,
                   help="band names to train on (every folder must have them); needed when "
                        "folders of different surveys have different band lists")
    p.add_argument("--augment", choices=("reobserve", "reobserve-rotate", "physical", "geometric", "none"),
                   default="reobserve",
                   help="reobserve (default): each view re-observed under worse seeing (x1-1.3), "
                        "Galactic reddening (E(B-V) < 0.05), a sub-pixel shift (< 1 px) and 1-1.5x "
                        "the data's pixel noise, then dihedral flips. reobserve-rotate: the same after a "
                        "random position angle (noise kept). physical: the earlier chain (noise "
                        "re-drawn, then blurred: views about 3x less noisy than the data), for "
                        "runs made with it. geometric: flips and shifts only. none")
    p.add_argument("--no-cross-survey", action="store_true",
                   help="do not pair the same galaxy across surveys")
    p.add_argument("--zero-masked", action="store_true",
                   help="set masked pixels (ivar = 0 where the stamp band has data: cosmic rays, "
                        "bad columns, star masks) to 0 before the views; recorded with the "
                        "normaliser, so embed, probe, adapt and infer do the same")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of galaxies held out for the validation loss and collapse check, "
                        "chosen by object_id (the same galaxies in every survey); 0 <= f < 1 "
                        "(default: 0.1)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 (or fp16) autocast on GPUs, fp32 on CPU")
    p.add_argument("--no-channels-last", action="store_true",
                   help="keep the default NCHW memory layout (channels_last is usually faster for "
                        "convolutions, on GPUs and CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes reading the shards (default: 0, in the "
                        "training process); the result does not depend on it, except with "
                        "--stream, where each worker reads its own block of shards through its "
                        "own shuffle buffer")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, metavar="N",
                   help="at most N steps per epoch (quick checks, timing; default: every batch)")
    p.add_argument("--augment-on", choices=("device", "loader"), default="device",
                   help="where the augmentations run. device (default): on the training device in "
                        "the training process (best with a GPU). loader: in the --num-workers "
                        "DataLoader processes on the CPU, in parallel with the training step (for "
                        "CPU training: give the data its own cores, e.g. --threads N-k "
                        "--num-workers k on an N-core machine, k >= 1); the same result for any "
                        "--num-workers")
    p.add_argument("--stream", action="store_true",
                   help="out-of-core data: stream the shards (one open at a time per reader), "
                        "shared among ranks and workers, through a shuffle buffer; pairs are two "
                        "augmentations of one image (needs --no-cross-survey with several surveys)")
    p.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="--stream: items in each reader's shuffle buffer (default 1000)")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA > MPS > CPU; the log says which), cpu, cuda, mps")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the pairs' order and the augmentations; the same "
                        "seed gives the same weights on the same machine (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args) -> int:
    from sim2obs.pretrain.train import PretrainConfig, pretrain

    config = PretrainConfig(
        method=args.method, encoder=args.encoder, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, embed_dim=args.embed_dim, temperature=args.temperature,
        bands=tuple(args.bands) if args.bands else None, augment=args.augment,
        cross_survey=not args.no_cross_survey, val_fraction=args.val_fraction,
        precision=args.precision, channels_last=not args.no_channels_last, compile=args.compile,
        num_workers=args.num_workers, seed=args.seed, norm=args.norm,
        augment_on=args.augment_on, stream=args.stream, shuffle_buffer=args.shuffle_buffer,
        zero_masked=args.zero_masked,
    )
    if isinstance(args.resume, str):
        if args.out is not None and Path(args.resume) != args.out:
            raise _usage(f"--resume {args.resume} and --out {args.out} name different runs")
        args.out = Path(args.resume)
    if args.out is None:
        raise _usage("give the run folder with --out RUN (or --resume RUN to continue one)")
    if args.max_steps_per_epoch is not None and args.max_steps_per_epoch < 1:
        raise _usage(f"--max-steps-per-epoch must be >= 1, got {args.max_steps_per_epoch}")
    run = pretrain(args.folders, args.out, config, device=args.device, resume=bool(args.resume),
                   progress=not args.quiet, log=_log, max_steps_per_epoch=args.max_steps_per_epoch)
    if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
        _log(f"run saved in {run} (checkpoint.pt, config.json, metrics.csv, metrics.jsonl)")
    return 0


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed shard folders with a pretrained encoder",
                       description="Write /embeddings (N, D), /labels/* (object_id among them) and /survey "
                                   "(N,) to HDF5.")
    p.add_argument("run", type=Path, help="run folder of `sim2obs pretrain`")
    p.add_argument("folders", nargs="+", type=Path, help="shard folder(s)")
    p.add_argument("--out", required=True, type=Path, help="output .h5 file")
    p.add_argument("--device", default="cpu", help="cpu (default), auto (CUDA > MPS > CPU), cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=256,
                   help="stamps per forward pass (memory only; default: 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args) -> int:
    from sim2obs.pretrain.evaluate import embed_folder

    path = embed_folder(args.run, args.folders, args.out, device=args.device,
                        batch_size=args.batch_size, progress=not args.quiet, log=_log)
    _log(f"wrote {path}")
    return 0


def _add_probe(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="linear and kNN probes of labels from embeddings, vs a random-init encoder",
        description=(
            "Cross-validated regression from the encoder's embeddings to each label, next to the "
            "same probes on a randomly initialised encoder of the same architecture: a linear "
            "probe (ridge regression on standardised embeddings, its alpha chosen among 15 "
            "log-spaced values from 1e-3 to 1e4 by the exact leave-one-out error on the training "
            "folds) and a kNN probe (mean label of the k = 10 nearest training galaxies, "
            "Euclidean distance on standardised embeddings). K-fold cross-validation grouped by "
            "object_id: every stamp of one galaxy (e.g. its HSC and LSST renderings) is in the "
            "same fold. Scores: R2, median bias, NMAD and outlier fraction of the residuals "
            "(redshift: dz/(1+z), outlier > 0.15; log labels: prediction - truth in dex, "
            "outlier > 0.3 dex). Plus collapse checks (per-dimension std of the l2-normalised "
            "embeddings, effective rank)."
        ),
    )
    p.add_argument("run", type=Path, help="run folder of `sim2obs pretrain`")
    p.add_argument("folders", nargs="+", type=Path, help="labelled shard folder(s)")
    p.add_argument("--label", nargs="+", default=["log_mstar"],
                   help="label(s) to probe, any under /labels in the shards, e.g. log_mstar "
                        "redshift log_sfr (default: log_mstar)")
    p.add_argument("--folds", type=int, default=5,
                   help="K of the K-fold cross-validation, grouped by galaxy (object_id); at "
                        "least 2 and at most the number of galaxies with the label (default: 5)")
    p.add_argument("--device", default="cpu",
                   help="where to compute the embeddings: cpu (default), auto (CUDA > MPS > "
                        "CPU), cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=256,
                   help="stamps per forward pass when computing the embeddings (default: 256)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fold assignment and of the random-init encoder's weights "
                        "(default: 0)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                   help="also write the scores, collapse checks and settings to this JSON file "
                        "(default: print only)")
    p.set_defaults(func=_cmd_probe)


def _cmd_probe(args) -> int:
    from sim2obs.pretrain.evaluate import probe_run, write_probe_json

    res = probe_run(args.run, args.folders, args.label, folds=args.folds, seed=args.seed,
                    device=args.device, batch_size=args.batch_size, log=_log)
    n_stamps, n_galaxies = res["n_stamps"], res["n_galaxies"]
    print(f"{n_stamps} stamps of {n_galaxies} galaxies, {args.folds}-fold cross-validation "
          f"grouped by galaxy (object_id), seed {args.seed}")
    print(f"collapse check on N = {n_stamps} embeddings (std per dimension of the l2-normalised "
          f"embeddings; effective rank, at most min(N, D)):")
    for name, c in res["collapse"].items():
        print(f"  {name:12s} embedding std {c['embedding_std']:.3f}, effective rank "
              f"{c['effective_rank']:.1f} of {c['dim']} (N = {c['n_embeddings']})")
    for lab, r in res["scores"].items():
        count = ("" if (r["n_stamps"], r["n_galaxies"]) == (n_stamps, n_galaxies)
                 else f", {r['n_stamps']} stamps of {r['n_galaxies']} galaxies")
        print(f"\n{lab}{count}  ({r['conventions']})")
        for name in ("pretrained", "random-init"):
            for kind, sc in r[name].items():
                print(f"  {name:12s} {kind:6s} {sc.as_row()}")
    if args.out is not None:
        write_probe_json(args.out, res)
        _log(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# ingest / export (real data in and out of the shard format)
# ----------------------------------------------------------------------------------------------

def _add_ingest(sub) -> None:
    p = sub.add_parser(
        "ingest",
        help="real cutouts (FITS or HDF5) and catalogues -> shards (domain 'real')",
        description=(
            "Read real cutouts into shards: FITS cubes (BANDS/FILTERn keywords), one HDU per band, "
            "or one file per band grouped by --group-pattern; HDF5 arrays with a key mapping. "
            "Fluxes go to nanomaggies from BUNIT (nanomaggy, nJy), MAGZERO/MAGZP, FLUXMAG0, "
            "PHOTFLAM+PHOTPLAM or --zeropoint; ivar from IVAR/WHT/VAR/ERR HDUs or a sigma-clipped "
            "background; masks and NaNs -> ivar 0. Cutouts whose pixel scale or size differ from "
            "--survey/--stamp are resampled flux-conservingly (GalSim) and recentred. Every shard "
            "records its provenance in 'config'."
        ),
        epilog=(
            "examples: sim2obs ingest cutouts/*.fits --survey hsc --out real/hsc/ ;  "
            "sim2obs ingest 'hsc/*.fits' --group-pattern '(?P<id>\\d+)-HSC-(?P<band>[A-Z])' --survey hsc "
            "--out real/hsc/ ;  sim2obs ingest data.h5 --images-key images --bands g r z --out real/x/ ;  "
            "sim2obs ingest --example hdf --out real/hdf/ ;  "
            "sim2obs ingest --galsim-catalog real_galaxy_catalog_25.2.fits --galsim-dir COSMOS_25.2_training_sample "
            "--out real/cosmos/"
        ),
    )
    p.add_argument("inputs", nargs="*", help="FITS files, folders or glob patterns, or one .h5 file")
    p.add_argument("--out", required=True, type=Path, help="output shard folder")
    p.add_argument("--example", choices=("hdf",), default=None,
                   help="built-in real example: 'hdf' = Hubble Deep Field galaxies (scikit-image), uncalibrated")
    p.add_argument("--galsim-catalog", default=None, metavar="FILE",
                   help="a galsim.RealGalaxyCatalog file (e.g. real_galaxy_catalog_25.2.fits from "
                        "galsim_download_cosmos); survey hst-cosmos by default")
    p.add_argument("--galsim-dir", default=None, metavar="DIR",
                   help="folder of the --galsim-catalog and its image files (GalSim's dir=)")
    p.add_argument("--n", type=int, default=None, help="--galsim-catalog: ingest only the first N objects")
    p.add_argument("--survey", default=None, help="target survey (pixel scale, band names, PSF model)")
    p.add_argument("--bands", nargs="+", default=None, help="band names (cube planes / HDF5 channels) and order")
    p.add_argument("--pixel-scale", type=float, default=None, help="input pixel scale, arcsec (overrides the WCS)")
    p.add_argument("--zeropoint", type=float, default=None,
                   help="AB zeropoint of the input pixel values (22.5: already nanomaggies)")
    p.add_argument("--uncalibrated", action="store_true",
                   help="keep raw pixel values (shards flagged calibrated=false)")
    p.add_argument("--group-pattern", default=None,
                   help="regex with (?P<id>...) [and (?P<band>...)] matched in file names to group "
                        "one-file-per-band inputs into objects")
    p.add_argument("--stamp", type=int, default=None, help="output stamp size in pixels")
    p.add_argument("--no-resample", action="store_true",
                   help="refuse inputs whose pixel scale/stamp differ from the target instead of resampling")
    p.add_argument("--psf-fwhm", type=float, default=None, help="Gaussian PSF FWHM (arcsec) when inputs have no PSF")
    p.add_argument("--psf-stamp", type=int, default=25, help="size of modelled/resampled PSFs (default 25)")
    p.add_argument("--mask-bits", type=int, default=None, help="mask bits that mean 'bad' (default: any non-zero)")
    p.add_argument("--max-nan-fraction", type=float, default=0.5,
                   help="refuse bands with more NaN pixels than this fraction (default 0.5)")
    p.add_argument("--catalog", default=None, help="CSV/FITS/ECSV table of labels to join")
    p.add_argument("--id-column", default="object_id", help="id column of --catalog (default object_id)")
    p.add_argument("--images-key", default="images", help="HDF5: dataset of the images (default images)")
    p.add_argument("--ivar-key", default=None, help="HDF5: dataset of the inverse variance")
    p.add_argument("--labels-key", default=None, help="HDF5: group of (N,) label datasets or a table dataset")
    p.add_argument("--ids-key", default=None, help="HDF5: dataset of object ids")
    p.add_argument("--layout", choices=("auto", "channel-first", "channel-last"), default="auto",
                   help="HDF5 image axis order (default: detected from --bands)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad inputs (listed) instead of stopping")
    p.add_argument("--shard-size", type=int, default=1000, help="objects per shard (default 1000)")
    p.add_argument("--name", default=None, help="shard file prefix (default: survey name)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of that name in --out")
    p.set_defaults(func=_cmd_ingest)


def _cmd_ingest(args) -> int:
    from sim2obs.data.ingest import IngestOptions, ingest_fits

    opts = IngestOptions(
        survey=args.survey, bands=tuple(args.bands) if args.bands else None,
        pixel_scale=args.pixel_scale, zeropoint=args.zeropoint, uncalibrated=args.uncalibrated,
        group_pattern=args.group_pattern, stamp=args.stamp, resample=not args.no_resample,
        psf_fwhm=args.psf_fwhm, psf_stamp=args.psf_stamp, mask_bits=args.mask_bits,
        max_nan_fraction=args.max_nan_fraction, catalog=args.catalog, id_column=args.id_column,
        skip_bad=args.skip_bad, shard_size=args.shard_size, name=args.name, overwrite=args.overwrite,
    )
    if args.galsim_catalog:
        from sim2obs.data.ingest_galsim import ingest_galsim_catalog

        if args.inputs or args.example:
            raise _usage("--galsim-catalog takes no input files and no --example")
        if args.n is not None and args.n < 1:
            raise _usage("--n must be >= 1")
        paths, skipped = ingest_galsim_catalog(args.galsim_catalog, args.out, opts,
                                               image_dir=args.galsim_dir, n=args.n, log=_log)
    elif args.example:
        from sim2obs.data.examples import make_hdf_example

        paths = make_hdf_example(args.out, opts=opts, log=_log)
        skipped = []
    elif not args.inputs:
        raise _usage("ingest needs input files (or --example hdf)")
    elif all(str(x).lower().endswith((".h5", ".hdf5")) for x in args.inputs):
        from sim2obs.data.ingest_hdf5 import HDF5Keys, ingest_hdf5

        if len(args.inputs) != 1:
            raise _usage("ingest takes one HDF5 file at a time")
        keys = HDF5Keys(images=args.images_key, ivar=args.ivar_key, labels=args.labels_key,
                        ids=args.ids_key, layout=args.layout)
        paths, skipped = ingest_hdf5(args.inputs[0], args.out, opts, keys, log=_log)
    else:
        paths, skipped = ingest_fits(args.inputs, args.out, opts, log=_log)
    for item in skipped:
        _log(f"skipped {item['input']}: {item['problem']}")
    _log(f"wrote {len(paths)} shard(s) to {args.out}" + (f"; skipped {len(skipped)} bad input(s)" if skipped else ""))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="shards -> per-object FITS cutouts (WCS, BUNIT, MAGZERO, labels table)",
        description="Write one multi-extension FITS file per object; `sim2obs ingest` reads them back.",
    )
    p.add_argument("--fits", action="store_true", required=True, help="export to FITS (the only format)")
    p.add_argument("folder", type=Path, help="shard folder or file")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--layout", choices=("cube", "per-band"), default="cube",
                   help="cube: image cube + IVAR + PSF HDUs (default); per-band: IMAGE_b/IVAR_b/PSF_b HDUs")
    p.add_argument("--name", default=None, help="file prefix (default: survey name)")
    p.add_argument("--allow-uncalibrated", action="store_true",
                   help="export uncalibrated shards (BUNIT='uncalibrated', no MAGZERO)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from sim2obs.data.export import export_fits

    paths = export_fits(args.folder, args.out, layout=args.layout, name=args.name,
                        allow_uncalibrated=args.allow_uncalibrated)
    _log(f"wrote {len(paths)} FITS file(s) to {args.out}")
    return 0


def _add_manifest(sub) -> None:
    p = sub.add_parser(
        "manifest",
        help="write, update or verify a shard folder's manifest.json (counts, ids, checksums)",
        description=(
            "Create or update FOLDER/manifest.json: per shard its object count, object ids, size, "
            "mtime, SHA-256 checksum, survey and bands, so that datasets open the folder without "
            "opening every shard. `render` and `ingest` update it themselves; only new or changed "
            "shards are re-read."
        ),
    )
    p.add_argument("folders", nargs="+", type=Path, help="shard folders")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every shard and report checksum/size mismatches, missing and "
                        "unlisted shards (exit status 1 if any)")
    p.add_argument("--rebuild", action="store_true",
                   help="ignore the old manifest and re-read every shard")
    p.set_defaults(func=_cmd_manifest)


def _cmd_manifest(args) -> int:
    from sim2obs.data.manifest import check_folders, update_manifest

    if args.verify and args.rebuild:
        raise _usage("--verify checks the manifest as it is; run --rebuild separately")
    if args.verify:
        check_folders(args.folders)
        _log(f"verified {len(args.folders)} folder(s): all match")
        return 0
    for folder in args.folders:
        r = update_manifest(folder, rebuild=args.rebuild)
        _log(f"{r.path}: {r.n_shards} shard(s), {r.n_objects} object(s) ({r.n_read} read, "
             f"{r.n_reused} unchanged, {r.n_removed} removed)")
    return 0


# ----------------------------------------------------------------------------------------------

class _UsageError(Sim2ObsError, ValueError):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


def set_threads(n: int) -> None:
    """Limit this process to ``n`` CPU threads: PyTorch's intra-op pool and the BLAS/OpenMP pools
    of NumPy, SciPy and GalSim (threadpoolctl). Rendering pool workers still use one each."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n)


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help when it has a default and its text names none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and not any(default is v for v in (None, False, argparse.SUPPRESS))
                and "default" not in text.lower()):
            shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
            text = f"{text} (default: {str(shown).replace('%', '%%')})"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sim2obs",
        description="sim2obs: mock survey images from simulated galaxies, and the tools to close "
                    "the gap to real observations.",
        epilog=EPILOG,
    )
    from sim2obs import __version__

    parser.add_argument("--version", action="version", version=f"sim2obs {__version__}")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for PyTorch and NumPy/SciPy in this process (default: "
                             "their own choice, usually one per core). Set it on a shared machine "
                             "or when running several jobs at once: oversubscribed threads can "
                             "make training many times slower. Rendering workers always use one.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=functools.partial(
        argparse.ArgumentParser, formatter_class=_HelpFormatter))
    _add_mini(sub)
    _add_render(sub)
    _add_show(sub)
    _add_pretrain(sub)
    _add_embed(sub)
    _add_probe(sub)
    _add_ingest(sub)
    _add_export(sub)
    _add_manifest(sub)
    from sim2obs import cli_adapt, cli_gap

    cli_gap.add_gap(sub)
    cli_gap.add_similar(sub)
    cli_gap.add_anomalies(sub)

    cli_adapt.add_adapt(sub)
    cli_adapt.add_infer(sub)
    cli_adapt.add_demo(sub)
    cli_adapt.add_benchmark(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        set_threads(args.threads)
    retain_freed_memory()  # this process reuses its freed batch buffers (sim2obs._memory)
    try:
        return int(args.func(args) or 0)
    except Sim2ObsError as exc:
        _log(f"error: {_worker_message(str(exc))}")
        return 1
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
            _log(f"interrupted; {_after_interrupt(args)}")
        return 130


def _worker_message(text: str) -> str:
    """A sim2obs error raised in a DataLoader worker comes back with the worker's traceback in its
    message ("Caught Sim2ObsDataError in DataLoader worker process 0. Original Traceback ...",
    torch's ExceptionWrapper): keep the error itself, and say where it happened."""
    head, sep, rest = text.partition("\nOriginal Traceback (most recent call last):")
    match = re.match(r"Caught \w+ in DataLoader (worker process \d+)", head.strip())
    if not sep or match is None:
        return text
    lines = [line for line in rest.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else head
    message = re.sub(r"^(?:[\w.]+\.)?\w+(?:Error|Exception): ", "", last.strip())
    return f"{message} (in DataLoader {match.group(1)})"


def _after_interrupt(args) -> str:
    """What is kept after Ctrl-C, and how to go on, for the command that was running."""
    command = getattr(args, "command", None)
    if command == "render":
        return "complete shards are kept and a rerun of the same command resumes from them"
    if command in ("pretrain", "adapt"):
        run = args.resume if isinstance(getattr(args, "resume", None), str) else args.out
        if run is not None and (Path(run) / "checkpoint.pt").is_file():
            folders = " ".join(str(f) for f in getattr(args, "folders", ()))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if command != "pretrain":
                how = "the same sim2obs adapt command with --resume"
            elif world > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:  # torchrun, one node
                how = f"torchrun --nproc_per_node {world} -m sim2obs pretrain {folders} --resume {run}"
            elif world > 1:  # several nodes: the user's own launch line
                how = f"the same torchrun launch of `sim2obs pretrain {folders} --resume {run}`"
            else:
                how = f"sim2obs pretrain {folders} --resume {run}"
            return f"'{run}' holds the checkpoint of the last finished epoch: continue with `{how}`"
        return "no epoch had finished, so there is no checkpoint to resume from"
    if command in ("demo", "benchmark"):
        return "a rerun into the same --out reuses the finished stages"
    return "a file it was writing may be incomplete: run the command again"


if __name__ == "__main__":
    sys.exit(main())
