"""Training views: pairs of the same galaxy and the augmentations that turn them into model inputs.

* :class:`PairDataset` yields two raw views of each galaxy -- with several survey folders the
  second is, when it exists, the same simulated galaxy rendered by another survey (same
  ``object_id``), a positive pair that teaches survey invariance from the forward model -- and
  :class:`EpochSampler` carries the epoch with every index into persistent DataLoader workers.
* :func:`build_augment` assembles the augmentation pipeline of a preset (``AUGMENT_PRESETS``)
  from the survey's median PSF FWHM and extinction coefficients.
* :func:`prepare_views` augments and normalises a batch of pairs on the training device;
  :class:`LoaderViews` does the same in DataLoader workers (``--augment-on loader``), seeded by
  the batch's indices so the run does not depend on ``num_workers``.

The training loop that composes these is :func:`sim2obs.pretrain.train.pretrain`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sim2obs.data.dataset import Normalizer, ShardDataset, estimated_ivar

if TYPE_CHECKING:
    from sim2obs.pretrain.train import PretrainConfig

#: Augmentation pipelines (:func:`build_augment`); 'physical' is the chain before 'reobserve'.
AUGMENT_PRESETS = ("reobserve", "reobserve-rotate", "physical", "geometric", "none")


class PairDataset(torch.utils.data.Dataset):
    """Items ``(view_a, view_b)`` of raw arrays. View b is the same galaxy in another survey
    (same object_id) when ``cross_survey`` and one exists, chosen by (seed, epoch, index).

    An index may be an ``(epoch, i)`` pair (what :class:`EpochSampler` yields): the epoch then
    travels with it into persistent DataLoader workers, whose copies of this dataset never see
    :meth:`set_epoch`. With ``views`` (a :class:`LoaderViews`), a batch comes out augmented and
    normalised, ``(x_a, x_b)`` tensors, instead of raw arrays.
    """

    def __init__(self, base: ShardDataset, cross_survey: bool, seed: int,
                 views: LoaderViews | None = None):
        self.base = base
        self.seed = int(seed)
        self.epoch = 0
        self.views = views
        self.partners: list[np.ndarray] | None = None
        names = survey_names(base)
        #: per item: row of its survey in ``survey_names(base)`` (the augmentations' tables)
        self.survey_of = np.array([names.index(s) for s in base.surveys], dtype=np.int64)[base.file_of]
        if cross_survey and len(names) > 1:
            surveys = self.survey_of
            order = np.argsort(base.object_id, kind="stable")
            ids = base.object_id[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            groups = np.split(order, starts[1:])
            partners: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(base)
            for g in groups:
                for i in g:
                    partners[i] = g[surveys[g] != surveys[i]]
            self.partners = partners

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _key(self, item) -> tuple[int, int]:
        """``(epoch, index)`` of an item: an ``(epoch, i)`` pair, or a bare index at this
        dataset's own epoch."""
        if isinstance(item, tuple):
            return int(item[0]), int(item[1])
        return self.epoch, int(item)

    def _pack(self, item: dict, i: int) -> dict:
        ivar = item["ivar"] if item["ivar"] is not None else estimated_ivar(item["image"])
        return {"image": torch.from_numpy(item["image"]), "ivar": torch.from_numpy(ivar),
                "survey": torch.tensor(self.survey_of[i])}

    def partner(self, i: int, epoch: int | None = None) -> int:
        """Index of the second view's item (``i`` itself when there is no other survey)."""
        if self.partners is not None and self.partners[i].size:
            rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, int(i)])
            return int(rng.choice(self.partners[i]))
        return int(i)

    def __getitem__(self, item):
        epoch, i = self._key(item)
        if self.views is not None:
            return self.__getitems__([(epoch, i)])
        a = self.base.raw(i)
        j = self.partner(i, epoch)
        b = a if j == i else self.base.raw(j)
        return self._pack(a, i), self._pack(b, j)

    def __getitems__(self, items):
        """Batched fetch (used by the DataLoader): one HDF5 read per shard per view."""
        keys = [self._key(item) for item in items]
        idx = [i for _, i in keys]
        img_a, ivar_a = self.base.raw_many(idx)
        partners = [self.partner(i, e) for e, i in keys]
        if partners == idx:
            img_b, ivar_b = img_a, ivar_a
        else:
            img_b, ivar_b = self.base.raw_many(partners)
        a = {"image": torch.from_numpy(img_a), "ivar": torch.from_numpy(ivar_a),
             "survey": torch.from_numpy(self.survey_of[idx])}
        b = {"image": torch.from_numpy(img_b), "ivar": torch.from_numpy(ivar_b),
             "survey": torch.from_numpy(self.survey_of[partners])}
        if self.views is not None:
            return self.views(a, b, keys)
        return a, b


class EpochSampler(torch.utils.data.Sampler):
    """Wraps an epoch-aware sampler (``DistributedSampler``) and yields ``(epoch, index)``.

    DataLoader workers hold their own copy of the dataset, made when they start; with
    ``persistent_workers`` they live for the whole run, so a dataset's ``set_epoch`` in the main
    process never reaches them. The sampler runs in the main process: passing the epoch with every
    index keeps per-epoch draws (cross-survey partners, loader-side augmentations) a function of
    the epoch for any ``num_workers``, and a resumed run equal to an uninterrupted one.
    """

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class LoaderViews:
    """Augment and normalise a batch of pairs where it is read: in the DataLoader, on the CPU.

    With ``--augment-on loader`` the augmentations run in the DataLoader's worker processes, in
    parallel with the training step, instead of in the training process: for training on a CPU
    with cores to spare for ``--num-workers`` (the data preparation then no longer takes turns
    with the model on the same cores). The random draws of a batch come from a generator seeded
    by ``(seed, epoch, indices of the batch)``, so the views -- and the run -- do not depend on
    ``num_workers`` (0 runs the same code in the main process) nor on which worker made a batch.
    Views are always made with one intra-op thread, as PyTorch sets in DataLoader workers: some
    kernels (FFTs, matrix products) round differently with another thread count.

    With ``dtype`` (the autocast dtype of a bf16/fp16 run) the finished views are rounded to it
    here, in the worker, instead of by autocast at the model's first convolution: the same
    rounding (to nearest even), so the same training for encoders that begin with a convolution
    (both built-in ones), and half the bytes through shared memory to the training process
    (10 MB per 64-pair batch of 5 x 64 x 64 stamps in float32: ~16 ms of copies and page faults
    per batch on the 2-core test machine, ~8 ms in bfloat16).

    ``__call__(a, b, keys)``: ``a``, ``b`` dicts of ``image``/``ivar`` (N, B, H, W) tensors,
    ``keys`` the N ``(epoch, index)`` pairs -> ``(x_a, x_b)``, each (N, B, H, W) float32 (or
    ``dtype``).
    """

    def __init__(self, augment: nn.Module, normalizer: Normalizer, seed: int,
                 channels_last: bool = False, dtype: torch.dtype | None = None) -> None:
        self.augment = copy.deepcopy(augment).cpu()  # its own CPU copy: the caller's stays put
        self.normalizer = normalizer
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        self.dtype = dtype

    def generator(self, keys: list[tuple[int, int]]) -> torch.Generator:
        entropy = [self.seed] + [v for key in keys for v in key]
        state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __call__(self, a: dict, b: dict, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        threads = torch.get_num_threads()
        if threads != 1:  # the main process (num_workers=0); workers already run one thread
            torch.set_num_threads(1)
        try:
            return prepare_views(a, b, self.augment, self.normalizer, self.generator(keys),
                                 torch.device("cpu"), self.channels_last, self.dtype)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)


def survey_names(dataset) -> tuple[str, ...]:
    """The dataset's surveys in order of first appearance: the rows of the augmentations'
    per-survey tables, and what a batch's ``survey`` indices point to."""
    return tuple(dict.fromkeys(dataset.surveys))


def build_augment(config: PretrainConfig, dataset: ShardDataset,
                  log: Callable[[str], None] | None = None):
    """The augmentation pipeline: physical ones (worse seeing, Galactic reddening, shallower
    depth) before geometric ones (dihedral symmetries, sub-pixel shifts).

    ``reobserve`` (the default) re-observes each galaxy with
    :class:`~sim2obs.pretrain.reobserve.Reobserve` -- worse seeing, dust, a sub-pixel shift of up
    to 1 px in one pair of matrix products, then one noise field -- and flips it: the view's
    pixel noise is 1-1.5x the data's whatever the extra blur, shift and dust. (sim2obs < 0.2
    shifted the finished view periodically with a separate FFT; now the zero-padded stamp is
    shifted before the noise top-up: nearly the same views, other draws.) ``physical`` is the
    earlier chain -- noise re-realisation, then blur and dimming that smooth that noise to about
    0.35x the data's sigma (median, HSC):
    views deeper than the data -- kept so that runs made with it (benchmark protocol v3) resume
    and reproduce. ``reobserve-rotate`` adds an arbitrary position angle (bilinear, noise topped
    up) before the rest.

    Worse seeing starts from each survey's median PSF FWHM (in its own pixels) and reddening
    uses each survey's extinction coefficients: with several surveys both take an (S, B) table
    (rows in :func:`survey_names` order) and every sample its own survey's row. A survey without
    them (real data: no ``psf_fwhm_BAND`` labels, a name sim2obs does not know) takes the median
    of the other surveys' rows, and ``log`` says so; with no survey knowing them the effect is
    left out.

    Only exact or flux- and noise-preserving resamplings are in it. ``RandomRotation`` (outside
    ``reobserve-rotate``, which tops the noise up), ``RandomCropResize`` (bilinear) and
    ``RedshiftDimming`` are in the Python API only: they lower the pixel noise of the image they
    act on (bilinear rotation and a 0.85 zoom leave about half the survey's noise sigma), so they
    would train on views deeper than the data; a zoom would also teach invariance to apparent
    size, which carries redshift and mass.
    """
    from sim2obs.pretrain import augment as A
    from sim2obs.pretrain import observing as O

    geometric = [A.RandomRot90Flip(), A.RandomShift(max_shift=1.0)]
    if config.augment == "none":
        return A.Compose([])
    if config.augment == "geometric":
        return A.Compose(geometric)
    names = survey_names(dataset)
    fwhm = _survey_table([_median_psf_fwhm_pix(dataset, name) for name in names], names,
                         "PSF FWHM (labels/psf_fwhm_BAND)", log)
    coeffs = _survey_table([_extinction_coefficients(name, dataset.bands) for name in names], names,
                           "extinction coefficients (a survey sim2obs knows)", log)
    if config.augment in ("reobserve", "reobserve-rotate"):
        from sim2obs.pretrain.reobserve import Reobserve

        rotate = config.augment == "reobserve-rotate"
        # the sub-pixel shift is folded into Reobserve's blur (one pair of matrix products, and
        # the noise it would smooth is topped up with the rest); the dihedral flips follow
        return A.Compose([Reobserve(fwhm, coeffs, seeing_factor=(1.0, 1.3), ebv_max=0.05,
                                    noise_factor=(1.0, 1.5), rotate=rotate, max_shift=1.0),
                          A.RandomRot90Flip()])
    physical: list = [O.NoiseResample(factor_range=(1.0, 1.5))]  # 'physical'
    if fwhm is not None:
        physical.append(O.PSFDegrade(fwhm, max_factor=1.3))
    if coeffs is not None:
        physical.append(O.GalacticReddening(coeffs, ebv_max=0.05))
    return A.Compose(physical + geometric)


def _survey_table(rows: list, names: tuple[str, ...], what: str, log: Callable[[str], None] | None):
    """(B,) for one survey, (S, B) for several; rows that are None take the median of the known
    ones (logged); None when no survey has values."""
    known = [r for r in rows if r is not None]
    if not known:
        return None
    if len(known) < len(rows):
        fill = np.median(np.asarray(known, dtype=float), axis=0).tolist()
        missing = [n for n, r in zip(names, rows, strict=True) if r is None]
        if log:
            log(f"augmentations: no {what} for {missing}; using the median of {sorted(set(names) - set(missing))}'s")
        rows = [fill if r is None else r for r in rows]
    return rows[0] if len(rows) == 1 else rows


def _median_psf_fwhm_pix(dataset: ShardDataset, survey: str, max_files: int = 64):
    """Median PSF FWHM (pixels) per band of one survey's shards (``labels/psf_fwhm_BAND``,
    arcsec, over the pixel scale); None where a band has none."""
    import h5py

    files = [path for path, s in zip(dataset.files, dataset.surveys, strict=True) if s == survey]
    # at most max_files of them, evenly spread (10^4 shards: a sample)
    files = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, max_files).astype(int))]
    out = []
    for b in dataset.bands:
        vals = []
        for path in files:
            with h5py.File(path, "r") as f:
                key = f"labels/psf_fwhm_{b}"
                if key in f:
                    scale = float(f.attrs["pixel_scale_arcsec"])
                    vals.append(np.nanmedian(f[key][()]) / scale)
        if not vals:
            return None
        out.append(float(np.median(vals)))
    return out


def _extinction_coefficients(survey: str, bands: tuple[str, ...]):
    """The survey's band extinction coefficients R_b, or None for a survey sim2obs does not know
    (real data under its own name) or without the 'extinction' package."""
    from sim2obs.errors import Sim2ObsError
    from sim2obs.forward_models.surveys import get_survey
    from sim2obs.pretrain.observing import extinction_coefficients

    try:
        spec = get_survey(survey).with_bands(bands)
        return extinction_coefficients([b.filter for b in spec.bands]).tolist()
    except (Sim2ObsError, ImportError):
        return None  # unknown survey (e.g. real data) or no 'extinction' package: skip


@torch.no_grad()
def prepare_views(a: dict, b: dict, augment, normalizer: Normalizer, generator, device: torch.device,
                  channels_last: bool = False, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs ``(x_a, x_b)``, each (N, B, H, W), from a batch of pairs (``image``, ``ivar``);
    float32 unless ``dtype`` is given (the views are made in float32 and rounded to it at the end).

    Both views are augmented and normalised in one call on the stacked (2N, B, H, W) batch (half
    the kernel launches and thread-pool synchronisations of two calls; the per-sample random
    draws are independent either way), with no autograd graph and autocast off -- the
    augmentations are data preparation in full precision, not part of the model.
    """
    n = a["image"].shape[0]
    with torch.autocast(device.type, enabled=False):
        nb = device.type == "cuda"  # asynchronous copies only to CUDA (on MPS they can race)
        x = torch.cat([a["image"].to(device, non_blocking=nb), b["image"].to(device, non_blocking=nb)])
        ivar = torch.cat([a["ivar"].to(device, non_blocking=nb), b["ivar"].to(device, non_blocking=nb)])
        x = normalizer.mask(x, ivar)  # zero_masked: masked pixels -> 0, before pixels move
        context = {"ivar": ivar}
        if "survey" in a:  # (2N,) rows of the per-survey tables, on the CPU (checked there)
            context["survey"] = torch.cat([a["survey"], b["survey"]])
        x = normalizer(augment(x, generator, **context))
        if channels_last or dtype is not None:  # one pass for both
            x = x.to(dtype=dtype or x.dtype,
                     memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x[:n], x[n:]


def _collate(batch):
    if isinstance(batch, tuple):  # already batched by PairDataset.__getitems__
        return batch
    keys = [k for k in ("image", "ivar", "survey") if k in batch[0][0]]
    a = {k: torch.stack([x[0][k] for x in batch]) for k in keys}
    b = {k: torch.stack([x[1][k] for x in batch]) for k in keys}
    return a, b
