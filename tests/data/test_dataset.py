"""ShardDataset and Normalizer: lazy multi-folder indexing, deterministic split, errors."""

import pickle

import numpy as np
import pytest
import torch

from sim2obs.data.dataset import ENCODER_BANDS_HINT, Normalizer, ShardDataset, split_of
from sim2obs.errors import Sim2ObsDataError, Sim2ObsValueError


def test_items_and_band_selection(synthetic_folders):
    ds = ShardDataset(synthetic_folders[1], bands=("i", "g"), label_keys=("log_mstar", "nope"))
    item = ds[3]
    assert item["image"].shape == (2, 32, 32) and item["image"].dtype == np.float32
    assert item["survey"] == "lsst"
    assert np.isfinite(item["labels"]["log_mstar"]) and np.isnan(item["labels"]["nope"])
    full = ShardDataset(synthetic_folders[1])
    np.testing.assert_array_equal(item["image"][0], full[3]["image"][2])  # 'i' is band 2


def test_split_is_deterministic_disjoint_and_survey_independent(synthetic_folders):
    a_train = ShardDataset(synthetic_folders[0], split="train", val_fraction=0.25)
    a_val = ShardDataset(synthetic_folders[0], split="val", val_fraction=0.25)
    b_val = ShardDataset(synthetic_folders[1], split="val", val_fraction=0.25)
    assert len(a_train) + len(a_val) == 96
    assert not set(a_train.object_id) & set(a_val.object_id)
    assert set(a_val.object_id) == set(b_val.object_id)  # same galaxies held out in both surveys
    assert 10 < len(a_val) < 40
    ids = np.arange(10000)
    np.testing.assert_array_equal(split_of(ids, 0.1, 3), split_of(ids, 0.1, 3))
    assert abs(split_of(ids, 0.1, 3).mean() - 0.1) < 0.02


def test_works_in_dataloader_workers(synthetic_folders):
    ds = ShardDataset(synthetic_folders[0])
    ds.raw(0)  # open a handle in the parent: must not be shipped to workers
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {}
    loader = torch.utils.data.DataLoader(
        ds, batch_size=8, num_workers=2,
        collate_fn=lambda items: torch.stack([torch.from_numpy(i["image"]) for i in items]))
    n = sum(batch.shape[0] for batch in loader)
    assert n == len(ds)


def test_mixed_stamp_sizes_refused(synthetic_folders, make_shards, tmp_path):
    other = make_shards(tmp_path / "big", n=8, survey="hsc", stamp=48)
    with pytest.raises(Sim2ObsDataError, match="same --stamp"):
        ShardDataset([synthetic_folders[0], other])


def test_normalizer_from_noise(synthetic_folders):
    ds = ShardDataset(synthetic_folders[0])
    norm = Normalizer.from_noise(ds, k=3.0)
    np.testing.assert_allclose(norm.scale_nmgy, 3 * 0.05, rtol=1e-5)
    x = np.full((3, 4, 4), 0.15, np.float32)
    np.testing.assert_allclose(norm(x), np.arcsinh(1.0), rtol=1e-6)
    t = norm(torch.from_numpy(x)[None])
    assert t.shape == (1, 3, 4, 4)
    assert Normalizer.from_dict(norm.to_dict()) == norm
    with pytest.raises(Sim2ObsValueError):
        Normalizer(("g",), (0.0,))


@pytest.fixture(params=["numpy-simd", "torch-elementwise"])
def asinh_path(request, monkeypatch):
    """Both CPU arcsinh paths of the Normalizer, whichever this machine picks by itself."""
    from sim2obs.data import dataset

    monkeypatch.setattr(dataset, "numpy_asinh_vectorised", lambda dtype_name: request.param == "numpy-simd")
    return request.param


def test_fast_arcsinh_is_within_two_ulp_of_float64(asinh_path):
    """The Normalizer's CPU arcsinh (numpy's SIMD kernel or torch's vectorised elementwise
    kernels): within 2 float32 ulp of the exact value over 0 and subnormals, the noise range,
    bright cores and overflow; inf, -inf and nan map as torch.asinh does; the sign is kept
    (asinh is odd)."""
    from sim2obs.data.dataset import asinh_cpu_

    mags = torch.cat([torch.tensor([0.0, 1e-45, 1e-38, 1e-20, 1e-8, 1.0, 3e19, 1e30, 1.7e38]),
                      torch.logspace(-30, 38, 20001, dtype=torch.float64).float(),
                      torch.linspace(0, 20, 20001)])
    x = torch.cat([mags, -mags])
    got = asinh_cpu_(x.clone())
    exact = torch.asinh(x.double())
    ulp = (torch.nextafter(exact.float().abs(), torch.tensor(float("inf"))) - exact.float().abs()).double()
    err = ((got.double() - exact).abs() / ulp.clamp(min=2.0**-149))
    assert err.max().item() <= 2.0, x[err.argmax()].item()
    assert torch.equal(torch.signbit(got), torch.signbit(x))
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    torch.testing.assert_close(asinh_cpu_(special.clone()), torch.asinh(special), equal_nan=True)
    x64 = torch.linspace(-1e3, 1e3, 4001, dtype=torch.float64)
    torch.testing.assert_close(asinh_cpu_(x64.clone()), torch.asinh(x64), rtol=1e-15, atol=0)


def test_numpy_simd_path_is_a_fixed_choice_per_dtype():
    """The path is decided once per dtype from numpy's dispatch table (the same answer on every
    call, so a run's bytes cannot change mid-run); only float32/float64 are candidates."""
    from sim2obs.data.dataset import numpy_asinh_vectorised

    for name in ("float32", "float64"):
        assert numpy_asinh_vectorised(name) is numpy_asinh_vectorised(name)
        assert isinstance(numpy_asinh_vectorised(name), bool)
    assert numpy_asinh_vectorised("float16") is False


def test_numpy_simd_path_reads_numpys_dispatch_table(monkeypatch):
    """The decision itself, on faked dispatch tables: SIMD only where numpy dispatches arcsinh of
    that dtype to a non-baseline target, on Linux (numpy links SVML only there); a missing entry,
    an introspection error or another platform mean torch's kernels."""
    pytest.importorskip("numpy.lib.introspect")
    import numpy.lib.introspect as introspect

    from sim2obs.data.dataset import numpy_asinh_vectorised

    decide = numpy_asinh_vectorised.__wrapped__  # without the per-process cache
    tables = {
        "simd": {"arcsinh": {"ff": {"current": "X86_V4", "available": "X86_V4 baseline(X86_V2)"},
                             "dd": {"current": "baseline(X86_V2)", "available": "baseline(X86_V2)"}}},
        "empty": {},
    }
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setattr(introspect, "opt_func_info", lambda func_name=None, signature=None: tables["simd"])
    assert decide("float32") is True and decide("float64") is False and decide("float16") is False
    monkeypatch.setattr(introspect, "opt_func_info", lambda func_name=None, signature=None: tables["empty"])
    assert decide("float32") is False

    def broken(func_name=None, signature=None):
        raise ValueError("a future numpy changed the API")

    monkeypatch.setattr(introspect, "opt_func_info", broken)
    assert decide("float32") is False
    monkeypatch.setattr(introspect, "opt_func_info", lambda func_name=None, signature=None: tables["simd"])
    for platform in ("darwin", "win32"):
        monkeypatch.setattr("sys.platform", platform)
        assert decide("float32") is False


def test_stretch_under_trace_export_compile_and_vmap():
    """Where numpy must not run -- a traced graph would keep its output as a constant, export
    and compile see fake tensors, vmap tensors have no plain storage -- the stretch takes torch's
    kernels and gives the eager values."""
    import warnings

    norm = Normalizer(("g", "r"), (1.0, 2.0))

    class Stretch(torch.nn.Module):
        def forward(self, t):
            return norm(t) * 2

    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    x2 = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    eager = Stretch()(x2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Stretch(), x)
    torch.testing.assert_close(traced(x2), eager)  # not x's values baked in
    torch.testing.assert_close(torch.export.export(Stretch(), (x,)).module()(x2), eager)
    torch.testing.assert_close(torch.func.vmap(norm)(x2), eager / 2)
    compiled = torch.compile(Stretch(), backend="eager", fullgraph=True)  # no graph break either
    torch.testing.assert_close(compiled(x2), eager)
    with torch.inference_mode():
        torch.testing.assert_close(norm(x2), eager / 2)


@pytest.mark.parametrize("shape", [(37, 5, 64, 64), (300, 3, 15, 15), (1, 5, 64, 64), (0, 3, 8, 8), (5, 8, 8)])
def test_normalizer_in_slices_gives_the_one_pass_values(shape, asinh_path):
    """The CPU stretch gives the values of one pass over the whole batch on one thread --
    whether numpy's kernel runs over the batch in place or torch's kernels run in slices of
    samples (a multiple of 64 elements each) -- for batches that are not a multiple of the
    slice, odd stamp sizes, one sample, an empty batch, 3-D input and channels_last input, on
    one or two threads; the input is untouched."""
    from sim2obs.data.dataset import _asinh_elementwise

    bands = tuple("abcde"[: shape[-3]])
    norm = Normalizer(bands, tuple(0.1 * (i + 1) for i in range(len(bands))))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    keep = x.clone()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = x / torch.tensor(norm.scale_nmgy).view(-1, 1, 1)
        ref = (torch.from_numpy(np.arcsinh(y.numpy())) if asinh_path == "numpy-simd"
               else _asinh_elementwise(y))
        got = norm(x)
    finally:
        torch.set_num_threads(threads)
    assert got.shape == x.shape and torch.equal(got, ref) and torch.equal(x, keep)
    torch.set_num_threads(2)
    try:
        assert torch.equal(norm(x), ref)
    finally:
        torch.set_num_threads(threads)
    if len(shape) == 4 and shape[0] > 0:
        cl = norm(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=0, atol=0)


def test_normalizer_mask_zeroes_masked_pixels_only():
    """zero_masked: pixels with ivar = 0 in a band that has data become 0; a band with no data
    (ivar 0 everywhere: noiseless mock), no ivar, or zero_masked False leave images as they are."""
    img = np.full((2, 3, 4, 4), 0.3, np.float32)
    ivar = np.full_like(img, 400.0)
    ivar[0, 1, 2, 2] = 0.0  # a cosmic ray ...
    img[0, 1, 2, 2] = 1e3
    ivar[1, 2] = 0.0  # ... and a band without data
    norm = Normalizer(("g", "r", "i"), (0.15, 0.15, 0.15), zero_masked=True)
    expect = img.copy()
    expect[0, 1, 2, 2] = 0.0
    out = norm.mask(img, ivar)
    np.testing.assert_array_equal(out, expect)
    assert out.dtype == np.float32
    t = norm.mask(torch.from_numpy(img), torch.from_numpy(ivar))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), expect)
    np.testing.assert_array_equal(norm.mask(torch.from_numpy(img), ivar).numpy(), expect)  # numpy ivar
    np.testing.assert_array_equal(norm.mask(img[0], ivar[0]), expect[0])  # one (B, H, W) stamp
    assert norm.mask(img, None) is img
    plain = Normalizer(("g", "r", "i"), (0.15, 0.15, 0.15))
    assert plain.mask(img, ivar) is img
    assert Normalizer.from_dict(norm.to_dict()) == norm
    assert "zero_masked" not in plain.to_dict()  # dicts of runs without the option are as before


def test_errors(synthetic_folders, tmp_path):
    with pytest.raises(Sim2ObsDataError, match=r"without \['z'\] of the bands \['z'\]; pass --bands"):
        ShardDataset([synthetic_folders[0], synthetic_folders[1]], bands=("z",))
    with pytest.raises(Sim2ObsDataError, match="different band lists need --bands"):
        ShardDataset(list(synthetic_folders))  # (g, r, i) then (g, r, i, z): u not silently dropped
    with pytest.raises(Sim2ObsDataError, match="different band lists need --bands"):
        ShardDataset(list(synthetic_folders[::-1]))
    with pytest.raises(Sim2ObsDataError, match="encoder was trained on these bands"):
        ShardDataset(synthetic_folders[0], bands=("g", "z"), bands_hint=ENCODER_BANDS_HINT)
    both = ShardDataset(list(synthetic_folders), bands=("i", "g", "r"))  # a common subset, any order
    assert both.bands == ("i", "g", "r") and set(both.surveys) == {"hsc", "lsst"}
    with pytest.raises(Sim2ObsValueError, match="split"):
        ShardDataset(synthetic_folders[0], split="test")
    with pytest.raises(FileNotFoundError):
        ShardDataset(tmp_path / "nothing")


def test_nan_pixels(make_shards, tmp_path):
    """A NaN pixel with ivar > 0 is refused (file and object named, by raw and raw_many); one
    masked with ivar = 0 reads as 0 flux."""
    import h5py

    folder = make_shards(tmp_path / "nan", n=8, survey="hsc", stamp=16, shard_size=8)
    path = sorted(folder.glob("*.h5"))[0]
    with h5py.File(path, "r+") as f:
        f["images"][2, 0, 5, 5] = np.nan  # unmasked
        f["images"][3, 1, 4, 4] = np.nan
        f["ivar"][3, 1, 4, 4] = 0.0  # masked
        ids = f["labels/object_id"][()]
    ds = ShardDataset([folder])
    row = {int(v): i for i, v in enumerate(ds.object_id)}
    bad, masked = row[int(ids[2])], row[int(ids[3])]
    for read in (lambda: ds.raw(bad), lambda: ds.raw_many([masked, bad])):
        with pytest.raises(Sim2ObsDataError, match=f"{path.name}.*{int(ids[2])}.*NaN"):
            read()
    item = ds.raw(masked)
    assert item["image"][1, 4, 4] == 0.0 and np.isfinite(item["image"]).all()
    images, ivar = ds.raw_many([masked])
    assert images[0, 1, 4, 4] == 0.0 and ivar[0, 1, 4, 4] == 0.0
    # an inf pixel is named for what it is; streaming names the objects too
    from sim2obs.data.streaming import StreamingShardDataset

    ds.close()
    with h5py.File(path, "r+") as f:
        f["images"][2, 0, 5, 5] = np.inf
    with pytest.raises(Sim2ObsDataError, match=r"non-finite \(NaN or inf\)"):
        ShardDataset([folder]).raw(bad)
    with pytest.raises(Sim2ObsDataError, match=rf"{path.name}' object\(s\) \[{int(ids[2])}\].*NaN or inf"):
        list(StreamingShardDataset([folder], shuffle_buffer=0))


def test_error_in_a_dataloader_worker_reads_as_the_error(make_shards, tmp_path):
    """A data error raised in a DataLoader worker reaches the command line as the error itself and
    where it happened, not as torch's wrapped worker traceback."""
    import h5py

    from sim2obs.cli import _worker_message

    folder = make_shards(tmp_path / "nan", n=8, survey="hsc", stamp=16, shard_size=8)
    path = sorted(folder.glob("*.h5"))[0]
    with h5py.File(path, "r+") as f:
        f["images"][2, 0, 5, 5] = np.nan
    loader = torch.utils.data.DataLoader(ShardDataset([folder]), batch_size=8, num_workers=1,
                                         collate_fn=lambda items: items)
    with pytest.raises(Sim2ObsDataError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what torch hands back
    message = _worker_message(str(info.value))
    assert message.startswith(f"'{path}' object ") and "Traceback" not in message
    assert message.endswith("(in DataLoader worker process 0)")


def test_missing_ivar_is_estimated_from_the_stamp(make_shards, tmp_path):
    """Shards without /ivar (real data may lack it): the noise comes from each stamp's outer
    frame, so re-realising noise scales it by the asked factor (not ~1 nmgy per pixel)."""
    import h5py

    from sim2obs.data.dataset import estimated_ivar
    from sim2obs.pretrain.augment import NoiseResample

    noise = 0.05  # the synthetic shards' pixel sigma (nmgy)
    folder = make_shards(tmp_path / "noivar", n=32, survey="hsc", stamp=48, shard_size=32, noise=noise)
    for path in folder.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            del f["ivar"]
    ds = ShardDataset([folder])
    images, ivar = ds.raw_many(np.arange(len(ds)))
    assert ds.raw(0)["ivar"] is None
    sigma = 1.0 / np.sqrt(ivar[:, :, 0, 0])
    assert np.all(ivar == ivar[:, :, :1, :1])  # constant over each stamp and band
    assert abs(np.median(sigma) / noise - 1) < 0.05 and np.all(np.abs(sigma / noise - 1) < 0.35)
    out = NoiseResample(factor_range=(2.0, 2.0))(torch.from_numpy(images), torch.Generator().manual_seed(0),
                                                 ivar=torch.from_numpy(ivar))
    added = (out - torch.from_numpy(images)).numpy()
    assert abs(added.std() / (noise * np.sqrt(3.0)) - 1) < 0.06  # sqrt(2^2 - 1) sigma added
    # noiseless stamps: nothing to re-realise (ivar 0), never a division by zero
    flat = estimated_ivar(np.zeros((2, 3, 16, 16), dtype=np.float32))
    assert flat.shape == (2, 3, 16, 16) and np.all(flat == 0)


def test_same_bands_in_another_order(synthetic_folders, make_shards, tmp_path):
    """Folders with the same band list in another order need no --bands: the first one's order is
    used and the others' bands are read in it."""
    other = make_shards(tmp_path / "rgi", n=32, survey="other", bands=("r", "g", "i"), seed=3)
    ds = ShardDataset([synthetic_folders[0], other])
    assert ds.bands == ("g", "r", "i")
    ref = ShardDataset(other, bands=("g", "r", "i"))
    last = len(ds) - 1
    np.testing.assert_array_equal(ds.raw(last)["image"], ref.raw(len(ref) - 1)["image"])


def test_memory_mapped_reads_give_h5pys_bytes(make_shards, tmp_path):
    """Images and ivar are read through numpy memory maps where HDF5 stores them contiguously
    (how write_shard writes them) and through h5py otherwise -- chunked + gzip, big-endian
    floats, no ivar -- with the same values either way, for single items and batches in any
    order (repeats included); a pickled dataset (a DataLoader worker's copy) holds no maps."""
    import h5py

    from sim2obs.data.dataset import mapped_dataset

    folder = make_shards(tmp_path / "plain", n=40, bands=("g", "r", "i"), seed=4, shard_size=16)
    ds = ShardDataset(folder, bands=("i", "g"))
    files = sorted(folder.glob("*.h5"))
    with h5py.File(files[0], "r") as f:
        assert isinstance(mapped_dataset(files[0], f["images"]), np.ndarray)
        expect = {key: f[key][()][:, [2, 0]] for key in ("images", "ivar")}
    # other layouts: the same shards rewritten chunked + compressed, big-endian, without ivar
    variants = {"gzip": dict(chunks=True, compression="gzip"), "bigendian": dict(dtype=">f4"), "noivar": {}}
    for name, opts in variants.items():
        out = tmp_path / name
        out.mkdir()
        for path in files:
            with h5py.File(path, "r") as src, h5py.File(out / path.name, "w") as dst:
                for key in src:
                    if key in ("images", "ivar") and name != "noivar":
                        data = src[key][()]
                        dst.create_dataset(key, data=data.astype(opts.get("dtype", data.dtype)),
                                           **{k: v for k, v in opts.items() if k != "dtype"})
                    elif not (name == "noivar" and key == "ivar"):
                        src.copy(src[key], dst, name=key)
                dst.attrs.update(src.attrs)
        if name == "gzip":
            with h5py.File(out / files[0].name, "r") as f:
                assert mapped_dataset(out / files[0].name, f["images"]) is None
        other = ShardDataset(out, bands=("i", "g"))
        order = [5, 3, 39, 3, 0, 17]
        img, iv = other.raw_many(order)
        assert img.dtype == iv.dtype == np.float32 and img.shape == (6, 2, 32, 32)
        np.testing.assert_array_equal(img, ds.raw_many(order)[0])
        if name != "noivar":
            np.testing.assert_array_equal(iv, ds.raw_many(order)[1])
        np.testing.assert_array_equal(other.raw(3)["image"], ds.raw(3)["image"])
    np.testing.assert_array_equal(ds.raw(2)["image"], expect["images"][2])
    np.testing.assert_array_equal(ds.raw(2)["ivar"], expect["ivar"][2])
    np.testing.assert_array_equal(ds.raw_many([2, 1])[1], expect["ivar"][[2, 1]])
    assert ds._arrays and not pickle.loads(pickle.dumps(ds))._arrays
