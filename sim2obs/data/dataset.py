"""Torch datasets over shard folders, and the per-band flux normalisation.

* :class:`ShardDataset` indexes one or more shard folders lazily: only ``/labels/object_id`` and
  shapes are read up front, from the folder's ``manifest.json`` when it is up to date (no shard
  opened; :mod:`sim2obs.data.manifest`), else from each shard; images are read per item through
  h5py handles per worker process (at most ``MAX_OPEN_FILES`` open; dropped when the dataset is
  pickled to a ``DataLoader`` worker), so it works with ``num_workers > 0``. For more shards
  than fit in memory, or without random access, see :mod:`sim2obs.data.streaming`.
* The train/validation split is a deterministic function of ``object_id`` (and a split seed):
  the same galaxy rendered by two surveys lands on the same side.
* Several folders may hold different surveys; they must share the band names used for training
  (``bands=``) and the stamp size, otherwise the error says which folder differs and what to pass.
* :class:`Normalizer`: arcsinh stretch per band, x' = asinh(x / s_b), with s_b = ``k`` times the
  median background noise sigma of band b over the training data (Lupton, Gunn & Szalay 1999,
  AJ 118, 1406, "asinh magnitudes"). It is stored in checkpoints so inference uses the same.
  With ``zero_masked`` it also sets masked pixels (``ivar = 0``: cosmic rays, bad columns,
  bright-star masks of real data) to 0 before the stretch (:meth:`Normalizer.mask`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from sim2obs.data.manifest import open_shard, shard_entries
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError

#: Default softening in units of the noise sigma: features near the noise level stay linear.
DEFAULT_ASINH_K = 3.0
#: Shard files a :class:`ShardDataset` keeps open at once (per process).
MAX_OPEN_FILES = 64


#: Gaussian sigma per median absolute deviation, 1 / Phi^-1(3/4) (Rousseeuw & Croux 1993,
#: JASA 88, 1273).
MAD_TO_SIGMA = 1.4826


def outer_frame(h: int, w: int) -> np.ndarray:
    """(h, w) boolean mask of a stamp's outer frame, width max(2, min(h, w) // 8) pixels: the sky
    around a central galaxy, where its noise is measured."""
    edge = max(2, min(h, w) // 8)
    frame = np.ones((h, w), dtype=bool)
    frame[edge:h - edge, edge:w - edge] = False
    return frame


def estimated_ivar(images: np.ndarray) -> np.ndarray:
    """Inverse variance for stamps that come without one: ``1 / sigma^2``, constant over each
    stamp and band, with ``sigma = 1.4826 MAD`` of the pixels in the stamp's outer frame (width
    H/8, at least 2 pixels: sky away from the central galaxy; a galaxy reaching the frame biases
    sigma high). Stamps with no measurable noise (sigma = 0: noiseless mocks) get ivar = 0, which
    the augmentations read as "no noise to re-realise".

    ``images`` (..., H, W) float -> float32 array of the same shape.
    """
    img = np.asarray(images, dtype=np.float32)
    pix = img[..., outer_frame(*img.shape[-2:])]  # (..., n_frame); readers refuse unmasked NaNs before this
    med = np.median(pix, axis=-1, keepdims=True)
    sigma = MAD_TO_SIGMA * np.median(np.abs(pix - med), axis=-1)  # a NaN frame gives nan -> ivar 0
    ivar = np.zeros(sigma.shape, dtype=np.float32)
    good = np.isfinite(sigma) & (sigma > 0)
    ivar[good] = 1.0 / sigma[good] ** 2
    return np.broadcast_to(ivar[..., None, None], img.shape).astype(np.float32)


def split_of(object_ids: np.ndarray, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask, True for validation: a SplitMix64 hash of (object_id, seed) (Steele et al.
    2014, OOPSLA) compared with ``val_fraction``; stable across runs, machines and surveys."""
    with np.errstate(over="ignore"):  # modular uint64 arithmetic is the point
        x = np.asarray(object_ids, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < val_fraction


#: elements per slice of the CPU arcsinh stretch (256 KiB of float32: its temporaries fit in L2)
_CHUNK_ELEMENTS = 65536


def _chunk_samples(y) -> int | None:
    """Samples per slice of the CPU stretch of a contiguous (N, ...) tensor -- about
    ``_CHUNK_ELEMENTS`` elements and a multiple of 64 -- or None to stretch it in one pass."""
    per = y[:1].numel()
    if y.device.type != "cpu" or y.ndim < 4 or per == 0 or y.shape[0] < 2 or not y.is_contiguous():
        return None
    align = 64 // math.gcd(per, 64)
    step = max(1, _CHUNK_ELEMENTS // per)
    step = -(-step // align) * align
    return step if step < y.shape[0] else None


def _asinh_elementwise(y):
    """``asinh(y)`` of a float32/float64 tensor from vectorised elementwise kernels, several
    times faster than ``torch.asinh`` on CPU (which evaluates it one element at a time).

    With a = |y| and r = a / (1 + sqrt(1 + a^2)) = 1 / (1/a + sqrt(1/a^2 + 1)):

        asinh(a) = log(a + sqrt(1 + a^2)) = log1p(a + a r),   asinh(y) = sign(y) asinh(|y|),

    where log1p keeps full relative precision near 0 (most background pixels) and the 1/a form
    neither overflows for large a nor divides 0 by 0 (a = 0 gives r = 0, a = inf gives r = 1).
    Within 1.5 ulp of the exact value for float32 (measured; the test asserts 2; torch.asinh:
    1.6); inf and nan map as torch.asinh, only |y| > 1.7e38 (float32 max / 2) saturates to inf.
    """
    import torch

    a = y.abs()
    r = a.reciprocal()
    r = r.add_(torch.hypot(r, torch.ones((), dtype=r.dtype, device=r.device))).reciprocal_()
    return torch.addcmul(a, a, r).log1p_().copysign_(y)


@cache
def numpy_asinh_vectorised(dtype_name: str) -> bool:
    """Whether numpy evaluates ``arcsinh`` for ``dtype_name`` ('float32' or 'float64') with a
    SIMD kernel on this machine: Linux (numpy links Intel's SVML only there) and a dispatch
    target other than the baseline in numpy >= 2.0's ``numpy.lib.introspect.opt_func_info``
    (x86-64 with AVX-512: within 1 ulp and ~3x faster on one thread than
    :func:`_asinh_elementwise`; measured 3 vs 10 ms for 2.6 M float32). Elsewhere numpy calls
    the C library once per element, slower than torch's vectorised kernels. Fixed per machine
    and numpy build, so a run's bytes cannot change between calls."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        from numpy.lib.introspect import opt_func_info
    except ImportError:  # numpy < 2.0: no dispatch information
        return False
    sig = {"float32": "ff", "float64": "dd"}.get(dtype_name)
    if sig is None:
        return False
    try:
        info = opt_func_info(func_name="^arcsinh$").get("arcsinh", {}).get(sig, {})
    except Exception:  # noqa: BLE001 - an introspection API changing shape must not break the stretch
        return False
    current = str(info.get("current", "baseline"))
    return bool(current) and not current.startswith("baseline")


def _numpy_view(y):
    """``y``'s memory as a writable numpy array, or None where numpy must not touch it: a tensor
    subclass (export's fake tensors), under ``torch.jit.trace`` (the result would be baked into
    the trace as a constant) or ``torch.compile``, or one without plain storage (``vmap``)."""
    import torch

    if type(y) is not torch.Tensor or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    try:
        return y.numpy()
    except (RuntimeError, TypeError):
        return None


def asinh_cpu_(y):
    """``asinh`` of a float32/float64 CPU tensor (no autograd) **in place**, by the fastest exact
    path this machine has: numpy's SIMD ``arcsinh`` (:func:`numpy_asinh_vectorised`) on the
    tensor's memory, else :func:`_asinh_elementwise` in cache-sized slices. Both are within
    2 ulp of the exact value (tested) and give each element a value that does not depend on its
    position, the slicing or the number of threads. Returns ``y``."""
    a = _numpy_view(y)  # first: under torch.compile nothing of numpy is looked at
    if a is not None and numpy_asinh_vectorised(str(y.dtype).removeprefix("torch.")):
        np.arcsinh(a, out=a)
        return y
    step = _chunk_samples(y)
    if step is None:
        y.copy_(_asinh_elementwise(y))
        return y
    # in slices of samples whose temporaries stay in cache (~15 % faster for a batch of 64x64
    # stamps, up to 3x after large allocations); every slice holds a multiple of 64 elements,
    # so the vectorised kernels see the same element boundaries as in one pass on one thread
    for i in range(0, y.shape[0], step):
        y[i:i + step] = _asinh_elementwise(y[i:i + step])
    return y


@dataclass(frozen=True)
class Normalizer:
    """Per-band arcsinh stretch ``asinh(x / scale_b)``; ``scale_nmgy`` in nanomaggies.

    ``zero_masked``: the encoder was trained with masked pixels set to 0 (see :meth:`mask`);
    whoever feeds it images applies ``mask(images, ivar)`` first, as ``compute_embeddings``,
    the adaptation loop and ``sim2obs infer`` do.
    """

    bands: tuple[str, ...]
    scale_nmgy: tuple[float, ...]
    zero_masked: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(self.bands))
        object.__setattr__(self, "scale_nmgy", tuple(float(s) for s in self.scale_nmgy))
        object.__setattr__(self, "zero_masked", bool(self.zero_masked))
        if len(self.bands) != len(self.scale_nmgy):
            raise Sim2ObsValueError("Normalizer: one scale per band is needed")
        if not all(s > 0 and math.isfinite(s) for s in self.scale_nmgy):
            raise Sim2ObsValueError(f"Normalizer scales must be positive and finite, got {self.scale_nmgy}")

    def __call__(self, images):
        """(N, B, H, W) or (B, H, W) numpy array or torch tensor -> same type, stretched."""
        try:
            import torch

            if isinstance(images, torch.Tensor):
                s = torch.as_tensor(self.scale_nmgy, dtype=images.dtype, device=images.device)
                y = images / s.view(-1, 1, 1)
                if y.dtype in (torch.float32, torch.float64) and not y.requires_grad:
                    if y.device.type == "cpu":
                        return asinh_cpu_(y)  # y is a new tensor: stretched in place
                    return _asinh_elementwise(y)  # on an accelerator: a few fused elementwise kernels
                return torch.asinh(y)
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        s = np.asarray(self.scale_nmgy, dtype=np.float32).reshape(-1, 1, 1)
        return np.arcsinh(np.asarray(images, dtype=np.float32) / s)

    def mask(self, images, ivar):
        """``images`` with masked pixels set to 0 (the sky level of background-subtracted data)
        when ``zero_masked``; otherwise, or with ``ivar`` None (no inverse variance: nothing is
        known to be masked), ``images`` itself.

        A pixel is masked where ``ivar`` is 0 (or not positive) in a stamp band that has pixels
        with ``ivar > 0``; a band with no positive ivar at all (a noiseless mock, or an
        estimated noise of 0) is left as it is. numpy arrays or torch tensors, ``images`` and
        ``ivar`` of the same shape (..., B, H, W); returns the type of ``images``.
        """
        if not self.zero_masked or ivar is None:
            return images
        import torch

        if isinstance(images, torch.Tensor):
            ivar = torch.as_tensor(ivar, device=images.device)
            has_data = (ivar > 0).flatten(-2).any(-1)[..., None, None]
            return images.masked_fill(~(ivar > 0) & has_data, 0.0)
        ivar = np.asarray(ivar)
        has_data = (ivar > 0).reshape(*ivar.shape[:-2], -1).any(-1)[..., None, None]
        return np.where(~(ivar > 0) & has_data, np.zeros((), dtype=np.asarray(images).dtype), images)

    def to_dict(self) -> dict:
        d = {"bands": list(self.bands), "scale_nmgy": list(self.scale_nmgy)}
        if self.zero_masked:  # absent (False) in runs from before the option, and in those without it
            d["zero_masked"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(tuple(d["bands"]), tuple(d["scale_nmgy"]), bool(d.get("zero_masked", False)))

    @classmethod
    def from_noise(cls, dataset: ShardDataset, k: float = DEFAULT_ASINH_K, max_items: int = 512) -> Normalizer:
        """Scale = k x median over items of the median background sigma (1/sqrt(ivar)) per band;
        without ivar, a robust MAD estimate of the pixel noise in the stamp border."""
        n = len(dataset)
        idx = np.linspace(0, n - 1, min(n, max_items)).astype(int)
        sig = []
        for i in idx:
            item = dataset.raw(i)
            ivar = item.get("ivar")
            if ivar is not None:
                with np.errstate(divide="ignore"):
                    s = np.where(ivar > 0, 1.0 / np.sqrt(ivar), np.nan)
                sig.append(np.nanmedian(s.reshape(s.shape[0], -1), axis=1))
            else:
                img = item["image"]
                border = np.concatenate([img[:, :4].reshape(img.shape[0], -1),
                                         img[:, -4:].reshape(img.shape[0], -1)], axis=1)
                med = np.median(border, axis=1, keepdims=True)
                sig.append(MAD_TO_SIGMA * np.median(np.abs(border - med), axis=1))
        sigma = np.nanmedian(np.array(sig), axis=0)
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise Sim2ObsDataError(
                f"cannot estimate the noise level of bands {dataset.bands} (got {sigma}); are the "
                "images empty or fully masked?"
            )
        return cls(dataset.bands, tuple(float(k * s) for s in sigma))


BANDS_HINT = "pass --bands with names every folder has"
ENCODER_BANDS_HINT = ("the encoder was trained on these bands: use shards that have them, or "
                      "pretrain one on bands every folder has (sim2obs pretrain --bands)")


def check_shard_bands(path, shard_bands, bands, first: tuple[str, tuple[str, ...]] | None,
                      hint: str = BANDS_HINT) -> None:
    """Raise :class:`Sim2ObsDataError` unless shard ``path`` (with ``shard_bands``) can give
    ``bands``. ``first``: ``(path, bands)`` of the first shard when the bands were taken from it
    (none asked for): then every shard must have the same band list, in any order -- a folder of
    another survey with more bands is an error rather than silently cut to the first one's.
    ``hint`` ends the message (what to do)."""
    shard_bands = tuple(shard_bands)
    missing = [b for b in bands if b not in shard_bands]
    if first is not None and (missing or len(shard_bands) != len(bands)):
        common = [b for b in first[1] if b in shard_bands]
        raise Sim2ObsDataError(
            f"'{path}' has bands {list(shard_bands)} but '{first[0]}' has {list(first[1])}: folders "
            f"with different band lists need --bands naming the bands to use (both have {common})"
        )
    if missing:
        raise Sim2ObsDataError(
            f"'{path}' has bands {list(shard_bands)}, without {missing} of the bands "
            f"{list(bands)}; {hint}"
        )


def mapped_dataset(path, dataset) -> np.ndarray | None:
    """A read-only numpy memory map of the HDF5 ``dataset`` of file ``path`` where HDF5 stores
    it as one contiguous, unfiltered block of floats (how :func:`~sim2obs.data.shards.write_shard`
    writes images and ivar): numpy then reads scattered rows ~3x faster than h5py's selections,
    with the same bytes. None for chunked, compressed, external, virtual or empty datasets, which
    only h5py can read."""
    try:
        offset = dataset.id.get_offset()
        plain = (dataset.chunks is None and dataset.compression is None and not dataset.external
                 and not dataset.is_virtual and dataset.dtype.kind == "f" and dataset.size > 0)
    except (AttributeError, TypeError, ValueError, OSError):  # an h5py without these: stay on h5py
        return None
    if offset is None or not plain:
        return None
    return np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)


def _put(out: np.ndarray, where: np.ndarray, values: np.ndarray, inverse: np.ndarray) -> None:
    """``out[where] = values[inverse]``, in one copy when ``where`` is all of ``out``."""
    if where.size == out.shape[0] and values.dtype == out.dtype:
        np.take(values, inverse.reshape(-1), axis=0, out=out)
    else:
        out[where] = values[inverse]


class ShardDataset:
    """Items from shard folders: ``{'image': (B,H,W) float32, 'ivar', 'object_id', 'survey',
    'labels': {name: float}}`` (raw nanomaggies; normalise with :class:`Normalizer`).

    Parameters
    ----------
    folders : shard folders (one survey setting each)
    bands : band names to use, in this order; default: the first folder's bands, and every
        folder must then have the same band list (in any order)
    split : 'train', 'val' or 'all'
    val_fraction, split_seed : deterministic split by object_id
    label_keys : labels to return (missing ones are NaN)
    bands_hint : what the error says to do when a shard lacks some of ``bands``
    """

    def __init__(self, folders, bands=None, split: str = "all", val_fraction: float = 0.1,
                 split_seed: int = 0, label_keys=(), bands_hint: str = BANDS_HINT):
        if isinstance(folders, str | Path):
            folders = [folders]
        if not folders:
            raise Sim2ObsValueError("no shard folders given")
        if split not in ("train", "val", "all"):
            raise Sim2ObsValueError(f"split must be 'train', 'val' or 'all', got '{split}'")
        self.folders = [Path(f) for f in folders]
        self.label_keys = tuple(label_keys)
        self.files: list[str] = []
        self.surveys: list[str] = []
        band_idx: list[np.ndarray] = []
        rows_file, rows_row, ids = [], [], []
        stamp = None
        self.bands: tuple[str, ...] = tuple(bands) if bands else ()
        first = None  # (path, bands) of the first shard when no bands are asked for
        self.pixel_scales: dict[str, float] = {}
        self.n_from_manifest = 0  # shards described by an up-to-date manifest (not opened)
        for folder in self.folders:
            entries, n_manifest = shard_entries(folder)
            self.n_from_manifest += n_manifest
            for path, entry in entries:
                fb = entry.bands
                shape = (entry.n_objects, len(fb), *entry.stamp)
                oid = entry.object_ids()
                survey = entry.survey if entry.survey is not None else folder.name
                self.pixel_scales[survey] = entry.pixel_scale_arcsec
                if not self.bands:
                    self.bands, first = tuple(fb), (str(path), tuple(fb))
                check_shard_bands(path, fb, self.bands, first, bands_hint)
                if stamp is None:
                    stamp = shape[2:]
                elif tuple(shape[2:]) != tuple(stamp):
                    raise Sim2ObsDataError(
                        f"'{path}' has {shape[2]}x{shape[3]} stamps but '{self.files[0]}' has "
                        f"{stamp[0]}x{stamp[1]}; render all folders with the same --stamp"
                    )
                fi = len(self.files)
                self.files.append(str(path))
                self.surveys.append(survey)
                # all bands in order: a slice (reads need no band-gather copy)
                band_idx.append(slice(None) if tuple(fb) == tuple(self.bands)
                                else np.array([fb.index(b) for b in self.bands]))
                rows_file.append(np.full(len(oid), fi))
                rows_row.append(np.arange(len(oid)))
                ids.append(oid)
        self._band_idx: list[np.ndarray | slice] = band_idx
        file_of = np.concatenate(rows_file)
        row_of = np.concatenate(rows_row)
        object_id = np.concatenate(ids).astype(np.int64)
        if split != "all":
            val = split_of(object_id, val_fraction, split_seed)
            keep = val if split == "val" else ~val
            file_of, row_of, object_id = file_of[keep], row_of[keep], object_id[keep]
        if object_id.size == 0:
            raise Sim2ObsDataError(f"the '{split}' split of {[str(f) for f in self.folders]} is empty")
        self.file_of, self.row_of, self.object_id = file_of, row_of, object_id
        self.stamp = tuple(int(s) for s in stamp)
        self._handles: dict[int, object] = {}
        self._arrays: dict[int, dict[str, object]] = {}  # per open file: images/ivar readers

    def __len__(self) -> int:
        return int(self.object_id.size)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # each worker opens its own
        state["_arrays"] = {}
        return state

    def _file(self, fi: int):
        """The open h5py file ``fi`` (at most ``MAX_OPEN_FILES`` kept open, least recently used
        closed first: random access over 10^4 shards stays within file-descriptor limits)."""
        h = self._handles.pop(fi, None)
        if h is None:
            while len(self._handles) >= MAX_OPEN_FILES:
                old = next(iter(self._handles))
                self._arrays.pop(old, None)
                self._handles.pop(old).close()
            h = open_shard(self.files[fi])
        self._handles[fi] = h  # (re)inserted last: dict order is the recency order
        return h

    def _array(self, fi: int, key: str):
        """Dataset ``key`` ('images' or 'ivar') of file ``fi``, None where the shard has none: a
        memory map (:func:`mapped_dataset`) where possible, else the h5py dataset."""
        f = self._file(fi)
        cache = self._arrays.setdefault(fi, {})
        if key not in cache:
            ds = f.get(key)
            mapped = None if ds is None else mapped_dataset(self.files[fi], ds)
            cache[key] = ds if mapped is None else mapped
        return cache[key]

    def raw(self, i: int) -> dict:
        """Item ``i`` as numpy arrays."""
        fi, row = int(self.file_of[i]), int(self.row_of[i])
        f = self._file(fi)
        bi = self._band_idx[fi]
        image = np.asarray(self._array(fi, "images")[row][bi])
        ivar_data = self._array(fi, "ivar")
        ivar = None if ivar_data is None else np.asarray(ivar_data[row][bi])
        if ivar is None:
            bad = ~np.isfinite(image)
        else:
            bad = ~np.isfinite(image) & (ivar > 0)
        if np.any(bad):
            raise Sim2ObsDataError(
                f"'{self.files[fi]}' object {int(self.object_id[i])}: {int(bad.sum())} non-finite (NaN or inf) pixels "
                "not masked by ivar = 0; re-ingest or mask them"
            )
        image = np.where(np.isfinite(image), image, 0.0).astype(np.float32)
        labels = {}
        for key in self.label_keys:
            ds = f["labels"].get(key)
            labels[key] = float(ds[row]) if ds is not None else float("nan")
        return {
            "image": image,
            "ivar": None if ivar is None else ivar.astype(np.float32),
            "object_id": int(self.object_id[i]),
            "survey": self.surveys[fi],
            "labels": labels,
        }

    def __getitem__(self, i: int) -> dict:
        return self.raw(i)

    def raw_many(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Images and ivar (n, B, H, W) float32 of many items with one h5py read per shard file
        (sorted, de-duplicated rows), in the order asked; where a shard has no ``/ivar``, the
        noise is estimated from each stamp (:func:`estimated_ivar`).
        NaN pixels must be masked (ivar = 0) and are zeroed, as in :meth:`raw`."""
        idx = np.asarray(indices, dtype=np.int64)
        shape = (idx.size, len(self.bands), *self.stamp)
        images = np.empty(shape, dtype=np.float32)
        ivars = np.empty(shape, dtype=np.float32)
        files = self.file_of[idx]
        for fi in np.unique(files):
            where = np.flatnonzero(files == fi)
            rows = self.row_of[idx[where]]
            uniq, inverse = np.unique(rows, return_inverse=True)
            f = self._file(int(fi))
            bi = self._band_idx[fi]
            img = np.asarray(self._array(int(fi), "images")[uniq][:, bi])
            ivar_data = self._array(int(fi), "ivar")
            iv = None if ivar_data is None else np.asarray(ivar_data[uniq][:, bi])
            finite = np.isfinite(img)
            if not finite.all():
                bad = ~finite if iv is None else (~finite & (iv > 0))
                if np.any(bad):
                    rows_bad = uniq[bad.reshape(len(uniq), -1).any(axis=1)]
                    ids = f["labels/object_id"][rows_bad.tolist()].tolist()
                    raise Sim2ObsDataError(
                        f"'{self.files[fi]}' object(s) {ids[:5]}{' ...' if len(ids) > 5 else ''}: "
                        f"{int(bad.sum())} non-finite (NaN or inf) pixels not masked by ivar = 0; "
                        "re-ingest or mask them"
                    )
                img = np.where(finite, img, np.float32(0.0))
            _put(images, where, img, inverse)
            _put(ivars, where, estimated_ivar(img) if iv is None else iv, inverse)
        return images, ivars

    def close(self) -> None:
        self._arrays = {}
        for h in self._handles.values():
            h.close()
        self._handles = {}
