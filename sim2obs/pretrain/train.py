"""Self-supervised pretraining: the training loop that composes data, augmentations, encoder,
projection head and loss.

* Methods: ``simclr`` (NT-Xent, Chen et al. 2020) and ``vicreg`` (Bardes et al. 2022).
* Views (:mod:`sim2obs.pretrain.views`): two augmentations of each galaxy; with several survey
  folders, the second view of a galaxy is, when it exists, the same simulated galaxy rendered
  by another survey (same ``object_id``) -- a positive pair that teaches survey invariance from
  the forward model. Augmentations run on the training device (``augment_on='device'``) or,
  for CPU training with cores to spare, in the DataLoader worker processes (``'loader'``), in
  parallel with the training step; either way the run does not depend on ``num_workers``.
* Device: ``auto`` picks CUDA > MPS > CPU; bf16 autocast where supported (fp16 + GradScaler on
  CUDA GPUs without bf16); optional channels_last and ``torch.compile``.
* Schedule: AdamW, linear warm-up then cosine decay per step; gradient clipping.
* Checkpoints: ``RUN/checkpoint.pt`` after every epoch, written atomically, loadable with
  ``torch.load(weights_only=True)`` (tensors and plain Python types only): model, optimiser,
  scheduler, fp16 loss scale, config, normaliser, encoder config, package version. ``resume``
  continues from it. Every random stream is a function of (seed, epoch, rank) -- augmentations
  and cross-survey partners by construction, dropout because the global RNG is re-seeded at the
  start of each epoch, the DataLoader from its own generator -- so no RNG state is
  checkpointed and a resumed CPU run ends with the same weights as an uninterrupted one.
* DDP under ``torchrun`` (gloo on CPU, nccl on GPU): a ``DistributedSampler`` shares each global
  batch among ranks and embeddings are gathered for the loss. BatchNorm is synchronised on GPUs;
  on CPU (where PyTorch has no SyncBatchNorm) ``norm='group'`` makes the result independent of
  the number of processes.
* ``stream=True`` (``--stream``): out-of-core training data, a
  :class:`~sim2obs.data.streaming.StreamingShardDataset` sharing the shards among ranks and
  DataLoader workers through a shuffle buffer; pairs are two augmentations of one image.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sim2obs._memory import retain_freed_memory
from sim2obs.data.dataset import Normalizer, ShardDataset
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError
from sim2obs.pretrain.checkpoint import (  # noqa: F401  (re-exported: the run API)
    CHECKPOINT,
    check_resumed_data,
    checkpoint_hash,
    load_checkpoint,
    save_checkpoint,
    training_data_summary,
)
from sim2obs.pretrain.views import (  # noqa: F401  (re-exported: the 0.2 API)
    AUGMENT_PRESETS,
    EpochSampler,
    LoaderViews,
    PairDataset,
    _collate,
    build_augment,
    prepare_views,
    survey_names,
)

METHODS = ("simclr", "vicreg")
#: Where the augmentations run: on the training device in the main process, or in the DataLoader.
AUGMENT_ON = ("device", "loader")

#: Default encoder for CPU-friendly runs: a 4-stage ResNet, 16 base channels, stride-2 stem.
DEFAULT_ENCODER_KWARGS = {"width": 16, "depths": [1, 1, 1, 1], "stem_stride": 2}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a pretraining run (saved as ``config.json``)."""

    method: str = "simclr"
    encoder: str = "resnet"
    encoder_kwargs: dict | None = None  # None: DEFAULT_ENCODER_KWARGS for resnet, {} otherwise
    norm: str = "batch"  # 'batch' or 'group' (resnet normalisation; 'group' also drops BN in the head)
    embed_dim: int = 128
    proj_hidden: int = 512
    proj_dim: int = 128
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float | None = None  # None: 2 epochs, at most a tenth of the run (warmup_epochs_used)
    temperature: float = 0.1
    grad_clip: float = 5.0
    bands: tuple[str, ...] | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: str = "reobserve"  # see AUGMENT_PRESETS / build_augment
    augment_on: str = "device"  # 'device' (main process, training device) or 'loader' (CPU workers)
    cross_survey: bool = True
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 0
    seed: int = 0
    stream: bool = False  # stream shards (StreamingShardDataset) instead of random access
    shuffle_buffer: int = 1000  # --stream: items in each reader's shuffle buffer
    zero_masked: bool = False  # masked pixels (ivar = 0) -> 0 before the views; kept by the Normalizer

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise Sim2ObsValueError(f"unknown method '{self.method}'; use one of {list(METHODS)}")
        if self.augment not in AUGMENT_PRESETS:
            raise Sim2ObsValueError(f"augment must be one of {list(AUGMENT_PRESETS)}, got '{self.augment}'")
        if self.augment_on not in AUGMENT_ON:
            raise Sim2ObsValueError(f"augment_on must be one of {list(AUGMENT_ON)}, got '{self.augment_on}'")
        if self.augment_on == "loader" and self.stream:
            raise Sim2ObsValueError(
                "--augment-on loader is not available with --stream (the views are keyed by "
                "dataset index); use --augment-on device with --stream"
            )
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise Sim2ObsValueError("precision must be auto, fp32, bf16 or fp16")
        if self.epochs < 1 or self.batch_size < 2 or not self.lr > 0:
            raise Sim2ObsValueError("need epochs >= 1, batch_size >= 2 and lr > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise Sim2ObsValueError(
                f"val_fraction (--val-fraction) is the share of galaxies held out for validation: "
                f"0 <= it < 1, got {self.val_fraction}"
            )
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(self.bands))
        if self.shuffle_buffer < 0:
            raise Sim2ObsValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.norm not in ("batch", "group"):
            raise Sim2ObsValueError(f"norm must be 'batch' or 'group', got '{self.norm}'")
        if self.encoder_kwargs is None:
            kw = dict(DEFAULT_ENCODER_KWARGS) if self.encoder == "resnet" else {}
            object.__setattr__(self, "encoder_kwargs", kw)
        if self.encoder == "resnet" and self.norm == "group":
            object.__setattr__(self, "encoder_kwargs", {**self.encoder_kwargs, "norm": "group"})

    @property
    def warmup_epochs_used(self) -> float:
        """Epochs of linear learning-rate warm-up: ``warmup_epochs``, or by default 2 but at most
        a tenth of the run, so that short runs reach the peak rate and decay too (sim2obs < 0.2.2
        always warmed up for 2 epochs: a 1-epoch run never passed 62 % of ``lr``; runs that
        recorded 2.0 keep it when resumed)."""
        if self.warmup_epochs is not None:
            return float(self.warmup_epochs)
        return min(2.0, self.epochs / 10.0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bands"] = list(self.bands) if self.bands else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SSLModel(nn.Module):
    """Encoder + projection head: ``(N, B, H, W) -> (h (N, embed_dim), z (N, proj_dim))``."""

    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int, batch_norm: bool = True):
        super().__init__()
        from sim2obs.pretrain.heads import ProjectionHead

        self.encoder = encoder
        self.head = ProjectionHead(encoder.embed_dim, proj_hidden, proj_dim, batch_norm=batch_norm)

    def forward(self, x: torch.Tensor):
        h = self.encoder(x)
        return h, self.head(h)


# --------------------------------------------------------------------------------------------
# Environment: device, precision, distributed
# --------------------------------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else Apple MPS, else CPU. ``cuda`` (and ``auto`` on a GPU
    machine) means this process's GPU (:func:`_local_gpu`: ``LOCAL_RANK`` under ``torchrun``);
    ``cuda:N`` is used as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _local_gpu())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise Sim2ObsValueError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Sim2ObsValueError("--device cuda asked for but no CUDA GPU is available; use --device auto")
    if dev.type == "cuda" and dev.index is None:  # under torchrun: this process's own GPU
        dev = torch.device("cuda", _local_gpu())
    return dev


def _local_gpu() -> int:
    """This process's GPU: ``LOCAL_RANK`` among the visible GPUs (modulo their number, so a
    launcher that shows each process only its own GPU through CUDA_VISIBLE_DEVICES gets 0)."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this precision setting (None = full fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if precision == "bf16" else None  # CPU bf16 only when asked
    return torch.float16 if precision in ("auto", "fp16") else None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in data-parallel training. ``group``: a process group is in use
    (DDP, gathered losses) -- under ``torchrun`` with more than one process, or one the caller
    initialised, of any size; ``owner``: :func:`init_distributed` created it (and
    :func:`pretrain` destroys it when done)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False
    owner: bool = False

    @property
    def enabled(self) -> bool:
        return self.group

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the caller's process group if one is initialised (any size, e.g. one nccl rank on
    one GPU to exercise the DDP path), else initialise one when started by ``torchrun`` with
    WORLD_SIZE > 1: nccl when CUDA is used (each process first bound to its GPU, so NCCL's
    collectives run there), gloo otherwise. Without either: a single process, no group."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, group=True)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    use_nccl = torch.cuda.is_available() and device_name != "cpu"
    if use_nccl:
        torch.cuda.set_device(_local_gpu())
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, group=True, owner=True)


def _json_row(row: dict) -> str:
    """One line of ``metrics.jsonl``: numbers as numbers (from a metrics row or its CSV strings),
    non-finite ones (no validation set: NaN) and empty cells as null."""
    out = {}
    for key, v in row.items():
        if isinstance(v, str):
            v = None if v == "" else (int(v) if key in ("epoch", "steps") else float(v))
        out[key] = None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps(out) + "\n"


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def load_encoder(run_dir: str | Path) -> tuple[nn.Module, Normalizer, dict]:
    """Encoder (eval mode, CPU), its normaliser and the checkpoint's metadata."""
    from sim2obs import encoders
    from sim2obs.pretrain.checkpoint import checkpoint_path

    run_dir = checkpoint_path(run_dir).parent  # a run folder, or its checkpoint file
    ckpt = load_checkpoint(run_dir)
    if ckpt.get("kind") == "adapt":  # an adaptation run: its adapted features
        from sim2obs.adapters.loop import adapted_encoder

        return adapted_encoder(run_dir, ckpt)
    enc = encoders.build(**ckpt["encoder_config"])
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    enc.load_state_dict(state)
    enc.eval()
    return enc, Normalizer.from_dict(ckpt["normalizer"]), ckpt


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to 0 (Loshchilov & Hutter 2017)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _make_loss(config: PretrainConfig, gather: bool) -> nn.Module:
    from sim2obs.pretrain.losses import NTXentLoss, VICRegLoss

    if config.method == "simclr":
        return NTXentLoss(config.temperature, gather=gather)
    return VICRegLoss(gather=gather)


def _collect_losses(pending: list[torch.Tensor], losses: list[float], epoch: int) -> None:
    """Move a window of step losses from the device to ``losses`` in one transfer (emptying
    ``pending``); a non-finite one stops the run, naming its epoch and step."""
    values = torch.stack(pending).float().cpu().tolist()
    pending.clear()
    for value in values:
        if not math.isfinite(value):
            raise Sim2ObsValueError(
                f"loss became {value} at epoch {epoch + 1} step {len(losses) + 1}: lower --lr, or "
                "check the inputs for extreme values"
            )
        losses.append(value)


def _loader_views_dtype(config: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype views made in DataLoader workers travel in: the autocast dtype of a bf16/fp16
    run (the model's first convolution would round them to it anyway), else float32 (None)."""
    return autocast_dtype(config.precision, device)


def _worker_init(worker_id: int) -> None:
    """DataLoader workers keep their freed batch buffers (:mod:`sim2obs._memory`)."""
    retain_freed_memory()


def _generator(device: torch.device, seed: int, *keys: int) -> torch.Generator:
    g = torch.Generator(device=device if device.type == "cuda" else "cpu")
    g.manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))
    return g


def pretrain(
    folders: list[str | Path],
    out_dir: str | Path,
    config: PretrainConfig = PretrainConfig(),
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    max_steps_per_epoch: int | None = None,
    stop_after_epoch: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train and return the run folder (``checkpoint.pt``, ``config.json``, ``metrics.csv`` and
    the same rows as ``metrics.jsonl``).

    ``stop_after_epoch=k`` ends the call after epoch k's checkpoint (a time-limited cluster job);
    ``resume=True`` continues to ``config.epochs``. ``max_steps_per_epoch`` caps the steps per
    epoch (quick checks, benchmarks).
    """
    dist_info = init_distributed(device)
    fresh = not Path(out_dir).exists()
    try:
        return _pretrain(folders, out_dir, config, device, resume, progress, max_steps_per_epoch,
                         stop_after_epoch, log, dist_info)
    except BaseException:
        # a run that stopped (bad data found while reading, Ctrl-C) before its first checkpoint
        # leaves no folder behind if this call made it: nothing in it could be resumed
        out = Path(out_dir)
        if fresh and dist_info.main and out.is_dir() and not (out / CHECKPOINT).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if dist_info.owner:  # the group this call created (torchrun): released, on errors too
            torch.distributed.destroy_process_group()


def _pretrain(folders, out_dir, config: PretrainConfig, device: str, resume: bool, progress: bool,
              max_steps_per_epoch: int | None, stop_after_epoch: int | None,
              log: Callable[[str], None] | None, dist_info: DistInfo) -> Path:
    from tqdm.auto import tqdm

    from sim2obs import __version__, encoders

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if log and dist_info.main:
        what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
        world = (f", {dist_info.world} process{'es' if dist_info.world > 1 else ''}"
                 if dist_info.enabled else "")
        log(f"device: {dev} ({what}{world}; --device {device})")
    out = Path(out_dir)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out)
        saved = PretrainConfig.from_dict(ckpt["config"])
        default = PretrainConfig()  # values left at their defaults were not asked for: not listed
        asked = [f.name for f in dataclasses.fields(saved)
                 if getattr(config, f.name) != getattr(saved, f.name)
                 and getattr(config, f.name) != getattr(default, f.name)]
        cap = ckpt.get("max_steps_per_epoch", max_steps_per_epoch)
        if asked and log and dist_info.main:
            diff = ", ".join(f"{k}={getattr(config, k)!r} (the run's: {getattr(saved, k)!r})" for k in asked)
            log(f"resuming with the run's saved configuration (config.json), so these settings "
                f"are ignored: {diff}. A run with other settings (e.g. more epochs: another "
                "schedule) is a new run: --out NEW")
        if cap != max_steps_per_epoch and log and dist_info.main:
            log(f"resuming with the run's steps per epoch ({'all batches' if cap is None else f'at most {cap}'}"
                f"; asked: {max_steps_per_epoch}): the schedule depends on it")
        max_steps_per_epoch = cap  # the schedule depends on it
        config = saved  # the run's own config wins: resuming must reproduce the same run
        if config.bands is None and ckpt.get("bands"):  # the bands it took from its first folder
            config = dataclasses.replace(config, bands=tuple(ckpt["bands"]))
        written = ckpt.get("sim2obs_version")
        if written and written != __version__ and log and dist_info.main:
            log(f"this run's checkpoint was written by sim2obs {written}; it continues with "
                f"{__version__}: the epochs from here use this version's code (its augmentations "
                "may draw other numbers), so the result can differ from an uninterrupted run")
    elif (out / CHECKPOINT).exists():
        raise Sim2ObsValueError(
            f"'{out}' already holds a run; use --resume to continue it or choose another --out"
        )
    torch.manual_seed(config.seed)

    hint = {} if ckpt is None else {"bands_hint": (
        f"this run was trained on other data: resume with the run's own folders (listed in "
        f"{out / 'config.json'}), or start a new run with another --out")}
    if config.stream:
        train_ds = _streaming_train_set(folders, config, dist_info, **hint)
    else:
        train_ds = ShardDataset(folders, bands=config.bands, split="train",
                                val_fraction=config.val_fraction, split_seed=config.split_seed, **hint)
    data_summary = training_data_summary(train_ds)
    if ckpt is not None:
        check_resumed_data(ckpt, data_summary, out, folders)
    val_ds = None
    if config.val_fraction > 0:
        try:
            val_ds = ShardDataset(folders, bands=train_ds.bands, split="val",
                                  val_fraction=config.val_fraction, split_seed=config.split_seed)
        except Sim2ObsDataError:
            val_ds = None
    world_batch = config.batch_size
    if world_batch % dist_info.world:
        raise Sim2ObsValueError(
            f"batch size {world_batch} must be divisible by the number of processes {dist_info.world}"
        )
    local_batch = world_batch // dist_info.world
    if len(train_ds) < world_batch:
        raise Sim2ObsValueError(
            f"only {len(train_ds)} training galaxies for a batch of {world_batch}; render more or "
            "lower --batch-size"
        )
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no empty folder
    normalizer = (Normalizer.from_dict(ckpt["normalizer"]) if ckpt else dataclasses.replace(
        Normalizer.from_noise(train_ds), zero_masked=config.zero_masked))
    augment = build_augment(config, train_ds, log if dist_info.main else None).to(dev)

    encoder = encoders.build(config.encoder, len(train_ds.bands), config.embed_dim,
                             **config.encoder_kwargs)
    model: nn.Module = SSLModel(encoder, config.proj_hidden, config.proj_dim,
                                batch_norm=config.norm == "batch")
    if dist_info.enabled and dev.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif dist_info.enabled and config.norm == "batch" and log and dist_info.main:
        log("note: BatchNorm statistics are per process on CPU (SyncBatchNorm needs GPUs); "
            "use --norm group for results independent of the number of processes")
    model = model.to(dev)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.stream:  # workers not persistent: each epoch's workers get the new epoch
        from sim2obs.data.streaming import collate_same_pairs

        loader = torch.utils.data.DataLoader(
            train_ds, batch_size=local_batch, drop_last=True, num_workers=config.num_workers,
            collate_fn=functools.partial(collate_same_pairs, survey_names=survey_names(train_ds)),
            pin_memory=dev.type == "cuda", worker_init_fn=_worker_init,
            generator=_generator(torch.device("cpu"), config.seed, 10**6 + 1, dist_info.rank))
        n_batches = train_ds.batches_per_epoch(local_batch, config.num_workers)
        if n_batches == 0:
            raise Sim2ObsValueError(
                f"--stream: {train_ds.samples_per_reader(config.num_workers)} samples per reader "
                f"(rank x worker) is less than a batch of {local_batch}; use fewer --num-workers "
                "or a smaller --batch-size"
            )
        epoch_aware: list = [train_ds]
    else:
        views = (LoaderViews(build_augment(config, train_ds), normalizer, config.seed,
                             channels_last=config.channels_last and dev.type == "cpu",
                             dtype=_loader_views_dtype(config, dev))
                 if config.augment_on == "loader" else None)
        pairs = PairDataset(train_ds, config.cross_survey, config.seed, views=views)
        sampler = EpochSampler(torch.utils.data.distributed.DistributedSampler(
            pairs, num_replicas=dist_info.world, rank=dist_info.rank, shuffle=True,
            seed=config.seed, drop_last=True))
        loader = torch.utils.data.DataLoader(
            pairs, batch_size=local_batch, sampler=sampler, drop_last=True,
            num_workers=config.num_workers, collate_fn=_collate,
            generator=_generator(torch.device("cpu"), config.seed, 10**6 + 1, dist_info.rank),
            persistent_workers=config.num_workers > 0, pin_memory=dev.type == "cuda",
            worker_init_fn=_worker_init)
        n_batches = len(loader)
        epoch_aware = [sampler, pairs]
    steps_per_epoch = n_batches if max_steps_per_epoch is None else min(n_batches, max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(int(config.warmup_epochs_used * steps_per_epoch) or 1, total_steps))
    start_epoch = 0
    # processes of each start of this run, this one last (a resume with another number is logged);
    # checkpoints of sim2obs < 0.2.2 record none: taken as this number
    earlier = [] if ckpt is None else [int(w) for w in ckpt.get("world_sizes")
                                       or [ckpt.get("world_size", dist_info.world)]]
    world_sizes = [*earlier, dist_info.world]
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"]) + 1
        if log and dist_info.main:
            log(f"resuming '{out}' after epoch {start_epoch} of {config.epochs}" if start_epoch < config.epochs
                else f"'{out}' has finished its {config.epochs} epochs: nothing to train")
            before = earlier[-1]
            if before != dist_info.world and start_epoch < config.epochs:
                log(f"note: '{out}' trained with {before} process{'es' if before > 1 else ''} and resumes "
                    f"with {dist_info.world}: the schedule goes on, but each process draws its own "
                    "views and holds its own share of the batch, so the weights will differ from an "
                    f"uninterrupted {before}-process run (to reproduce that: `torchrun "
                    f"--nproc_per_node {before} -m sim2obs pretrain ... --resume {out}`)")
    train_model: nn.Module = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    loss_fn = _make_loss(config, gather=dist_info.enabled)
    amp_dtype = autocast_dtype(config.precision, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    if ckpt is not None and ckpt.get("grad_scaler"):  # fp16 runs: the loss scale goes on
        scaler.load_state_dict(ckpt["grad_scaler"])
    if dist_info.main:
        (out / "config.json").write_text(json.dumps(
            {"config": config.to_dict(), "folders": [str(f) for f in folders],
             "bands": list(train_ds.bands), "data": data_summary, "normalizer": normalizer.to_dict(),
             "encoder_config": encoder.config(), "sim2obs_version": __version__,
             "world_size": dist_info.world, "world_sizes": world_sizes,
             "device": str(dev)}, indent=2))
    metrics_path, jsonl_path = out / "metrics.csv", out / "metrics.jsonl"
    fields = ["epoch", "steps", "train_loss", "val_loss", "lr", "embedding_std",
              "effective_rank", "seconds", "samples_per_s"]
    if dist_info.main:
        # a resumed run keeps the rows of the epochs its checkpoint holds (a crash after a row
        # was written but before the checkpoint leaves one row too many: it is dropped here);
        # metrics.jsonl is rewritten from them (also for runs begun before it existed)
        rows = []
        if ckpt is not None and metrics_path.exists():
            with metrics_path.open() as fh:
                rows = [r for r in csv.DictReader(fh)
                        if r.get("epoch", "").isdigit() and int(r["epoch"]) < start_epoch]
        with metrics_path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        jsonl_path.write_text("".join(_json_row(r) for r in rows))

    def step_loss(a, b, gen):
        if isinstance(a, dict):  # raw pairs: augment and normalise on the training device
            xa, xb = prepare_views(a, b, augment, normalizer, gen, dev, config.channels_last)
        else:  # views made in the DataLoader (--augment-on loader)
            fmt = torch.channels_last if config.channels_last else torch.contiguous_format
            nb = dev.type == "cuda"  # asynchronous copies only to CUDA (on MPS they can race)
            xa, xb = (x.to(dev, non_blocking=nb).contiguous(memory_format=fmt) for x in (a, b))
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            ha, za = train_model(xa)
            hb, zb = train_model(xb)
        # the loss in float32 outside autocast: inside it, .float() inputs would still meet bf16/fp16
        # matmuls (the similarity logits, VICReg's covariance -- an overflow risk in fp16)
        loss = loss_fn(za.float(), zb.float())
        if isinstance(loss, tuple):
            loss = loss[0]
        return loss, ha

    # the losses come to the host (progress bar, non-finite check) every step on the CPU, where
    # that costs nothing, and every 16 steps on an accelerator: each transfer waits for the
    # device to finish, so the host could not queue the next step's kernels meanwhile. A
    # non-finite loss then stops the run up to 15 steps later -- before the epoch's checkpoint,
    # so the last checkpoint is still clean.
    sync_every = 1 if dev.type == "cpu" else 16
    for epoch in range(start_epoch, config.epochs):
        for obj in epoch_aware:
            obj.set_epoch(epoch)
        gen = _generator(dev, config.seed, epoch, dist_info.rank)
        # the global RNG (dropout in the ViT) restarts from (seed, epoch, rank) too, so a resumed
        # run draws what the uninterrupted one drew: no RNG state needs to be checkpointed
        torch.manual_seed(int(np.random.SeedSequence([config.seed, epoch, dist_info.rank, 1])
                              .generate_state(1)[0]))
        train_model.train()
        t0 = time.perf_counter()
        losses: list[float] = []
        pending: list[torch.Tensor] = []  # this window's losses, still on the device
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (progress and dist_info.main), leave=False)
        # islice: no batch is fetched past the last step (max_steps_per_epoch)
        for step, (a, b) in enumerate(itertools.islice(loader, steps_per_epoch)):
            loss, _ = step_loss(a, b, gen)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            pending.append(loss.detach())
            bar.update(1)
            if len(pending) >= sync_every or step == steps_per_epoch - 1:
                _collect_losses(pending, losses, epoch)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if pending:  # a loader that stopped short of steps_per_epoch
            _collect_losses(pending, losses, epoch)
        bar.close()
        seconds = time.perf_counter() - t0
        train_loss = float(np.mean(losses))
        if dist_info.enabled:  # each rank's loss covers its own anchors: average over ranks
            t = torch.tensor([train_loss], dtype=torch.float64, device=dev)
            torch.distributed.all_reduce(t)
            train_loss = float(t.item()) / dist_info.world
        val_loss, emb_std, eff_rank = _validate(model, val_ds, augment, normalizer, config, dev,
                                                    amp_dtype)
        if dist_info.main:
            row = {"epoch": epoch, "steps": (epoch + 1) * steps_per_epoch,
                   "train_loss": train_loss, "val_loss": val_loss,
                   "lr": sched.get_last_lr()[0], "embedding_std": emb_std,
                   "effective_rank": eff_rank, "seconds": seconds,
                   "samples_per_s": steps_per_epoch * world_batch / seconds}
            with metrics_path.open("a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=fields).writerow(row)
            with jsonl_path.open("a") as fh:  # the same row as JSON Lines
                fh.write(_json_row(row))
            save_checkpoint(out / CHECKPOINT, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch, "config": config.to_dict(),
                "normalizer": normalizer.to_dict(), "encoder_config": encoder.config(),
                "bands": list(train_ds.bands), "data": data_summary, "sim2obs_version": __version__,
                "max_steps_per_epoch": max_steps_per_epoch,
                "world_size": dist_info.world, "world_sizes": world_sizes,
                "grad_scaler": scaler.state_dict(),
            })
            if log:
                val = ("" if val_ds is None or len(val_ds) < 2 else
                       f", val {val_loss:.4f}, effective rank {eff_rank:.1f} (of {len(val_ds)} "
                       "validation embeddings)")
                log(f"epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f}{val}, "
                    f"{row['samples_per_s']:.0f} samples/s")
        if dist_info.enabled:
            torch.distributed.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    train_ds.close()
    return out


def _streaming_train_set(folders, config: PretrainConfig, dist_info: DistInfo, **kwargs):
    """The ``--stream`` training set: this rank's share of the shards, shuffled through a buffer
    (positive pairs are two augmentations of the same image)."""
    from sim2obs.data.streaming import StreamingShardDataset

    ds = StreamingShardDataset(folders, bands=config.bands, split="train",
                               val_fraction=config.val_fraction, split_seed=config.split_seed,
                               shuffle_buffer=config.shuffle_buffer, seed=config.seed,
                               rank=dist_info.rank, world_size=dist_info.world, **kwargs)
    if config.cross_survey and len(set(ds.surveys)) > 1:
        raise Sim2ObsValueError(
            "--stream pairs two augmentations of the same image; pairing a galaxy with its "
            f"rendering by another survey ({sorted(set(ds.surveys))}) needs random access: pass "
            "--no-cross-survey to stream, or drop --stream"
        )
    return ds


@torch.no_grad()
def _validate(model, val_ds, augment, normalizer, config, dev, amp_dtype):
    """Validation loss on fixed augmentations (computed on this process's data, no gathering)
    and the collapse diagnostics of the embeddings."""
    from sim2obs.pretrain.losses import effective_rank, embedding_std

    loss_fn_local = _make_loss(config, gather=False)
    if val_ds is None or len(val_ds) < 2:
        return float("nan"), float("nan"), float("nan")
    model.eval()
    pairs = PairDataset(val_ds, config.cross_survey, config.seed)
    loader = torch.utils.data.DataLoader(pairs, batch_size=min(256, len(val_ds)), collate_fn=_collate)
    gen = _generator(dev, config.seed, 10**6)
    losses, embs = [], []
    for a, b in loader:
        if a["image"].shape[0] < 2:
            continue
        xa, xb = prepare_views(a, b, augment, normalizer, gen, dev, config.channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            ha, za = model(xa)
            _, zb = model(xb)
        loss = loss_fn_local(za.float(), zb.float())  # float32, outside autocast (as in training)
        if isinstance(loss, tuple):
            loss = loss[0]
        losses.append(float(loss))
        embs.append(ha.float().cpu())
    val_ds.close()
    model.train()
    if not embs:
        return float("nan"), float("nan"), float("nan")
    h = torch.cat(embs)
    return float(np.mean(losses)), float(embedding_std(h, normalize=True)), float(effective_rank(h))
