"""Image grids: band choice, noise estimate, annotation, PNG output written atomically."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from sim2obs.data.shards import Shard, ShardAttrs
from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError
from sim2obs.plots import (
    default_rgb_bands,
    image_grid,
    image_grid_figure,
    lupton_composite,
    noise_sigma,
)

SIGMA = np.array([0.05, 0.06, 0.07, 0.08, 0.1])


def make_shard(n=4, bands=("g", "r", "i", "z", "y"), survey="hsc", size=32, ivar=True,
               labels=None, seed=0, scale=2.0, grow=1.0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    nb = len(bands)
    clean = np.zeros((n, nb, size, size), np.float32)
    for i in range(n):
        profile = np.exp(-np.hypot(x, y) / (scale + grow * i))
        for b in range(nb):
            clean[i, b] = (2.0 + b) * (1 + i) * profile
    sig = SIGMA[:nb][None, :, None, None]
    images = (clean + rng.normal(size=clean.shape) * sig).astype(np.float32)
    iv = np.broadcast_to(1.0 / sig**2, clean.shape).astype(np.float32) if ivar else None
    if labels is None:
        labels = {"log_mstar": np.linspace(9.5, 11.0, n), "redshift": np.full(n, 0.1)}
    labels = {"object_id": np.arange(n) + 100, **labels}
    attrs = ShardAttrs(survey=survey, bands=bands, pixel_scale_arcsec=0.168, domain="sim",
                       source="mini", seed=0)
    psf = np.full((1, nb, 5, 5), 1 / 25, np.float32)
    return Shard(images=images, psf=psf, labels=labels, attrs=attrs, ivar=iv)


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_default_rgb_bands():
    hsc = ("g", "r", "i", "z", "y")
    waves = (484.4, 625.9, 773.0, 891.2, 978.7)
    assert default_rgb_bands(hsc, waves) == ("i", "r", "g")
    assert default_rgb_bands(("u", "g", "r", "i", "z"), (355, 469, 617, 748, 893)) == \
        ("i", "r", "g")
    # Euclid-like: VIS, Y, J, H -> the three bluest, red first
    assert default_rgb_bands(("VIS", "Y", "J", "H"), (715, 1080, 1370, 1770)) == \
        ("J", "Y", "VIS")
    # no wavelengths: list taken blue -> red, first / middle / last
    assert default_rgb_bands(hsc) == ("y", "i", "g")
    assert default_rgb_bands(("r", "g"), (620, 480)) == ("r", "g")
    assert default_rgb_bands(("F814W",)) == ("F814W",)
    with pytest.raises(Sim2ObsValueError):
        default_rgb_bands(())


def test_noise_sigma_from_ivar_and_mad():
    shard = make_shard(n=6, size=48, scale=1.5, grow=0.0)
    assert noise_sigma(shard.images, shard.ivar) == pytest.approx(SIGMA, rel=1e-6)
    robust = noise_sigma(shard.images)  # MAD of the stamp frame, away from the galaxy
    assert robust == pytest.approx(SIGMA, rel=0.08)
    # masked pixels (ivar = 0) do not count; a band with no ivar > 0 falls back on the MAD
    iv = np.array(shard.ivar)
    iv[:, 0] = 0.0
    iv[:, 1, :, :5] = 1e6
    got = noise_sigma(shard.images, iv)
    assert got[0] == pytest.approx(SIGMA[0], rel=0.08)
    assert got[1] == pytest.approx(SIGMA[1], rel=1e-6)
    # noiseless images still give a positive scale
    flat = np.zeros((1, 2, 16, 16))
    flat[0, 1, 8, 8] = 5.0
    assert list(noise_sigma(flat)) == pytest.approx([1.0, 5e-3])


def test_image_grid_writes_png(tmp_path):
    shard = make_shard()
    out = image_grid(shard, tmp_path / "grid.png", n=3)
    assert out == tmp_path / "grid.png"
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] > img.shape[1] / 3  # 3 rows of 6 panels
    assert float(img[..., :3].std()) > 0.05  # not a blank figure
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left
    compact = matplotlib.image.imread(image_grid(shard, tmp_path / "c.png", per_band=False))
    assert compact.shape[1] < img.shape[1]


def test_annotations_skip_missing_labels():
    labels = {"log_mstar": np.array([10.25, np.nan, 9.0]), "age_gyr": np.array([1.0, 2.0, 3.0])}
    shard = make_shard(n=3, labels=labels)
    fig = image_grid_figure(shard, label_keys=("log_mstar", "redshift", "age_gyr"))
    notes = texts(fig)
    assert len(notes) == 3
    assert notes[0] == "id 100\nlog_mstar 10.25\nage_gyr 1.00"
    assert notes[1] == "id 101\nage_gyr 2.00"  # NaN log_mstar and absent redshift skipped
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["i,r,g", "g", "r", "i", "z", "y"]
    assert "mini" in fig.get_suptitle() and "hsc" in fig.get_suptitle()
    fig = image_grid_figure(shard, n=2, title="custom", per_band=False)
    assert fig.get_suptitle() == "custom" and len(texts(fig)) == 2


def test_rgb_pixels_follow_lupton(tmp_path):
    from astropy.visualization import make_lupton_rgb

    shard = make_shard(n=1, ivar=False)
    fig = image_grid_figure(shard, rgb_bands=("z", "r", "g"), stretch=0.5, q=4, per_band=False)
    shown = fig.axes[0].images[0].get_array()
    bands = shard.bands
    expected = make_lupton_rgb(*(shard.images[0, bands.index(b)] for b in "zrg"),
                               minimum=0.0, stretch=0.5, Q=4)
    assert np.array_equal(np.asarray(shown), expected)
    # default stretch: Q times the noise sigma of the mean intensity
    fig = image_grid_figure(shard, per_band=False, q=8)
    sig = noise_sigma(shard.images[:1])
    idx = [bands.index(b) for b in ("i", "r", "g")]
    expected = make_lupton_rgb(*(shard.images[0, k] for k in idx), minimum=0.0,
                               stretch=8 * math.sqrt(np.sum(sig[idx] ** 2)) / 3, Q=8)
    assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array()), expected)


@pytest.mark.parametrize("bands", [("VIS",), ("g", "r")])
def test_one_and_two_bands(tmp_path, bands):
    shard = make_shard(n=2, bands=bands, survey="unknown-survey")
    fig = image_grid_figure(shard)
    rgb = np.asarray(fig.axes[0].images[0].get_array())
    if len(bands) == 1:  # greyscale
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    else:
        assert not np.array_equal(rgb[..., 0], rgb[..., 2])
    assert image_grid(shard, tmp_path / "x.png").is_file()


def test_masked_nan_pixels_are_drawn(tmp_path):
    shard = make_shard(n=2)
    images, ivar = np.array(shard.images), np.array(shard.ivar)
    images[0, :, 3:6, 3:6] = np.nan
    ivar[0, :, 3:6, 3:6] = 0.0
    masked = Shard(images=images, psf=shard.psf, labels=shard.labels, attrs=shard.attrs,
                   ivar=ivar)
    assert image_grid(masked, tmp_path / "m.png").is_file()


def test_bad_arguments(tmp_path):
    shard = make_shard(n=2)
    with pytest.raises(Sim2ObsKeyError, match="rgb_bands"):
        image_grid(shard, tmp_path / "a.png", rgb_bands=("i", "r", "K"))
    with pytest.raises(Sim2ObsValueError, match=r"\.png"):
        image_grid(shard, tmp_path / "a.jpg")
    with pytest.raises(Sim2ObsValueError, match="n must be"):
        image_grid(shard, tmp_path / "a.png", n=0)
    with pytest.raises(Sim2ObsValueError, match="q"):
        image_grid(shard, tmp_path / "a.png", q=0)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    shard = make_shard(n=1)
    out = tmp_path / "grid.png"
    out.write_bytes(b"previous")

    def broken(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        image_grid(shard, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_never_switches_the_backend(tmp_path):
    before = matplotlib.get_backend()
    image_grid(make_shard(n=1), tmp_path / "a.png")
    assert matplotlib.get_backend() == before


def test_lupton_composite():
    from astropy.visualization import make_lupton_rgb

    rng = np.random.default_rng(3)
    r, g, b = (rng.normal(0.0, 0.1, (12, 12)).astype(np.float32) + 1.0 for _ in range(3))
    expected = make_lupton_rgb(r, g, b, minimum=0.0, stretch=0.7, Q=5)
    assert np.array_equal(lupton_composite([r, g, b], stretch=0.7, q=5), expected)
    # stretch from the noise: q x sigma of I = (r + g + b) / 3
    got = lupton_composite([r, g, b], sigmas=[0.3, 0.4, 1.2], q=5)
    assert np.array_equal(got, make_lupton_rgb(r, g, b, minimum=0.0, stretch=5 * 1.3 / 3, Q=5))
    grey = lupton_composite([r], stretch=1.0)
    assert grey.shape == (12, 12, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    with pytest.raises(Sim2ObsValueError, match="stretch"):
        lupton_composite([r, g])
    with pytest.raises(Sim2ObsValueError, match="1 to 3"):
        lupton_composite([r, g, b, r], stretch=1.0)
    with pytest.raises(Sim2ObsValueError, match="sigmas"):
        lupton_composite([r, g], sigmas=[0.1])
