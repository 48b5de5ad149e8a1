"""Shared helpers for the adapter tests: seeded Gaussian point clouds and small training loops."""

from __future__ import annotations

import pytest
import torch

#: the controlled mean shifts (in units of the clouds' standard deviation) of the issue
SHIFTS = (0.0, 0.5, 1.0, 2.0)


def gaussian_clouds(n: int, d: int, shift: float = 0.0, seed: int = 0, m: int | None = None,
                    scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ~ N(0, I_d) [n, d]; target ~ N(shift e_0, scale^2 I_d) [m, d] (float32, seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = scale * torch.randn(m or n, d, generator=g)
    y[:, 0] += shift
    return x, y


def shift_descent(adapter, x: torch.Tensor, y: torch.Tensor, steps: int = 30, lr: float = 0.5,
                  extra=None) -> tuple[float, float]:
    """Minimise ``adapter(x, y + delta).loss`` over a learnable translation ``delta`` of the
    target by plain SGD; return |mean(x) - mean(y)| before and after.

    ``extra(y_moved)`` may return keyword arguments (predictions) for the adapter.
    """
    delta = torch.zeros(1, x.shape[1], requires_grad=True)
    opt = torch.optim.SGD([delta], lr=lr)
    before = float((x.mean(0) - y.mean(0)).norm())
    for _ in range(steps):
        opt.zero_grad()
        yy = y + delta
        kwargs = extra(yy) if extra is not None else {}
        adapter(x, yy, **kwargs).loss.backward()
        opt.step()
    after = float((x.mean(0) - (y + delta.detach()).mean(0)).norm())
    return before, after


@pytest.fixture
def one_torch_thread():
    """Run a test single-threaded (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    the adapter tests' kernels are tiny (N ~ 256) and on a shared 2-core machine OpenMP thread
    hand-offs made them ~50x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def clouds():
    return gaussian_clouds


@pytest.fixture
def descend():
    return shift_descent
