"""Deep CORAL: align the second-order statistics (covariances) of the two feature clouds.

Sun & Saenko (2016, ECCV 2016 Workshops (TASK-CV), "Deep CORAL: correlation alignment for deep
domain adaptation", eq. 1-3)::

    loss = || C_s - C_t ||_F^2 / (4 d^2),
    C_s  = (F_s^T F_s - (1^T F_s)^T (1^T F_s) / N) / (N - 1)      (unbiased covariance, [d, d])

and the same for C_t, with F_s = ``f_s`` [N, d], F_t = ``f_t`` [M, d]. The loss is blind to a
shift of the means (the covariances are centred): use it with features whose means the task
loss or another term already aligns, or pick a mean-sensitive method (MMD, Sinkhorn, DANN).

The 1 / (4 d^2) normalisation is the paper's; it makes the value small for wide features (for
standardised features, whose covariance entries are O(1), the loss is O(1/d^2) times the number
of mismatched entries). Sun & Saenko choose the CORAL weight so that the task and CORAL losses are
of the same order at the end of training.

Shapes: ``f_s`` [N, d], ``f_t`` [M, d] -> scalar. Diagnostics: ``divergence`` (the loss value)
and ``cov_frobenius`` = ||C_s - C_t||_F.
"""

from __future__ import annotations

from torch import Tensor

from sim2obs.adapters.base import Adapter, AdapterOutput


def covariance(x: Tensor) -> Tensor:
    """Unbiased covariance of the rows of ``x`` [n, d] -> [d, d] (Sun & Saenko 2016, eq. 2-3)."""
    xc = x - x.mean(dim=0, keepdim=True)
    return xc.T @ xc / (x.shape[0] - 1)


class CORAL(Adapter):
    """Deep CORAL loss (Sun & Saenko 2016); no options. See the module docstring."""

    name = "coral"

    def forward(self, f_s: Tensor, f_t: Tensor, *, y_s: Tensor | None = None,
                p_s: Tensor | None = None, p_t: Tensor | None = None) -> AdapterOutput:
        self.check_features(f_s, f_t)
        d = f_s.shape[1]
        diff = covariance(f_s) - covariance(f_t)
        sq = (diff * diff).sum()
        loss = sq / (4.0 * d * d)
        return AdapterOutput(loss, {"divergence": float(loss.detach()),
                                    "cov_frobenius": float(sq.detach().sqrt())})


__all__ = ["CORAL", "covariance"]
