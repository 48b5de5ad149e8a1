"""Test helpers for stamp-level physics checks: analytic Gaussian sources, image moments, a seeded
generator. On ``sys.path`` through pytest's ``pythonpath`` (pyproject.toml), so test files import
them as ``from stamp_helpers import gaussian``."""

from __future__ import annotations

import torch

from sim2obs.pretrain.augment import FWHM_PER_SIGMA

#: stamp side (pixels) of the helpers' default images
S = 64


def gaussian(n=1, b=1, size=S, sigma=3.0, centre=None, q=1.0, flux=1.0, dtype=torch.float32):
    """(n, b, size, size) sampled elliptical Gaussians (axis ratio q along y) of total ``flux``."""
    c = (size - 1) / 2 if centre is None else centre
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                          torch.arange(size, dtype=torch.float64), indexing="ij")
    img = torch.exp(-((x - c) ** 2 / (2 * sigma**2) + (y - c) ** 2 / (2 * (q * sigma) ** 2)))
    img = flux * img / img.sum()
    return img.expand(n, b, size, size).clone().to(dtype)


def moments(img: torch.Tensor):
    """Centroid (x, y) and second moments (xx, yy, xy) over the last two axes."""
    img = img.double()
    h, w = img.shape[-2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                          torch.arange(w, dtype=torch.float64), indexing="ij")
    f = img.sum((-2, -1))
    cx, cy = (img * x).sum((-2, -1)) / f, (img * y).sum((-2, -1)) / f
    dx, dy = x - cx[..., None, None], y - cy[..., None, None]
    xx = (img * dx**2).sum((-2, -1)) / f
    yy = (img * dy**2).sum((-2, -1)) / f
    xy = (img * dx * dy).sum((-2, -1)) / f
    return cx, cy, xx, yy, xy


def fwhm_from_moments(img):
    _, _, xx, yy, _ = moments(img)
    return FWHM_PER_SIGMA * torch.sqrt((xx + yy) / 2)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)
