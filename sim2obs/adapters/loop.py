"""The adaptation loop: fine-tune a pretrained encoder's features and a regression head on labelled
source (simulated) galaxies while an adapter aligns them with unlabelled target (real) galaxies.

Model (per ensemble member): pretrained encoder -> standardised embedding -> *bottleneck*
(Linear, BatchNorm, ReLU: the feature space the adapter aligns, as in Long et al. 2018 and the
Transfer-Learning-Library) -> :class:`~sim2obs.heads.GaussianHead` (mean and log-sigma per label).
``finetune`` chooses what trains besides bottleneck and head: ``none`` (encoder frozen; its
embeddings are computed once, which makes adaptation take seconds), ``last`` (the encoder's last
stage and output layer) or ``all``.

Each step: a source batch and a target batch go through the model together (BatchNorm sees both
domains), the loss is ``NLL(source labels) + weight * adapter(f_s, f_t, y_s, p_s, p_t)``.

Model selection needs no target labels: after every epoch the source-validation risk is
re-weighted by the density ratio ``w(x) = p_t(x) / p_s(x)`` from a logistic domain classifier on
the bottleneck features, with the control variate of Deep Embedded Validation (DEV, You et al.
2019, ICML; importance-weighted cross-validation, Sugiyama et al. 2007, JMLR 8, 985); the epoch
with the lowest DEV risk is kept (``selection='source-val'`` uses the plain source-validation NLL).
Target labels, when the target folder has them, are only *reported* (``target_*`` columns).

After training, the 68 % and 95 % intervals are calibrated on the source-validation set by split
conformal prediction (one factor per label and level, :func:`sim2obs.heads.conformal_interval_scale`);
their held-out coverage is reported cross-fitted over two halves of that set.

Run folder (as for pretraining): ``checkpoint.pt`` (``weights_only=True``-loadable, written
atomically every epoch; ``resume=True`` continues and gives the same weights on CPU),
``config.json``, ``metrics.csv``, ``summary.json`` (chosen epoch, criterion, calibration).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sim2obs._atomic import atomic_output
from sim2obs.data.dataset import ENCODER_BANDS_HINT, Normalizer, ShardDataset
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError
from sim2obs.heads import (
    INTERVALS,
    NOMINAL,
    GaussianHead,
    LabelScaler,
    conformal_interval_scale,
    gaussian_nll,
    mixture_moments,
    mixture_quantiles,
)

CHECKPOINT = "checkpoint.pt"
#: Default alignment-loss weight per method (``adapter_weight=None``). Deep CORAL's loss carries
#: a 1/(4 d^2) factor (Sun & Saenko 2016), ~1e-4 of the NLL for d = 128 bottleneck features; the
#: paper weights it so that both losses are comparable at the end of training, hence 1e3.
#: The other losses are O(0.1-1) on standardised features and start at 1.
DEFAULT_ADAPTER_WEIGHT = {"none": 0.0, "dann": 1.0, "cdan": 1.0, "sinkhorn": 1.0, "mmd": 1.0,
                          "coral": 1000.0, "jdot": 1.0}
FINETUNE = ("none", "last", "all")
SELECTION = ("dev", "source-val", "last")


@dataclass(frozen=True)
class AdaptConfig:
    """Everything that determines an adaptation run (saved as ``config.json``)."""

    method: str = "sinkhorn"
    labels: tuple[str, ...] = ("log_mstar",)
    finetune: str = "none"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1  # encoder learning rate = lr * this (when fine-tuned)
    weight_decay: float = 1e-4
    adapter_weight: float | None = None  # None: DEFAULT_ADAPTER_WEIGHT[method]
    adapter_options: dict | None = None
    bottleneck_dim: int = 128
    head_hidden: int = 128
    dropout: float = 0.1
    ensemble: int = 1
    selection: str = "dev"
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        from sim2obs.adapters import METHODS

        if self.method not in METHODS:
            raise Sim2ObsValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.finetune not in FINETUNE:
            raise Sim2ObsValueError(f"finetune must be one of {FINETUNE}, got {self.finetune!r}")
        if self.selection not in SELECTION:
            raise Sim2ObsValueError(f"selection must be one of {SELECTION}, got {self.selection!r}")
        if not self.labels:
            raise Sim2ObsValueError("give at least one label to predict (--labels log_mstar ...)")
        for name, v in (("epochs", self.epochs), ("batch_size", self.batch_size),
                        ("ensemble", self.ensemble), ("bottleneck_dim", self.bottleneck_dim)):
            if v < 1:
                raise Sim2ObsValueError(f"{name} must be >= 1, got {v}")
        if self.batch_size < 4:
            raise Sim2ObsValueError("batch_size must be >= 4 (adapters compare batches)")
        if not 0.0 < self.val_fraction < 1.0:
            raise Sim2ObsValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.adapter_weight is None:
            object.__setattr__(self, "adapter_weight", DEFAULT_ADAPTER_WEIGHT[self.method])
        if self.adapter_weight < 0 or self.lr <= 0:
            raise Sim2ObsValueError("adapter_weight must be >= 0 and lr > 0")
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "adapter_options", dict(self.adapter_options or {}))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdaptConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "labels" else v) for k, v in d.items() if k in names})


class Member(nn.Module):
    """One ensemble member: bottleneck ``[N, E] -> [N, F]`` then head ``-> (mu, log_sigma) [N, L]``,
    plus its own adapter (adversarial adapters carry discriminators)."""

    def __init__(self, embed_dim: int, config: AdaptConfig, n_labels: int) -> None:
        from sim2obs import adapters

        super().__init__()
        f = config.bottleneck_dim
        self.bottleneck = nn.Sequential(nn.Linear(embed_dim, f), nn.BatchNorm1d(f), nn.ReLU(inplace=True))
        self.head = GaussianHead(f, n_labels, hidden=config.head_hidden, dropout=config.dropout)
        options = dict(config.adapter_options)
        if config.method == "jdot":  # balance the feature term (D dims) against the label term (L)
            options.setdefault("alpha", n_labels / f)
        self.adapter = adapters.build(config.method, f, n_labels, **options)

    def forward(self, e: torch.Tensor):
        f = self.bottleneck(e)
        mu, log_sigma = self.head(f)
        return f, mu, log_sigma


class AdaptedModel(nn.Module):
    """Images -> (features of member 0, mu [K, N, L], log_sigma [K, N, L]) in standardised units."""

    def __init__(self, encoder: nn.Module, normalizer: Normalizer, emb_mean: torch.Tensor,
                 emb_std: torch.Tensor, members: nn.ModuleList) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalizer = normalizer
        self.register_buffer("emb_mean", emb_mean)
        self.register_buffer("emb_std", emb_std)
        self.members = members

    def embed(self, images: torch.Tensor, ivar: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Standardised encoder embedding of raw (nanomaggy) images; ``ivar`` (same shape) marks
        masked pixels, which an encoder pretrained with ``zero_masked`` expects set to 0."""
        return self.embed_normalised(self.normalizer(self.normalizer.mask(images, ivar)))

    def embed_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised encoder embedding of normalised (arcsinh-stretched) images."""
        return (self.encoder(x) - self.emb_mean) / self.emb_std

    def forward(self, images: torch.Tensor, ivar: torch.Tensor | np.ndarray | None = None):
        e = self.embed(images, ivar)
        outs = [m(e) for m in self.members]
        return outs[0][0], torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])


class AdaptedFeatures(nn.Module):
    """Normalised images -> the adapted (bottleneck) features of member 0: the space the adapter
    aligned. Used where an adapted run stands in for an encoder (``sim2obs embed``,
    ``gap --adapted``), together with the run's normaliser.
    """

    def __init__(self, model: AdaptedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.members[0].bottleneck(self.model.embed_normalised(images))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _generator(seed: int, *keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))
    return g


def _labels(ds: ShardDataset, names, folder_desc: str, required: bool) -> np.ndarray:
    """``[N, L]`` float32 labels in dataset order (NaN where absent)."""
    from sim2obs.pretrain.evaluate import folder_labels

    have = folder_labels(ds)
    missing = [n for n in names if n not in have]
    if missing and required:
        avail = sorted(k for k in have if k != "object_id")
        raise Sim2ObsDataError(f"{folder_desc} has no labels {missing}; available: {avail}")
    return np.stack([have[n].astype(np.float32) if n in have else np.full(len(ds), np.nan, np.float32)
                     for n in names], axis=1)


def _encoder_trainable(encoder: nn.Module, finetune: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` by ``finetune``; return the encoder's trainable parameters."""
    for p in encoder.parameters():
        p.requires_grad_(finetune == "all")
    if finetune == "last":
        last: list[nn.Module] = []
        if hasattr(encoder, "stages"):  # ResNet: last stage + output layer
            last = [encoder.stages[-1], encoder.fc]
        elif hasattr(encoder, "blocks"):  # ViT: last block + norm + output layer
            last = [encoder.blocks[-1], encoder.norm, encoder.head]
        else:
            raise Sim2ObsValueError(f"finetune='last' does not know the layers of {type(encoder).__name__}")
        for m in last:
            for p in m.parameters():
                p.requires_grad_(True)
    return [p for p in encoder.parameters() if p.requires_grad]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 90-degree rotations and flips per batch (galaxy orientation carries no label)."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(-2, -1))
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(-1,))
    return x


class _Inputs:
    """Encoder inputs of one domain: cached standardised embeddings (encoder frozen) or images."""

    def __init__(self, ds: ShardDataset, frozen: bool, embeddings: np.ndarray | None) -> None:
        self.ds, self.frozen, self.embeddings = ds, frozen, embeddings

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, model: AdaptedModel, idx: np.ndarray, gen: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
        if self.frozen:
            return torch.from_numpy(self.embeddings[idx]).to(device)
        images, ivar = self.ds.raw_many(idx)
        x = model.normalizer.mask(torch.from_numpy(images).to(device), ivar)
        if gen is not None:
            x = _augment(x, gen)
        return model.embed(x)


@torch.no_grad()
def _predict_inputs(model: AdaptedModel, inputs: _Inputs, device: torch.device,
                    batch: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features of member 0 [N, F], mu [K, N, L], sigma [K, N, L]) in standardised units."""
    model.eval()
    feats, mus, sigmas = [], [], []
    for s in range(0, len(inputs), batch):
        idx = np.arange(s, min(len(inputs), s + batch))
        e = inputs.batch(model, idx, None, device)
        outs = [m(e) for m in model.members]
        feats.append(outs[0][0].cpu().numpy())
        mus.append(torch.stack([o[1] for o in outs]).cpu().numpy())
        sigmas.append(torch.stack([o[2] for o in outs]).exp().cpu().numpy())
    return np.concatenate(feats), np.concatenate(mus, 1), np.concatenate(sigmas, 1)


def _nll_per_object(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Mean Gaussian NLL over the finite labels of each object (``[N]``)."""
    nll = 0.5 * ((y - mu) / sigma) ** 2 + np.log(sigma) + 0.5 * math.log(2 * math.pi)
    ok = np.isfinite(nll)
    return np.where(ok, nll, 0.0).sum(1) / np.maximum(ok.sum(1), 1)


def density_ratio(f_source_train: np.ndarray, f_target: np.ndarray, f_eval: np.ndarray,
                  max_n: int = 2000, seed: int = 0) -> np.ndarray:
    """``w(x) = p_target(x) / p_source(x)`` at ``f_eval`` from an L2-regularised logistic domain
    classifier trained on source-training vs target features (Bickel et al. 2007, ICML):
    ``w = (n_s / n_t) * d / (1 - d)`` with ``d = P(target | x)``; clipped to [0, 50]."""
    from sim2obs.gap.embedding import fit_logistic

    rng = np.random.default_rng(seed)
    fs = f_source_train[rng.permutation(len(f_source_train))[:max_n]]
    ft = f_target[rng.permutation(len(f_target))[:max_n]]
    z = np.concatenate([fs, ft]).astype(np.float64)
    mu, sd = z.mean(0), z.std(0) + 1e-8
    t = np.r_[np.zeros(len(fs)), np.ones(len(ft))]
    w, b = fit_logistic((z - mu) / sd, t, l2=1.0)
    logit = ((f_eval - mu) / sd) @ w + b
    return np.clip(np.exp(logit) * len(fs) / len(ft), 0.0, 50.0)


def dev_risk(loss: np.ndarray, weight: np.ndarray) -> float:
    """Deep Embedded Validation risk (You et al. 2019, ICML, Alg. 1): the importance-weighted
    mean loss with the weights' known mean (1) as control variate,
    ``mean(w l) + eta mean(w) - eta`` with ``eta = -Cov(w l, w) / Var(w)``."""
    wl = weight * loss
    var = float(np.var(weight, ddof=1)) if weight.size > 1 else 0.0
    eta = -float(np.cov(wl, weight)[0, 1]) / var if var > 0 else 0.0
    return float(wl.mean() + eta * weight.mean() - eta)


def _save(path: Path, payload: dict) -> None:
    from sim2obs.pretrain.checkpoint import save_checkpoint

    save_checkpoint(path, payload)  # atomic, and the same bytes for the same payload


def _write_json(path: Path, obj) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=float) + "\n")


def _load(run: Path) -> dict:
    from sim2obs.pretrain.train import load_checkpoint

    return load_checkpoint(run)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------

def adapt(pretrained: str | Path, source, target, out_dir: str | Path,
          config: AdaptConfig = AdaptConfig(), device: str = "auto", resume: bool = False,
          progress: bool = True, stop_after_epoch: int | None = None,
          log: Callable[[str], None] | None = None) -> Path:
    """Adapt ``pretrained`` (a pretraining run folder) from ``source`` shard folders (labelled) to
    ``target`` shard folders (labels unused) and write the run to ``out_dir``; returns it.

    ``stop_after_epoch=k`` ends after epoch k's checkpoint; ``resume=True`` continues a run.
    """
    from tqdm.auto import tqdm

    from sim2obs import __version__
    from sim2obs.pretrain.evaluate import compute_embeddings
    from sim2obs.pretrain.train import checkpoint_hash, load_encoder, resolve_device

    log = log or (lambda s: None)
    out = Path(out_dir)
    ckpt = None
    if resume:
        ckpt = _load(out)
        if ckpt.get("kind") != "adapt":
            raise Sim2ObsValueError(f"'{out}' is not an adaptation run")
        config = AdaptConfig.from_dict(ckpt["config"])
        if ckpt["epoch"] + 1 >= config.epochs and _finished(ckpt):
            log(f"'{out}' is already complete ({config.epochs} epochs)")
            return out
    elif (out / CHECKPOINT).exists():
        raise Sim2ObsValueError(f"'{out}' already holds a run; use --resume to continue it or "
                                "choose another --out")
    dev = resolve_device(device)
    torch.manual_seed(config.seed)
    source = [source] if isinstance(source, str | Path) else list(source)
    target = [target] if isinstance(target, str | Path) else list(target)

    encoder, normalizer, pre = load_encoder(pretrained)
    if pre.get("kind") == "adapt":
        raise Sim2ObsValueError(f"'{pretrained}' is an adaptation run; adapt from the pretraining run")
    kw = dict(bands=normalizer.bands, val_fraction=config.val_fraction, split_seed=config.split_seed,
              bands_hint=ENCODER_BANDS_HINT)
    src_train = ShardDataset(source, split="train", **kw)
    try:
        src_val = ShardDataset(source, split="val", **kw)
    except Sim2ObsDataError as exc:
        raise Sim2ObsDataError(f"{exc}: too few source galaxies for a validation split; render "
                               "more or raise --val-fraction") from exc
    tgt = ShardDataset(target, bands=normalizer.bands, bands_hint=ENCODER_BANDS_HINT)
    for ds, what in ((src_val, "source"), (tgt, "target")):
        if ds.stamp != src_train.stamp:
            raise Sim2ObsDataError(f"{what} stamps are {ds.stamp} pixels but source training stamps "
                                   f"are {src_train.stamp}; ingest/render with the same --stamp")
    scales = {**src_train.pixel_scales, **tgt.pixel_scales}
    finite = [v for v in scales.values() if np.isfinite(v)]
    if finite and (max(finite) - min(finite)) > 1e-3 * max(finite):
        raise Sim2ObsDataError(f"source and target pixel scales differ ({scales} arcsec); resample "
                               "the target on ingest (`sim2obs ingest ... --survey` of the source)")
    y_train = _labels(src_train, config.labels, f"source {source}", required=True)
    y_val = _labels(src_val, config.labels, f"source {source}", required=True)
    y_tgt = _labels(tgt, config.labels, "target", required=False)  # reporting only
    if len(src_train) < config.batch_size or len(tgt) < 2:
        raise Sim2ObsValueError(f"{len(src_train)} source training and {len(tgt)} target galaxies "
                                f"are too few for a batch of {config.batch_size}; lower --batch-size")
    scaler = (LabelScaler.from_dict(ckpt["label_scaler"]) if ckpt else LabelScaler.fit(config.labels, y_train))
    ys_train, ys_val = scaler.transform(y_train), scaler.transform(y_val)

    frozen = config.finetune == "none"
    encoder = encoder.to(dev)
    enc_params = _encoder_trainable(encoder, config.finetune)
    encoder.eval()
    if ckpt is not None:
        emb_mean, emb_std = ckpt["emb_mean"], ckpt["emb_std"]
        caches = None
    else:
        log(f"embedding {len(src_train) + len(src_val) + len(tgt)} galaxies with the pretrained encoder")
        caches = [compute_embeddings(encoder, normalizer, d, device=dev, progress=progress)
                  for d in (src_train, src_val, tgt)]
        emb_mean = torch.from_numpy(caches[0].mean(0))
        emb_std = torch.from_numpy(caches[0].std(0) + 1e-6)
    if frozen:
        if caches is None:
            caches = [compute_embeddings(encoder, normalizer, d, device=dev, progress=progress)
                      for d in (src_train, src_val, tgt)]
        caches = [((c - emb_mean.numpy()) / emb_std.numpy()).astype(np.float32) for c in caches]
    else:
        caches = [None, None, None]
    inputs = [_Inputs(d, frozen, c) for d, c in zip((src_train, src_val, tgt), caches, strict=True)]

    embed_dim = int(emb_mean.numel())
    members = nn.ModuleList()
    for k in range(config.ensemble):
        torch.manual_seed(int(np.random.SeedSequence([config.seed, 7, k]).generate_state(1)[0]))
        members.append(Member(embed_dim, config, len(config.labels)))
    model = AdaptedModel(encoder, normalizer, emb_mean, emb_std, members).to(dev)
    groups = [{"params": list(members.parameters()), "lr": config.lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": config.lr * config.encoder_lr_scale})
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(src_train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))  # cosine decay
    start, best, history = 0, None, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start, best, history = int(ckpt["epoch"]) + 1, ckpt["best"], list(ckpt["history"])
        log(f"resuming '{out}' after epoch {start} of {config.epochs}")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", {**config.to_dict(), "pretrained": str(Path(pretrained).resolve()),
                                      "source": [str(s) for s in source],
                                      "target": [str(t) for t in target]})
    pretrained_id = f"{Path(pretrained).resolve()}@{checkpoint_hash(pretrained)}"

    bar = tqdm(range(start, config.epochs), desc=f"adapt {config.method}", unit="epoch",
               disable=not progress, initial=start, total=config.epochs)
    for epoch in bar:
        torch.manual_seed(int(np.random.SeedSequence([config.seed, 11, epoch]).generate_state(1)[0]))
        gen = _generator(config.seed, 13, epoch)
        perm_s = torch.randperm(len(src_train), generator=gen).numpy()
        n_t_needed = steps_per_epoch * config.batch_size
        perm_t = np.concatenate([torch.randperm(len(tgt), generator=gen).numpy()
                                 for _ in range(-(-n_t_needed // len(tgt)))])
        model.train()
        if frozen:
            encoder.eval()
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            for m in members:
                m.adapter.set_progress((epoch * steps_per_epoch + step) / total)
            bs = config.batch_size
            i_s = perm_s[step * bs:(step + 1) * bs]
            i_t = perm_t[step * bs:(step + 1) * bs]
            e = torch.cat([inputs[0].batch(model, i_s, gen, dev), inputs[2].batch(model, i_t, gen, dev)])
            y = torch.from_numpy(ys_train[i_s]).to(dev)
            loss = torch.zeros((), device=dev)
            for m in members:
                f, mu, log_sigma = m(e)
                nll = gaussian_nll(mu[:bs], log_sigma[:bs], y)
                a = m.adapter(f[:bs], f[bs:], y_s=y, p_s=mu[:bs], p_t=mu[bs:])
                loss = loss + nll + config.adapter_weight * a.loss
                sums["nll"] = sums.get("nll", 0.0) + nll.item() / len(members)
                sums["adapter_loss"] = sums.get("adapter_loss", 0.0) + a.loss.item() / len(members)
                for k, v in a.diagnostics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(members)
            if not torch.isfinite(loss):
                raise Sim2ObsValueError(f"the loss became {float(loss)} at epoch {epoch}; lower --lr "
                                        "or --adapter-weight")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 5.0)
            opt.step()
            sched.step()
        row = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()}}
        if config.selection != "last" or epoch + 1 == config.epochs:  # 'last' needs no per-epoch scores
            row.update(_evaluate(model, inputs, ys_train, ys_val, y_tgt, scaler, config, dev))
        history.append(row)
        score = {"dev": row.get("dev_risk"), "source-val": row.get("source_val_nll"),
                 "last": -epoch}[config.selection]
        if best is None or score < best["score"] or not np.isfinite(best["score"]):
            best = {"epoch": epoch, "score": float(score),
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        bar.set_postfix(nll=f"{row['nll']:.3f}")
        payload = {"kind": "adapt", "config": config.to_dict(), "epoch": epoch,
                   "model": model.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict(), "best": best, "history": history,
                   "emb_mean": emb_mean, "emb_std": emb_std, "label_scaler": scaler.to_dict(),
                   "normalizer": normalizer.to_dict(), "encoder_config": pre["encoder_config"],
                   "pretrained": pretrained_id, "version": __version__,
                   "stamp": list(src_train.stamp)}
        _write_metrics(out / "metrics.csv", history)
        if epoch + 1 == config.epochs:
            payload.update(_finish(model, best, inputs[1], y_val, scaler, config, dev, log))
        _save(out / CHECKPOINT, payload)
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch + 1 < config.epochs:
            log(f"stopped after epoch {epoch}; continue with --resume")
            break
    bar.close()
    final = _load(out)
    if _finished(final):
        summary = {"method": config.method, "selected_epoch": final["selected_epoch"],
                   "selection": config.selection, "calibration": final["calibration"],
                   "pretrained": pretrained_id, "final_epoch_metrics": history[-1],
                   "selected_epoch_metrics": history[final["selected_epoch"]]}
        _write_json(out / "summary.json", summary)
    return out


def _evaluate(model, inputs, ys_train, ys_val, y_tgt, scaler, config, dev) -> dict:
    """Per-epoch diagnostics: source-validation NLL and NMAD, DEV risk, target metrics if labelled."""
    from sim2obs.pretrain.evaluate import regression_scores

    f_tr, _, _ = _predict_inputs(model, inputs[0], dev)
    f_val, mu_v, sg_v = _predict_inputs(model, inputs[1], dev)
    f_t, mu_t, sg_t = _predict_inputs(model, inputs[2], dev)
    mean_v, sd_v = mixture_moments(mu_v, sg_v)
    loss = _nll_per_object(ys_val, mean_v, sd_v)
    w = density_ratio(f_tr, f_t, f_val, seed=config.seed)
    row = {"source_val_nll": float(loss.mean()), "dev_risk": dev_risk(loss, w),
           "weight_ess_fraction": float(w.sum() ** 2 / max((w**2).sum(), 1e-30) / w.size)}
    y_val = scaler.inverse_mean(ys_val)
    pred_v = scaler.inverse_mean(mean_v)
    mean_t, _ = mixture_moments(mu_t, sg_t)
    pred_t = scaler.inverse_mean(mean_t)
    for j, name in enumerate(config.labels):
        ok = np.isfinite(y_val[:, j])
        if ok.sum() > 2:
            row[f"source_val_nmad_{name}"] = regression_scores(y_val[ok, j], pred_v[ok, j], name).nmad
        ok = np.isfinite(y_tgt[:, j])
        if ok.sum() > 2:  # reporting only: never used for training or selection
            row[f"target_nmad_{name}"] = regression_scores(y_tgt[ok, j], pred_t[ok, j], name).nmad
    return row


def _finish(model, best, val_inputs, y_val, scaler, config, dev, log) -> dict:
    """Load the selected epoch's weights and calibrate the 68 % and 95 % intervals on the
    source-validation set (split conformal, one factor per label and level,
    :func:`sim2obs.heads.conformal_interval_scale`).

    The reported held-out coverage is cross-fitted: the factors fitted on one half of the
    validation set are scored on the other half and vice versa; the factors kept are those
    fitted on the whole set."""
    from sim2obs.data.dataset import split_of

    model.load_state_dict(best["model"])
    _, mu, sg = _predict_inputs(model, val_inputs, dev)
    mean, _ = mixture_moments(mu, sg)
    ys = scaler.transform(y_val)
    bounds = {lvl: (mixture_quantiles(mu, sg, plo), mixture_quantiles(mu, sg, phi))
              for lvl, (plo, phi) in INTERVALS.items()}
    half = split_of(val_inputs.ds.object_id, 0.5, seed=config.seed + 1)

    def fit(lvl: str, rows: np.ndarray) -> np.ndarray:
        lo, hi = bounds[lvl]
        return conformal_interval_scale(ys[rows], mean[rows], lo[rows], hi[rows], NOMINAL[lvl])

    def covered(lvl: str, s: np.ndarray, rows: np.ndarray) -> np.ndarray:  # [n_rows, L], NaN unknown
        lo, hi = bounds[lvl]
        m, y = mean[rows], ys[rows]
        inside = (y >= m - s * (m - lo[rows])) & (y <= m + s * (hi[rows] - m))
        return np.where(np.isfinite(y), inside.astype(float), np.nan)

    every = np.ones(len(ys), bool)
    scales = {lvl: fit(lvl, every) for lvl in INTERVALS}
    cal: dict = {"raw": {}, "calibrated": {}}
    for lvl in INTERVALS:
        raw = covered(lvl, np.ones(len(config.labels)), every)
        crossed = np.concatenate([covered(lvl, fit(lvl, a), ~a) for a in (half, ~half)])
        for j, name in enumerate(config.labels):
            cal["raw"].setdefault(name, {})[f"coverage_{lvl}"] = float(np.nanmean(raw[:, j]))
            cal["calibrated"].setdefault(name, {})[f"coverage_{lvl}"] = float(np.nanmean(crossed[:, j]))
    cal["interval_scale"] = {lvl: {name: float(scales[lvl][j]) for j, name in enumerate(config.labels)}
                             for lvl in INTERVALS}
    cal["n_validation"] = int(len(ys))
    cal["method"] = "split conformal, cross-fitted coverage on two halves of source validation"
    cal["nominal"] = {f"coverage_{lvl}": NOMINAL[lvl] for lvl in INTERVALS}
    log(f"selected epoch {best['epoch']} ({config.selection}); held-out source coverage of the "
        "68 % / 95 % intervals: " + ", ".join(
            f"{n} {cal['calibrated'][n]['coverage_68']:.2f} / {cal['calibrated'][n]['coverage_95']:.2f}"
            for n in config.labels))
    return {"model": best["model"], "selected_epoch": int(best["epoch"]),
            "interval_scale": torch.tensor(np.stack([scales[lvl] for lvl in INTERVALS]), dtype=torch.float64),
            "calibration": cal}


def interval_scales(ckpt: dict) -> dict[str, np.ndarray]:
    """The calibration factors of a finished run per interval (``'68'``, ``'95'``) -> ``[L]``.
    Runs written before per-level calibration hold one ``sigma_scale`` used for both."""
    if "interval_scale" in ckpt:
        table = ckpt["interval_scale"].numpy()
        return {lvl: table[i] for i, lvl in enumerate(INTERVALS)}
    return {lvl: ckpt["sigma_scale"].numpy() for lvl in INTERVALS}


def _finished(ckpt: dict) -> bool:
    return "interval_scale" in ckpt or "sigma_scale" in ckpt


def _write_metrics(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(row)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def load_adapted(run_dir: str | Path, ckpt: dict | None = None) -> tuple[AdaptedModel, dict]:
    """The adapted model of a finished run (selected epoch's weights, eval mode, CPU) and its
    checkpoint (``interval_scale``, ``label_scaler``, ``config``, ...)."""
    from sim2obs import encoders

    ckpt = ckpt if ckpt is not None else _load(Path(run_dir))
    if ckpt.get("kind") != "adapt":
        raise Sim2ObsValueError(f"'{run_dir}' is not an adaptation run (make one with `sim2obs adapt`)")
    if not _finished(ckpt):
        raise Sim2ObsValueError(f"'{run_dir}' has not finished training; continue it with "
                                f"`sim2obs adapt ... --out {run_dir} --resume`")
    config = AdaptConfig.from_dict(ckpt["config"])
    encoder = encoders.build(**ckpt["encoder_config"])
    members = nn.ModuleList([Member(int(ckpt["emb_mean"].numel()), config, len(config.labels))
                             for _ in range(config.ensemble)])
    model = AdaptedModel(encoder, Normalizer.from_dict(ckpt["normalizer"]), ckpt["emb_mean"],
                         ckpt["emb_std"], members)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def adapted_encoder(run_dir: str | Path, ckpt: dict) -> tuple[nn.Module, Normalizer, dict]:
    """``(features module, normaliser, checkpoint)`` so an adapted run can be used wherever a
    pretraining run's encoder is (embeddings, gap report)."""
    model, ckpt = load_adapted(run_dir, ckpt)
    return AdaptedFeatures(model).eval(), model.normalizer, ckpt
