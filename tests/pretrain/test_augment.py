"""Augmentations: what each conserves, determinism, dtype and batch handling."""

from __future__ import annotations

import math

import pytest
import torch
from stamp_helpers import (  # tests/helpers (pytest's pythonpath)
    S,
    fwhm_from_moments,
    gaussian,
    gen,
    moments,
)

from sim2obs.errors import Sim2ObsValueError
from sim2obs.pretrain.augment import (
    Compose,
    GalacticReddening,
    NoiseResample,
    PSFDegrade,
    RandomCropResize,
    RandomRot90Flip,
    RandomRotation,
    RandomShift,
    RedshiftDimming,
)


def mixed_batch(dtype=torch.float32):
    """Galaxy, pure noise, empty stamp, off-centre point source; 3 bands."""
    g = gen(123)
    x = torch.zeros(4, 3, S, S, dtype=torch.float64)
    x[0] = gaussian(1, 3, sigma=4.0, flux=50.0)[0].double()
    x[1] = 0.1 * torch.randn(3, S, S, generator=g, dtype=torch.float64)
    x[3, :, 20, 40] = 5.0
    return x.to(dtype)


def all_augs():
    return [
        RandomRot90Flip(),
        RandomRotation(180.0),
        RandomShift(1.5, "fourier"),
        RandomShift(1.5, "bilinear"),
        RandomCropResize((0.7, 1.0)),
        PSFDegrade([3.0, 3.5, 4.0], max_factor=1.8),
        NoiseResample(ivar=torch.full((3, 1, 1), 100.0), factor_range=(1.0, 2.0)),
        GalacticReddening([3.3, 2.3, 1.7], ebv_max=0.3),
        RedshiftDimming(z_in=0.05, max_dz=0.2),
    ]


# ------------------------------------------------------------------------------ geometric

def test_rot90_flip_is_exact_dihedral_permutation():
    x = torch.randn(64, 2, 16, 16, generator=gen(1))
    y = RandomRot90Flip()(x, gen(2))
    torch.testing.assert_close(y.sum((2, 3)), x.sum((2, 3)), rtol=0, atol=1e-5)
    seen = set()
    for i in range(len(x)):
        variants = [torch.rot90(x[i].flip(-1) if c >= 4 else x[i], c % 4, dims=(-2, -1)) for c in range(8)]
        match = [c for c, v in enumerate(variants) if torch.equal(v, y[i])]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(range(8))  # every symmetry occurs
    # sorted pixel values are identical: a pure permutation
    torch.testing.assert_close(y.flatten(1).sort().values, x.flatten(1).sort().values, rtol=0, atol=0)


def test_rot90_flip_non_square_keeps_shape():
    x = torch.randn(16, 1, 8, 12, generator=gen(1))
    y = RandomRot90Flip()(x, gen(3))
    assert y.shape == x.shape
    torch.testing.assert_close(y.sum((2, 3)), x.sum((2, 3)))


def test_rotation_conserves_flux_and_shape_of_source():
    x = gaussian(16, 2, sigma=4.0, q=0.5, flux=10.0)
    y = RandomRotation(180.0)(x, gen(4))
    ratio = y.sum((2, 3)) / x.sum((2, 3))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.01)
    # ellipticity modulus conserved (bilinear smoothing rounds it slightly), orientation varies
    def ellipticity(img):
        _, _, xx, yy, xy = moments(img)
        return torch.sqrt((xx - yy) ** 2 + 4 * xy**2) / (xx + yy), xx, yy, xy

    e, xx, yy, xy = ellipticity(y)
    e0 = ellipticity(x)[0]
    assert torch.allclose(e, e0, rtol=0.03)
    angles = 0.5 * torch.atan2(2 * xy, xx - yy)
    assert angles.std() > 0.3
    # zero angle is the identity
    torch.testing.assert_close(RandomRotation(0.0)(x, gen(0)), x, rtol=0, atol=1e-6)


def test_rotation_small_angle_limit():
    x = gaussian(4, 1, sigma=3.0, q=0.5)
    _, _, xx, yy, xy = moments(RandomRotation(10.0)(x, gen(5)))
    angles = torch.rad2deg(0.5 * torch.atan2(2 * xy, xx - yy))
    assert (angles.abs() <= 10.5).all()


@pytest.mark.parametrize("method,tol", [("fourier", 1e-5), ("bilinear", 0.01)])
def test_shift_conserves_flux(method, tol):
    x = gaussian(8, 2, sigma=3.0, flux=7.0)
    y = RandomShift(2.0, method)(x, gen(6))
    ratio = y.sum((2, 3)) / x.sum((2, 3))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=tol)


def test_shift_moves_centroid_by_the_same_amount_in_both_methods():
    x = gaussian(8, 1, sigma=3.0)
    yf = RandomShift(1.5, "fourier")(x, gen(7))
    yb = RandomShift(1.5, "bilinear")(x, gen(7))
    cx0, cy0, *_ = moments(x)
    cxf, cyf, *_ = moments(yf)
    cxb, cyb, *_ = moments(yb)
    dxf, dyf = cxf - cx0, cyf - cy0
    assert (dxf.abs() <= 1.5 + 1e-4).all() and (dyf.abs() <= 1.5 + 1e-4).all()
    assert dxf.abs().max() > 0.3
    torch.testing.assert_close(cxb - cx0, dxf, atol=1e-3, rtol=0)
    torch.testing.assert_close(cyb - cy0, dyf, atol=1e-3, rtol=0)
    torch.testing.assert_close(RandomShift(0.0)(x, gen(0)), x, atol=1e-6, rtol=0)


def test_crop_resize_flux_and_size():
    x = gaussian(8, 1, sigma=3.0, flux=4.0)
    y = RandomCropResize((0.6, 0.9), jitter=False)(x, gen(8))
    ratio = y.sum((2, 3)) / x.sum((2, 3))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.01)
    grown = fwhm_from_moments(y) / fwhm_from_moments(x)
    assert ((grown > 1.1) & (grown < 1.0 / 0.6 + 0.02)).all()
    y_sb = RandomCropResize((0.6, 0.9), jitter=False, conserve_flux=False)(x, gen(8))
    torch.testing.assert_close(y_sb, y / (y.sum((2, 3), keepdim=True) / y_sb.sum((2, 3), keepdim=True)))
    # peak surface brightness kept without flux conservation
    assert torch.allclose(y_sb.amax((2, 3)), x.amax((2, 3)), rtol=0.02)
    torch.testing.assert_close(RandomCropResize((1.0, 1.0))(x, gen(0)), x, atol=1e-6, rtol=0)
    with pytest.raises(Sim2ObsValueError):
        RandomCropResize((0.5, 1.2))


# ------------------------------------------------------------------------------ generic

@pytest.mark.parametrize("aug", all_augs(), ids=lambda a: type(a).__name__)
def test_deterministic_with_seeded_generator(aug):
    x = mixed_batch()
    a, b = aug(x, gen(42)), aug(x, gen(42))
    assert torch.equal(a, b)
    assert not torch.equal(aug(x, gen(43)), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aug", all_augs(), ids=lambda a: type(a).__name__)
def test_dtype_shape_and_mixed_batch(aug, dtype):
    x = mixed_batch(dtype)
    y = aug(x, gen(1))
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    assert torch.isfinite(y.float()).all()
    if not isinstance(aug, NoiseResample):
        assert float(y[2].float().abs().max()) < 1e-3  # an empty stamp stays empty


@pytest.mark.parametrize("aug", all_augs(), ids=lambda a: type(a).__name__)
def test_channels_last_preserved(aug):
    x = mixed_batch().contiguous(memory_format=torch.channels_last)
    y = aug(x, gen(2))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, aug(x.contiguous(), gen(2)), rtol=1e-5, atol=1e-6)


def test_samples_are_independent_of_batch_mates():
    x = mixed_batch()
    for aug in (PSFDegrade([3.0, 3.5, 4.0], 1.6, 1.6), GalacticReddening([3.0, 2.0, 1.0], 0.2, 0.2),
                RedshiftDimming(0.05, 0.1, 0.1), RandomRotation(0.0)):
        whole = aug(x, gen(0))
        for i in range(len(x)):
            torch.testing.assert_close(whole[i:i + 1], aug(x[i:i + 1], gen(0)), rtol=1e-5, atol=1e-6)


def test_compose_passes_context_and_checks_order():
    x = mixed_batch()
    ivar = torch.full_like(x, 100.0)
    pipeline = Compose([
        NoiseResample(factor_range=(1.0, 1.5)),
        PSFDegrade([3.0, 3.5, 4.0], 1.5),
        GalacticReddening([3.0, 2.0, 1.0], 0.1),
        RandomRot90Flip(),
        RandomShift(0.5),
        RedshiftDimming(0.05, 0.1),
    ])
    a = pipeline(x, gen(3), ivar=ivar, redshift=torch.full((4,), 0.08))
    b = pipeline(x, gen(3), ivar=ivar, redshift=torch.full((4,), 0.08))
    assert torch.equal(a, b) and a.shape == x.shape
    assert "RandomShift" in repr(pipeline)
    with pytest.raises(Sim2ObsValueError, match="before every geometric"):
        Compose([RandomRot90Flip(), NoiseResample()])
    with pytest.raises(Sim2ObsValueError, match=r"\(N, B, H, W\)"):
        RandomRot90Flip()(torch.zeros(3, 8, 8), gen(0))


def test_global_rng_when_no_generator():
    torch.manual_seed(7)
    a = RandomRotation()(mixed_batch())
    torch.manual_seed(7)
    b = RandomRotation()(mixed_batch())
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_cpu_and_cuda_generators():
    x = mixed_batch().cuda()
    ivar = torch.full_like(x, 100.0)
    for g in (gen(0), torch.Generator(device="cuda").manual_seed(0)):
        for aug in all_augs():
            aug = aug.cuda()
            kw = {"ivar": ivar} if isinstance(aug, NoiseResample) else {}
            y = aug(x, g, **kw)
            assert y.is_cuda and y.shape == x.shape and torch.isfinite(y).all()
    # CPU generator: same numbers as on the CPU
    cpu = RandomRotation()(mixed_batch(), gen(5))
    gpu = RandomRotation()(mixed_batch().cuda(), gen(5))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(gpu.sum()))


def test_observing_augmentations_are_importable_from_augment():
    """0.2's import path: the observing-condition augmentations moved to their own module and are
    still importable from ``augment`` (the same classes); unknown names still raise."""
    import sim2obs.pretrain.augment as A
    from sim2obs.pretrain import observing

    for name in observing.__all__:
        assert getattr(A, name) is getattr(observing, name) and name in dir(A)
    star = {}
    exec("from sim2obs.pretrain.augment import *", star)  # as before the split: all augmentations
    assert {"PSFDegrade", "NoiseResample", "GalacticReddening", "RedshiftDimming", "RandomShift"} <= set(star)
    assert A._reset_pad_cache is observing._reset_pad_cache  # named in pickled PSFDegrade modules
    with pytest.raises(AttributeError, match="no attribute 'PSFDegrad'"):
        A.PSFDegrad  # noqa: B018
