"""Multi-kernel MMD^2 between the source and target feature clouds (DAN).

Gretton et al. (2012, JMLR 13, 723, "A kernel two-sample test") define the squared maximum mean
discrepancy in a reproducing-kernel Hilbert space; Long et al. (2015, ICML, "Learning transferable
features with deep adaptation networks", DAN) minimise it with a *family* of Gaussian kernels
(multi-kernel MMD). With the kernel ``k = (1/K) sum_u exp(-|a - b|^2 / (2 sigma_u^2))`` and
x = ``f_s`` [N, D], y = ``f_t`` [M, D]:

* ``estimator="unbiased"`` (default; Gretton et al. 2012, Lemma 6)::

      MMD_u^2 = 1/(N(N-1)) sum_{i != i'} k(x_i, x_i') + 1/(M(M-1)) sum_{j != j'} k(y_j, y_j')
                - 2/(NM) sum_{i, j} k(x_i, y_j)

  an unbiased estimate of the population MMD^2: ~0 (and possibly slightly negative) for two
  samples of one distribution, so its gradient carries no systematic pull between them.
* ``estimator="biased"`` (Gretton et al. 2012, the V-statistic MMD_b^2): the same with the
  i = i' and j = j' terms included and 1/N^2, 1/M^2 normalisations. Always >= 0 but biased
  upwards by O(1/N + 1/M) (the k(x, x) = 1 diagonal terms).

DAN itself uses a linear-time unbiased estimate and learns the kernel weights; we use the
quadratic-time estimate (batches of a few hundred) and equal weights 1/K, as the widely used DAN
re-implementations do (5 kernels whose squared bandwidths differ by factors of 2).

**Bandwidths.** ``sigma_u^2 = sigma_med^2 * kernel_mul^(u - (K - 1)/2)``, u = 0..K-1: a geometric
family centred (in log) on the median heuristic ``sigma_med`` = median pairwise Euclidean distance
of the pooled batch (Gretton et al. 2012, Sect. 8), computed by
:func:`sim2obs.gap.embedding.median_bandwidth` (the same bandwidth the gap report's MMD uses) on
detached features, so the bandwidths are constants for autograd. With ``K = 1`` the value is
exactly the gap report's :func:`~sim2obs.gap.embedding.mmd2_unbiased`. ``bandwidth`` fixes
``sigma_med`` instead (features' units). Defaults K = 5, kernel_mul = 2.0: issue 4 / the DAN
re-implementations (factors 2^-2 .. 2^2 on sigma^2).

The median heuristic copies the pooled batch to the CPU (numpy, at most 2000 points): cheap for
training batches but a device synchronisation per call on a GPU; pass ``bandwidth`` to avoid it.

Shapes: ``f_s`` [N, D], ``f_t`` [M, D] (N, M >= 2) -> scalar. Diagnostics: ``mmd2`` (the
estimate), ``divergence`` = max(mmd2, 0), ``bandwidth`` (sigma_med).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sim2obs.adapters.base import Adapter, AdapterOutput
from sim2obs.errors import Sim2ObsValueError
from sim2obs.gap.embedding import median_bandwidth

ESTIMATORS = ("unbiased", "biased")


def pairwise_sqdist(a: Tensor, b: Tensor) -> Tensor:
    """|a_i - b_j|^2 for a [n, D], b [m, D] -> [n, m], clamped at 0 (finite gradient at a_i = b_j,
    unlike ``torch.cdist(a, b) ** 2``, whose square root has an infinite derivative at 0)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min(0.0)


class MMDAdapter(Adapter):
    """Multi-kernel Gaussian MMD^2 (Gretton et al. 2012; Long et al. 2015); module docstring.

    ``n_kernels``: K; ``kernel_mul``: ratio of successive squared bandwidths; ``estimator``:
    "unbiased" or "biased"; ``bandwidth``: fixed sigma_med (None: median heuristic per batch).
    """

    name = "mmd"

    def __init__(self, n_kernels: int = 5, kernel_mul: float = 2.0, *,
                 estimator: str = "unbiased", bandwidth: float | None = None) -> None:
        super().__init__()
        if n_kernels < 1:
            raise Sim2ObsValueError(f"n_kernels must be >= 1, got {n_kernels}")
        if not (kernel_mul > 0 and math.isfinite(kernel_mul)):
            raise Sim2ObsValueError(f"kernel_mul must be > 0, got {kernel_mul}")
        if estimator not in ESTIMATORS:
            raise Sim2ObsValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if bandwidth is not None and not (bandwidth > 0 and math.isfinite(bandwidth)):
            raise Sim2ObsValueError(f"bandwidth must be > 0, got {bandwidth}")
        self.n_kernels = int(n_kernels)
        self.kernel_mul = float(kernel_mul)
        self.estimator = estimator
        self.bandwidth = bandwidth

    def sigma2s(self, sigma_med: float) -> list[float]:
        """The K squared bandwidths ``sigma_med^2 kernel_mul^(u - (K-1)/2)``."""
        c = (self.n_kernels - 1) / 2.0
        return [sigma_med**2 * self.kernel_mul ** (u - c) for u in range(self.n_kernels)]

    def forward(self, f_s: Tensor, f_t: Tensor, *, y_s: Tensor | None = None,
                p_s: Tensor | None = None, p_t: Tensor | None = None) -> AdapterOutput:
        self.check_features(f_s, f_t)
        n, m = f_s.shape[0], f_t.shape[0]
        if self.bandwidth is not None:
            sigma = float(self.bandwidth)
        else:
            sigma = median_bandwidth(f_s.detach().cpu().double().numpy(),
                                     f_t.detach().cpu().double().numpy())
        z = torch.cat([f_s, f_t])
        d2 = pairwise_sqdist(z, z)
        k = sum(torch.exp(-d2 / (2.0 * s2)) for s2 in self.sigma2s(sigma)) / self.n_kernels
        kss, ktt, kst = k[:n, :n], k[n:, n:], k[:n, n:]
        if self.estimator == "unbiased":
            # the diagonals are k(x, x) = 1 for every Gaussian: drop them (Lemma 6)
            mmd2 = ((kss.sum() - kss.diagonal().sum()) / (n * (n - 1))
                    + (ktt.sum() - ktt.diagonal().sum()) / (m * (m - 1))
                    - 2.0 * kst.mean())
        else:
            mmd2 = kss.mean() + ktt.mean() - 2.0 * kst.mean()
        value = float(mmd2.detach())
        return AdapterOutput(mmd2, {"mmd2": value, "divergence": max(value, 0.0),
                                    "bandwidth": sigma})


__all__ = ["ESTIMATORS", "MMDAdapter", "pairwise_sqdist"]
