"""Out-of-core training data: a torch ``IterableDataset`` that streams many shards.

:class:`StreamingShardDataset` yields the same item dicts as
:class:`sim2obs.data.dataset.ShardDataset` (``{'image': (B,H,W) float32, 'ivar', 'object_id',
'survey', 'labels'}``, raw nanomaggies) but never holds more than one shard open per reader and
a bounded number of items in memory, whatever the number of shards:

* **Index.** Only per-shard counts are kept (after the train/val split, which is the same
  function of ``object_id`` as in ``ShardDataset``). They come from each folder's
  ``manifest.json`` when it is up to date (no HDF5 file opened), otherwise from reading each
  shard's ``/labels/object_id`` once (:func:`sim2obs.data.manifest.shard_entries`).
* **Epoch order.** The shard order is a permutation drawn from ``(seed, epoch)``. The selected
  samples of the shards, concatenated in that order, form one global sequence of ``N`` samples
  that is cut into ``S = world_size x num_workers`` contiguous, equal blocks, one per reader
  (DDP rank ``r``, DataLoader worker ``w``: block ``r * num_workers + w``). A reader therefore
  streams about ``n_shards / S + 1`` shards, one after the other, in row chunks of ``read_rows``.
* **Exactly once.** Every sample goes to exactly one reader per epoch. Blocks must be equal
  (DDP ranks must run the same number of steps), so with ``partition='drop'`` (default) the
  last ``N mod S`` samples of the epoch's sequence are left out -- a different few each epoch,
  as the shard order changes; with ``partition='pad'`` the sequence is wrapped around instead,
  so ``S - N mod S`` samples are seen twice. A ``DataLoader`` with ``drop_last=True``
  additionally drops each worker's last partial batch (:meth:`batches_per_epoch` counts full
  batches).
* **Shuffling.** Each reader passes its samples through a shuffle buffer of ``shuffle_buffer``
  items (fill, then emit a random slot and refill it; drained in random order at the end),
  seeded by ``(seed, epoch, reader)``. Memory is about ``shuffle_buffer + read_rows`` items
  per reader (an item of 5 bands of 64x64 with ivar is 160 KiB). ``shuffle_buffer <= 1`` or
  ``shuffle=False`` keep the file order within a block (``shuffle=False`` also the shard order).
* **Determinism.** The stream is a function of ``(seed, epoch, world_size, num_workers)`` and
  the folder content; the DataLoader interleaves its workers' batches in a fixed order.
* **Ranks.** ``rank``/``world_size`` default to ``torch.distributed``'s when a process group is
  initialised (else 0 and 1); they are resolved when the dataset is built, in the main process.

Call :meth:`set_epoch` before each epoch; with ``num_workers > 0`` use
``persistent_workers=False`` (the default) so that the workers see the new epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sim2obs.data.dataset import BANDS_HINT, check_shard_bands, split_of
from sim2obs.data.manifest import fix_hint, open_shard, shard_entries
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError

PARTITIONS = ("drop", "pad")


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


class StreamingShardDataset(torch.utils.data.IterableDataset):
    """Stream the items of shard folders, shuffled through a buffer, split among DDP ranks and
    DataLoader workers (see the module docstring for the exact rules).

    Parameters
    ----------
    folders : shard folders (one survey setting each)
    bands : band names to use, in this order (default: the first shard's)
    split, val_fraction, split_seed : as :class:`~sim2obs.data.dataset.ShardDataset`
    label_keys : labels to return (missing ones are NaN)
    shuffle_buffer : items in the shuffle buffer of each reader (0 or 1: no buffer)
    seed : seed of the shard order and of the buffers
    shuffle : False keeps file order (shards sorted by folder and name)
    rank, world_size : DDP position; default from ``torch.distributed`` when initialised
    partition : 'drop' (default) or 'pad', how blocks are made equal
    read_rows : rows read from a shard at a time
    bands_hint : what the error says to do when a shard lacks some of ``bands``
    """

    def __init__(self, folders, bands=None, split: str = "all", val_fraction: float = 0.1,
                 split_seed: int = 0, label_keys=(), shuffle_buffer: int = 1000, seed: int = 0,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 partition: str = "drop", read_rows: int = 256, bands_hint: str = BANDS_HINT):
        super().__init__()
        if isinstance(folders, str | Path):
            folders = [folders]
        if not folders:
            raise Sim2ObsValueError("no shard folders given")
        if split not in ("train", "val", "all"):
            raise Sim2ObsValueError(f"split must be 'train', 'val' or 'all', got '{split}'")
        if partition not in PARTITIONS:
            raise Sim2ObsValueError(f"partition must be one of {PARTITIONS}, got '{partition}'")
        if shuffle_buffer < 0 or read_rows < 1:
            raise Sim2ObsValueError("need shuffle_buffer >= 0 and read_rows >= 1")
        if (rank is None) != (world_size is None):
            raise Sim2ObsValueError("give both rank and world_size, or neither")
        if rank is None:
            rank, world_size = _dist_rank_world()
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise Sim2ObsValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.folders = [Path(f) for f in folders]
        self.split, self.val_fraction, self.split_seed = split, float(val_fraction), int(split_seed)
        self.label_keys = tuple(label_keys)
        self.shuffle_buffer, self.seed, self.shuffle = int(shuffle_buffer), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.partition, self.read_rows = partition, int(read_rows)
        self.epoch = 0
        self.bands: tuple[str, ...] = tuple(bands) if bands else ()
        first = None  # (path, bands) of the first shard when no bands are asked for
        self.files: list[str] = []
        self.surveys: list[str] = []
        self.pixel_scales: dict[str, float] = {}
        self.n_from_manifest = 0
        band_idx, counts = [], []
        stamp = None
        for folder in self.folders:
            entries, n_manifest = shard_entries(folder)
            self.n_from_manifest += n_manifest
            for path, entry in entries:
                if not self.bands:
                    self.bands, first = tuple(entry.bands), (str(path), tuple(entry.bands))
                check_shard_bands(path, entry.bands, self.bands, first, bands_hint)
                if stamp is None:
                    stamp = entry.stamp
                elif entry.stamp != stamp:
                    raise Sim2ObsDataError(
                        f"'{path}' has {entry.stamp[0]}x{entry.stamp[1]} stamps but '{self.files[0]}' "
                        f"has {stamp[0]}x{stamp[1]}; render all folders with the same --stamp"
                    )
                survey = entry.survey if entry.survey is not None else folder.name
                self.pixel_scales[survey] = entry.pixel_scale_arcsec
                self.files.append(str(path))
                self.surveys.append(survey)
                band_idx.append(np.array([entry.bands.index(b) for b in self.bands]))
                counts.append(int(self._select(entry.object_ids()).sum()))
        self._band_idx = band_idx
        self.counts = np.asarray(counts, dtype=np.int64)
        self.stamp = tuple(int(s) for s in stamp)
        if self.counts.sum() == 0:
            raise Sim2ObsDataError(f"the '{split}' split of {[str(f) for f in self.folders]} is empty")

    # ---------------------------------------------------------------------------------------
    # sizes
    # ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Samples in the split over all ranks (not what one rank yields: see
        :meth:`samples_per_reader`)."""
        return int(self.counts.sum())

    def samples_per_reader(self, num_workers: int = 0) -> int:
        """Samples each (rank, worker) reader yields per epoch."""
        n_readers = self.world_size * max(1, int(num_workers))
        n = len(self)
        return n // n_readers if self.partition == "drop" else -(-n // n_readers)

    def batches_per_epoch(self, batch_size: int, num_workers: int = 0) -> int:
        """Full batches of ``batch_size`` one rank's ``DataLoader(..., drop_last=True)`` gives
        per epoch (each worker batches its own samples)."""
        return max(1, int(num_workers)) * (self.samples_per_reader(num_workers) // int(batch_size))

    def set_epoch(self, epoch: int) -> None:
        """Epoch number: sets the shard order and the shuffle buffers' seeds."""
        self.epoch = int(epoch)

    # ---------------------------------------------------------------------------------------
    # reading
    # ---------------------------------------------------------------------------------------

    def _select(self, object_ids: np.ndarray) -> np.ndarray:
        if self.split == "all":
            return np.ones(len(object_ids), dtype=bool)
        val = split_of(object_ids, self.val_fraction, self.split_seed)
        return val if self.split == "val" else ~val

    def _selected_rows(self, f, si: int) -> np.ndarray:
        try:
            ids = f["labels/object_id"][()]
        except (KeyError, OSError) as exc:
            raise Sim2ObsDataError(f"'{self.files[si]}': cannot read /labels/object_id ({exc}); "
                                   f"{fix_hint(Path(self.files[si]).parent)}") from exc
        rows = np.flatnonzero(self._select(np.asarray(ids, dtype=np.int64)))
        if rows.size != self.counts[si]:
            raise Sim2ObsDataError(
                f"'{self.files[si]}' changed since the dataset was opened ({rows.size} selected "
                f"objects, {self.counts[si]} expected); rebuild the dataset (and run "
                f"`sim2obs manifest {Path(self.files[si]).parent}`)"
            )
        return rows

    def _read_rows(self, f, si: int, rows: np.ndarray) -> list[dict]:
        """Items for increasing ``rows`` of open shard ``si`` (one contiguous HDF5 read)."""
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        take = None if rows.size == r1 - r0 else rows - r0  # None: every row of the slab
        bi = self._band_idx[si]
        all_bands = bi.size == len(f.attrs["bands"]) and np.array_equal(bi, np.arange(bi.size))

        def read(name: str, bands: bool = False) -> np.ndarray:
            arr = f[name][r0:r1]
            if take is not None:
                arr = arr[take]
            return arr if not bands or all_bands else arr[:, bi]

        try:
            image = read("images", bands=True)
            ivar = read("ivar", bands=True) if "ivar" in f else None
            ids = read("labels/object_id")
            grp = f["labels"]
            labels = {k: (read(f"labels/{k}").astype(np.float64) if k in grp
                          else np.full(len(rows), np.nan)) for k in self.label_keys}
        except OSError as exc:
            raise Sim2ObsDataError(f"'{self.files[si]}': read error ({exc}); it is corrupt: "
                                   f"{fix_hint(Path(self.files[si]).parent)}") from exc
        bad = ~np.isfinite(image) if ivar is None else (~np.isfinite(image) & (ivar > 0))
        if np.any(bad):
            which = np.asarray(ids)[bad.reshape(len(ids), -1).any(axis=1)].tolist()
            raise Sim2ObsDataError(
                f"'{self.files[si]}' object(s) {which[:5]}{' ...' if len(which) > 5 else ''}: "
                f"{int(bad.sum())} non-finite (NaN or inf) pixels not masked by ivar = 0; "
                "re-ingest or mask them"
            )
        finite = np.isfinite(image)
        if not finite.all():
            image = np.where(finite, image, 0.0)
        image = image.astype(np.float32, copy=False)
        ivar = None if ivar is None else ivar.astype(np.float32, copy=False)
        survey = self.surveys[si]
        # copies: a view would keep the whole chunk alive while the item sits in the buffer
        return [{
            "image": image[k].copy(),
            "ivar": None if ivar is None else ivar[k].copy(),
            "object_id": int(ids[k]),
            "survey": survey,
            "labels": {key: float(v[k]) for key, v in labels.items()},
        } for k in range(len(rows))]

    def raw(self, i: int) -> dict:
        """Item ``i`` of the split in file order (random access for statistics such as
        :meth:`Normalizer.from_noise`; opens and closes the shard)."""
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        ends = np.cumsum(self.counts)
        si = int(np.searchsorted(ends, i, side="right"))
        local = i - int(ends[si] - self.counts[si])
        with open_shard(self.files[si]) as f:
            rows = self._selected_rows(f, si)
            return self._read_rows(f, si, rows[local:local + 1])[0]

    def shard_order(self, epoch: int | None = None) -> np.ndarray:
        """Indices into :attr:`files` in the order streamed in ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.files)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(n)

    def plan(self, reader: int, n_readers: int, epoch: int | None = None) -> list[tuple[int, int, int]]:
        """``[(shard index, first, stop), ...]``: the pieces of the epoch's global sequence that
        ``reader`` of ``n_readers`` streams, as ranges of each shard's selected samples."""
        order = self.shard_order(epoch)
        counts = self.counts[order]
        ends = np.cumsum(counts)
        starts = ends - counts
        n = int(ends[-1])
        per = n // n_readers if self.partition == "drop" else -(-n // n_readers)
        ranges = []  # positions reader*per ... (reader+1)*per - 1, modulo n ('pad' wraps around)
        pos, left = (reader * per) % n, per
        while left > 0:
            take = min(left, n - pos)
            ranges.append((pos, pos + take))
            pos, left = 0, left - take
        pieces = []
        for lo, hi in ranges:
            for k in np.flatnonzero((starts < hi) & (ends > lo)):
                first = max(lo, int(starts[k])) - int(starts[k])
                stop = min(hi, int(ends[k])) - int(starts[k])
                if stop > first:
                    pieces.append((int(order[k]), first, stop))
        return pieces

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.rank * n_workers + worker
        n_readers = self.world_size * n_workers
        rng = np.random.default_rng([self.seed, self.epoch, reader, 0xB0F])
        size = self.shuffle_buffer if self.shuffle else 0
        buffer: list[dict] = []
        for si, first, stop in self.plan(reader, n_readers):
            with open_shard(self.files[si]) as f:
                rows = self._selected_rows(f, si)[first:stop]
                for c in range(0, rows.size, self.read_rows):
                    for item in self._read_rows(f, si, rows[c:c + self.read_rows]):
                        if size <= 1:
                            yield item
                        elif len(buffer) < size:
                            buffer.append(item)
                        else:
                            j = int(rng.integers(size))
                            out, buffer[j] = buffer[j], item
                            yield out
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def close(self) -> None:
        """Nothing stays open between items (present for symmetry with ``ShardDataset``)."""


def collate_images(items: list[dict], survey_names: tuple[str, ...] | None = None) -> dict:
    """Stack items into ``{'image': (n,B,H,W), 'ivar': (n,B,H,W)}`` tensors (ivar estimated
    from each stamp's noise where a shard has none: :func:`~sim2obs.data.dataset.estimated_ivar`);
    with ``survey_names``, also ``'survey'`` (n,): each item's survey as an index into them."""
    from sim2obs.data.dataset import estimated_ivar

    image = torch.from_numpy(np.stack([it["image"] for it in items]))
    ivar = torch.from_numpy(np.stack([
        it["ivar"] if it["ivar"] is not None else estimated_ivar(it["image"]) for it in items]))
    batch = {"image": image, "ivar": ivar}
    if survey_names is not None:
        batch["survey"] = torch.tensor([survey_names.index(it["survey"]) for it in items], dtype=torch.int64)
    return batch


def collate_same_pairs(items: list[dict], survey_names: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """Pretraining batches from a stream: both views start from the same images (the two
    augmentations make them differ), as ``PairDataset`` does without a cross-survey partner."""
    batch = collate_images(items, survey_names)
    return batch, batch
