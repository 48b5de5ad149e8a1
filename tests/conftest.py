"""Shared fixtures: small synthetic shard folders (fast to make, with known labels)."""

import numpy as np
import pytest

from sim2obs.data.shards import Shard, ShardAttrs, shard_filename, write_shard


def make_synthetic_shards(folder, n=64, survey="hsc", bands=("g", "r", "i"), stamp=32, seed=0,
                          shard_size=32, id_offset=0, noise=0.05):
    """Gaussian blobs whose flux and size follow 'log_mstar'; noise with known ivar."""
    rng = np.random.default_rng(seed)
    ids = np.arange(id_offset, id_offset + n, dtype=np.int64)
    label_rng = np.random.default_rng(12345)  # labels depend on the id only (shared by surveys)
    all_mass = label_rng.uniform(9, 11.5, 100000)
    all_z = label_rng.uniform(0.05, 0.5, 100000)
    yy, xx = np.mgrid[0:stamp, 0:stamp] - (stamp - 1) / 2
    for s, start in enumerate(range(0, n, shard_size)):
        sel = ids[start:start + shard_size]
        m = all_mass[sel]
        z = all_z[sel]
        size = 1.0 + 0.8 * (m - 9)
        flux = 10 ** (0.6 * (m - 10)) * 50 * (0.1 / z) ** 2
        prof = np.exp(-0.5 * (xx**2 + yy**2)[None] / size[:, None, None] ** 2)
        prof /= prof.sum(axis=(1, 2), keepdims=True)
        colours = np.linspace(0.7, 1.3, len(bands))
        noiseless = (flux[:, None, None, None] * colours[None, :, None, None] * prof[:, None])
        images = noiseless + rng.normal(0, noise, noiseless.shape)
        shard = Shard(
            images=images.astype(np.float32), ivar=np.full(images.shape, noise**-2, np.float32),
            psf=np.ones((1, len(bands), 5, 5), np.float32) / 25, noiseless=noiseless.astype(np.float32),
            labels={"object_id": sel, "log_mstar": m, "redshift": z,
                    **{f"psf_fwhm_{b}": np.full(len(sel), 0.7) for b in bands}},
            attrs=ShardAttrs(survey, bands, 0.168, "sim", "synthetic", seed),
        )
        write_shard(folder / shard_filename(survey, s), shard)
    return folder


@pytest.fixture(scope="session")
def synthetic_folders(tmp_path_factory):
    """Two 'surveys' of the same 96 objects (cross-survey pairs) with 3 shared bands."""
    root = tmp_path_factory.mktemp("synthetic")
    a = make_synthetic_shards(root / "hsc", n=96, survey="hsc", seed=1)
    b = make_synthetic_shards(root / "lsst", n=96, survey="lsst", bands=("g", "r", "i", "z"), seed=2)
    return a, b


@pytest.fixture(scope="session")
def make_shards():
    """The synthetic shard maker, for tests that need their own variant."""
    return make_synthetic_shards
