"""Shard format (DESIGN.md "Shard format"): round trip, determinism, atomicity, validation."""

from __future__ import annotations

import dataclasses
import os
import stat
import time

import h5py
import numpy as np
import pytest

from sim2obs import __version__
from sim2obs.data.shards import (
    Shard,
    ShardAttrs,
    is_complete,
    list_shards,
    read_folder,
    read_shard,
    shard_filename,
    write_shard,
)
from sim2obs.errors import Sim2ObsDataError, Sim2ObsFileNotFoundError

N, B, S, P, L = 3, 2, 8, 5, 6


def make_shard(n=N, seed=0, psf_n=1, with_spectra=True, **changes) -> Shard:
    rng = np.random.default_rng(seed)
    psf = rng.uniform(0.1, 1.0, (psf_n, B, P, P)).astype(np.float32)
    psf /= psf.sum(axis=(2, 3), keepdims=True)
    attrs = ShardAttrs(survey="hsc", bands=("g", "r"), pixel_scale_arcsec=0.168, domain="sim",
                       source="mini", seed=7, config={"render": {"stamp": S, "z": [0.1, 0.2]}})
    kwargs = dict(
        images=rng.normal(size=(n, B, S, S)).astype(np.float32),
        ivar=rng.uniform(1.0, 2.0, (n, B, S, S)).astype(np.float32),
        psf=psf,
        noiseless=rng.normal(size=(n, B, S, S)).astype(np.float32),
        labels={"object_id": np.arange(n, dtype=np.int64) + 10 * seed,
                "log_mstar": rng.uniform(9, 11, n), "redshift": np.full(n, np.nan)},
        label_units={"log_mstar": "log10(Msun)", "redshift": ""},
        attrs=attrs,
    )
    if with_spectra:
        kwargs["spectra"] = rng.normal(size=(n, L)).astype(np.float32)
        kwargs["wavelength_angstrom"] = np.linspace(3000, 9000, L).astype(np.float32)
    kwargs.update(changes)
    return Shard(**kwargs)


def test_round_trip_every_dataset_and_attribute(tmp_path):
    shard = make_shard()
    path = write_shard(tmp_path / shard_filename("mock", 0), shard)
    assert path.name == "mock-00000.h5"
    back = read_shard(path)
    for name in ("images", "ivar", "psf", "noiseless", "spectra", "wavelength_angstrom"):
        got = getattr(back, name)
        assert got.dtype == np.float32, name
        assert np.array_equal(got, getattr(shard, name)), name
    assert set(back.labels) == {"object_id", "log_mstar", "redshift"}
    assert back.labels["object_id"].dtype == np.int64
    assert np.array_equal(back.labels["object_id"], shard.labels["object_id"])
    assert np.array_equal(back.labels["log_mstar"], shard.labels["log_mstar"])
    assert np.all(np.isnan(back.labels["redshift"]))  # NaN where unknown survives
    assert back.label_units == {"log_mstar": "log10(Msun)", "redshift": "", "object_id": ""}
    assert back.attrs == dataclasses.replace(shard.attrs)
    assert back.attrs.sim2obs_version == __version__
    assert back.attrs.config == {"render": {"stamp": S, "z": [0.1, 0.2]}}
    assert back.attrs.flux_unit == "nanomaggy"
    assert back.path == str(path)
    assert len(back) == N and back.bands == ("g", "r")
    with h5py.File(path) as f:  # raw layout of DESIGN.md
        assert f["images"].shape == (N, B, S, S) and f["psf"].shape == (1, B, P, P)
        assert f.attrs["n_objects"] == N and f.attrs["seed"] == 7
        assert f["labels/log_mstar"].attrs["unit"] == "log10(Msun)"
    assert read_shard(path, with_noiseless=False).noiseless is None


def test_optional_datasets_absent(tmp_path):
    shard = make_shard(with_spectra=False, ivar=None, noiseless=None,
                       attrs=ShardAttrs(survey="sdss", bands=("g", "r"), pixel_scale_arcsec=0.396,
                                        domain="real", source="catalogue"))
    back = read_shard(write_shard(tmp_path / "real-00000.h5", shard))
    assert back.ivar is None and back.noiseless is None and back.spectra is None
    assert back.wavelength_angstrom is None and back.attrs.seed is None
    assert back.attrs.domain == "real"
    with h5py.File(tmp_path / "real-00000.h5") as f:
        assert set(f) == {"images", "psf", "labels"}


def test_identical_input_gives_identical_bytes(tmp_path):
    a = write_shard(tmp_path / "a" / "x-00000.h5", make_shard())
    time.sleep(1.1)  # HDF5 object timestamps have 1 s resolution
    b = write_shard(tmp_path / "b" / "x-00000.h5", make_shard())
    assert a.read_bytes() == b.read_bytes()
    c = write_shard(tmp_path / "c" / "x-00000.h5", make_shard(seed=1))
    assert c.read_bytes() != a.read_bytes()


def test_written_file_is_readable_by_others(tmp_path):
    path = write_shard(tmp_path / "x-00000.h5", make_shard())
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_failed_write_leaves_nothing(tmp_path):
    bad = make_shard(attrs=dataclasses.replace(make_shard().attrs, config={"x": object()}))
    # the config is converted to JSON after every dataset has been written: a failure midway
    with pytest.raises(TypeError):
        write_shard(tmp_path / "x-00000.h5", bad)
    assert list(tmp_path.iterdir()) == []
    good = write_shard(tmp_path / "x-00000.h5", make_shard())
    before = good.read_bytes()
    with pytest.raises(TypeError):
        write_shard(good, bad)
    assert good.read_bytes() == before  # the complete shard is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["x-00000.h5"]


def test_failed_dataset_write_leaves_nothing(tmp_path, monkeypatch):
    real = h5py.Group.create_dataset

    def flaky(self, name, *args, **kwargs):
        if name == "noiseless":
            raise OSError("disk full")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path / "x-00000.h5", make_shard())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (dict(images=np.zeros((N, B, S))), r"/images must be \(N, B, H, W\)"),
    (dict(images=np.zeros((N, 3, S, S))), "3 bands but attribute 'bands'"),
    (dict(ivar=np.ones((N, B, S, S + 1))), "/ivar shape"),
    (dict(noiseless=np.ones((N + 1, B, S, S))), "/noiseless shape"),
    (dict(psf=np.ones((2, B, P, P))), "/psf must be"),
    (dict(psf=np.ones((1, B, P, P + 2))), "/psf must be"),
    (dict(psf=np.ones((1, B + 1, P, P))), "/psf must be"),
    (dict(labels={"object_id": np.arange(N), "log_mstar": np.zeros(N + 1)}),
     "/labels/log_mstar has shape"),
    (dict(labels={"log_mstar": np.zeros(N)}), "/labels/object_id is required"),
    (dict(spectra=np.zeros((N, L)), wavelength_angstrom=None), "go together"),
])
def test_bad_shapes_rejected(change, match):
    with pytest.raises(Sim2ObsDataError, match=match):
        make_shard(**change)


def test_attribute_validation():
    with pytest.raises(Sim2ObsDataError, match="'domain'"):
        ShardAttrs(survey="hsc", bands=("g",), pixel_scale_arcsec=0.2, domain="mock", source="x")
    with pytest.raises(Sim2ObsDataError, match="'bands' is empty"):
        ShardAttrs(survey="hsc", bands=(), pixel_scale_arcsec=0.2, domain="sim", source="x")
    with pytest.raises(Sim2ObsDataError, match="pixel_scale_arcsec"):
        ShardAttrs(survey="hsc", bands=("g",), pixel_scale_arcsec=0.0, domain="sim", source="x")


def test_nan_pixels(tmp_path):
    base = make_shard()
    images, ivar = np.array(base.images), np.array(base.ivar)
    images[1, 0, 2, 3] = np.nan
    with pytest.raises(Sim2ObsDataError, match="1 NaN/inf pixels that are not masked"):
        make_shard(images=images)
    with pytest.raises(Sim2ObsDataError, match="not masked"):
        make_shard(images=images, ivar=None)
    ivar[1, 0, 2, 3] = 0.0
    masked = make_shard(images=images, ivar=ivar)  # masked by ivar = 0: accepted
    back = read_shard(write_shard(tmp_path / "m-00000.h5", masked))
    assert np.isnan(back.images[1, 0, 2, 3]) and back.ivar[1, 0, 2, 3] == 0
    ivar[0, 0, 0, 0] = -1.0
    with pytest.raises(Sim2ObsDataError, match="/ivar has negative"):
        make_shard(images=images, ivar=ivar)


def test_nan_object_id_rejected():
    with pytest.raises(Sim2ObsDataError):
        make_shard(labels={"object_id": np.array([1.0, np.nan, 3.0])})


def test_nan_psf_rejected():
    psf = np.array(make_shard().psf)
    psf[0, 0, 0, 0] = np.nan
    with pytest.raises(Sim2ObsDataError):
        make_shard(psf=psf)


def test_spectra_shapes_rejected():
    with pytest.raises(Sim2ObsDataError):
        make_shard(spectra=np.zeros((N + 2, L)), wavelength_angstrom=np.zeros(L - 1))


# ------------------------------------------------------------------------------------------
# Reading damaged or foreign files
# ------------------------------------------------------------------------------------------

def test_truncated_file(tmp_path):
    path = write_shard(tmp_path / "x-00000.h5", make_shard())
    data = path.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(Sim2ObsDataError, match="truncated") as exc:
            read_shard(path)
        assert str(path) in str(exc.value)
        assert not is_complete(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(Sim2ObsFileNotFoundError, match="does not exist"):
        read_shard(tmp_path / "none-00000.h5")
    path = tmp_path / "y-00000.h5"
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((1, 1, 2, 2))
    with pytest.raises(Sim2ObsDataError, match="no '/psf'") as exc:
        read_shard(path)
    assert str(path) in str(exc.value)
    good = write_shard(tmp_path / "z-00000.h5", make_shard())
    with h5py.File(good, "a") as f:
        del f.attrs["survey"]
    with pytest.raises(Sim2ObsDataError, match="lacks file attribute 'survey'"):
        read_shard(good)
    good = write_shard(tmp_path / "w-00000.h5", make_shard())
    with h5py.File(good, "a") as f:
        f.attrs["config"] = "{not json"
    with pytest.raises(Sim2ObsDataError, match="'config' is not valid JSON"):
        read_shard(good)


def test_is_complete_and_list_shards(tmp_path):
    write_shard(tmp_path / shard_filename("m", 1), make_shard())
    write_shard(tmp_path / shard_filename("m", 0), make_shard())
    (tmp_path / ".m-00002.h5.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_shards(tmp_path)] == ["m-00000.h5", "m-00001.h5"]
    assert is_complete(tmp_path / "m-00000.h5")
    assert not is_complete(tmp_path / ".m-00002.h5.abc.tmp")
    assert not is_complete(tmp_path / "m-00009.h5")
    with pytest.raises(Sim2ObsFileNotFoundError, match="does not exist"):
        list_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Sim2ObsFileNotFoundError, match="no shard files"):
        list_shards(tmp_path / "empty")


# ------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------

def test_read_folder_concatenates(tmp_path):
    a = make_shard(seed=0)
    b = make_shard(n=2, seed=1, psf_n=2, labels={"object_id": np.array([7, 8]),
                                                 "log_mstar": np.array([9.0, 9.5])})
    write_shard(tmp_path / "m-00000.h5", a)
    write_shard(tmp_path / "m-00001.h5", b)
    both = read_folder(tmp_path)
    assert len(both) == N + 2
    assert np.array_equal(both.images, np.concatenate([a.images, b.images]))
    assert both.psf.shape == (N + 2, B, P, P)  # per-shard PSFs broadcast per object
    assert np.array_equal(both.psf[:N], np.broadcast_to(a.psf, (N, B, P, P)))
    assert np.array_equal(both.psf[N:], b.psf)
    assert list(both.labels["object_id"]) == [0, 1, 2, 7, 8]
    assert set(both.labels) == {"object_id", "log_mstar"}  # labels every shard has
    assert np.array_equal(both.wavelength_angstrom, a.wavelength_angstrom)
    assert both.spectra.shape == (N + 2, L)


def test_read_folder_drops_spectra_missing_in_one_shard(tmp_path):
    write_shard(tmp_path / "m-00000.h5", make_shard())
    write_shard(tmp_path / "m-00001.h5", make_shard(seed=1, with_spectra=False))
    both = read_folder(tmp_path)
    assert both.spectra is None and both.wavelength_angstrom is None


@pytest.mark.parametrize("change, what", [
    (dict(images=np.zeros((N, B, S + 2, S + 2), np.float32), ivar=None, noiseless=None),
     "stamp"),
    (dict(psf=np.full((1, B, P + 2, P + 2), 1 / (P + 2) ** 2, np.float32)), "psf size"),
    (dict(attrs=ShardAttrs(survey="hsc", bands=("g", "i"), pixel_scale_arcsec=0.168,
                           domain="sim", source="mini")), "bands"),
    (dict(attrs=ShardAttrs(survey="sdss", bands=("g", "r"), pixel_scale_arcsec=0.396,
                           domain="sim", source="mini")), "pixel_scale_arcsec"),
    (dict(attrs=ShardAttrs(survey="hsc", bands=("g", "r"), pixel_scale_arcsec=0.168,
                           domain="real", source="hsc-pdr3")), "domain"),
    (dict(wavelength_angstrom=np.linspace(4000, 8000, L).astype(np.float32)), "wavelength"),
])
def test_read_folder_refuses_incompatible_shards(tmp_path, change, what):
    write_shard(tmp_path / "m-00000.h5", make_shard())
    write_shard(tmp_path / "m-00001.h5", make_shard(seed=1, **change))
    with pytest.raises(Sim2ObsDataError, match="one survey setting") as exc:
        read_folder(tmp_path)
    assert what in str(exc.value) and "m-00001.h5" in str(exc.value)
