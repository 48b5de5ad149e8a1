"""DeepJDOT for regression: optimal transport on the joint (feature, label) space.

Courty et al. (2017, NeurIPS, "Joint distribution optimal transportation for domain
adaptation") and its deep version, Damodaran et al. (2018, ECCV, "DeepJDOT"). Each mini-batch
couples source examples (features ``f_s_i``, labels ``y_s_i``) to target examples (features
``f_t_j``, head predictions ``p_t_j``) with the cost::

    C_ij = alpha |f_s_i - f_t_j|^2 + lambda_t sum_{l: y_s_il finite} (y_s_il - p_t_jl)^2

(squared Euclidean for both terms, as the official DeepJDOT code: ``cdist(..., 'sqeuclidean')``
for the features and, for one-hot classes, for the labels; here the labels are the standardised
regression targets). Label dimensions that are NaN in ``y_s_i`` (missing labels) are left out of
that row's label cost; a source row with no finite label is transported on its features only.

The coupling gamma [N, M] solves the exact OT problem with uniform marginals 1/N, 1/M on the
*detached* cost (Damodaran et al. alternate: gamma fixed, then a gradient step on the networks)::

    gamma = argmin_{pi in U(1/N, 1/M)} <pi, C>,        loss = sum_ij gamma_ij C_ij,

and the loss is differentiated through C only (gamma is a constant): the gradient pulls each
target feature toward the source features it is coupled to and trains the head on the target to
predict the transported source labels. ``solver="emd"`` uses POT's network simplex ``ot.emd``
(exact, the official DeepJDOT choice; POT is an optional dependency, imported lazily);
``solver="sinkhorn"`` a log-domain entropic Sinkhorn in torch with eps = ``sinkhorn_reg`` *
mean(C) (at most 1000 iterations, stopped when the rows' relative marginal error < 1e-6); ``"auto"``
(default) is "emd" when POT is installed, else "sinkhorn".

**Constants.** ``alpha = 1`` and ``lambda_t = 1`` (issue 4 defaults). The official code uses
``jdot_alpha = 0.01`` and a target-loss weight of 1 on raw CNN features; the right alpha makes
the two terms comparable: for standardised D-dim features |f_s - f_t|^2 ~ 2D while for
standardised L labels the label term ~ 2L, so alpha ~ L / D balances them.
``sinkhorn_reg = 0.01``: entropic scale 1 % of the mean cost (close to the exact plan while still
converging in a few hundred iterations at batch sizes of a few hundred).

Exact OT between two finite samples of one distribution is not ~0 in high dimension (it
shrinks like n^(-2/D)): ``divergence`` is 0 for identical clouds and grows with a shift, but its
floor at a given batch size is the mini-batch OT cost (W_2^2 ~ 4 for two n = 256 samples of
N(0, I_8), against 2 D = 16 for a random pairing).

Requires ``y_s`` [N, L] (NaN = missing) and ``p_t`` [M, L]; ``p_s`` is not used.
Diagnostics: ``divergence`` (the loss value), ``feature_cost`` = sum gamma alpha |f_s - f_t|^2,
``label_cost`` = sum gamma lambda_t |y_s - p_t|^2 (masked).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch
from torch import Tensor

from sim2obs.adapters.base import Adapter, AdapterOutput
from sim2obs.adapters.mmd import pairwise_sqdist
from sim2obs.errors import Sim2ObsValueError, require

SOLVERS = ("auto", "emd", "sinkhorn")
#: Entropic scale of the torch fallback, as a fraction of the mean cost (see module docstring).
SINKHORN_REG = 0.01
#: Iteration cap and stopping tolerance (max marginal error) of the torch Sinkhorn fallback.
SINKHORN_ITERS = 1000
SINKHORN_TOL = 1e-6
#: Iteration cap of POT's network simplex: 10x POT's default 1e5, which batches of a few
#: thousand can exhaust (POT then warns and returns a non-optimal plan).
EMD_MAX_ITER = 1_000_000


def pot_available() -> bool:
    """True when POT (module ``ot``) can be imported."""
    return importlib.util.find_spec("ot") is not None


def masked_label_cost(y_s: Tensor, p_t: Tensor) -> Tensor:
    """sum over the finite dims of y_s_i of (y_s_il - p_t_jl)^2: y_s [N, L], p_t [M, L] -> [N, M].

    Written as sum_l m_il y_il^2 - 2 sum_l m_il y_il p_jl + sum_l m_il p_jl^2 (m = finite mask)
    so that no [N, M, L] tensor is formed; clamped at 0 so rounding never makes a cost negative.
    """
    mask = torch.isfinite(y_s).to(p_t.dtype)
    y = torch.nan_to_num(y_s.to(p_t.dtype), nan=0.0, posinf=0.0, neginf=0.0) * mask
    c = (y * y).sum(1, keepdim=True) - 2.0 * y @ p_t.T + mask @ (p_t * p_t).T
    return c.clamp_min(0.0)


def sinkhorn_plan(cost: Tensor, eps: float, n_iter: int = SINKHORN_ITERS,
                  tol: float = SINKHORN_TOL) -> Tensor:
    """Entropic OT plan with uniform marginals by log-domain Sinkhorn (Cuturi 2013, NeurIPS;
    log-domain updates as Peyre & Cuturi 2019, "Computational optimal transport", Sect. 4.4).

    cost [N, M] (no gradient taken) -> plan [N, M], rows summing to 1/N, columns to 1/M.
    """
    c = cost.detach()
    c = c.float() if c.device.type == "mps" else c.double()  # MPS has no float64 (log domain: stable)
    n, m = c.shape
    log_a = torch.full((n,), -math.log(n), dtype=c.dtype, device=c.device)
    log_b = torch.full((m,), -math.log(m), dtype=c.dtype, device=c.device)
    f = torch.zeros(n, dtype=c.dtype, device=c.device)
    g = torch.zeros(m, dtype=c.dtype, device=c.device)
    for it in range(n_iter):
        f = eps * (log_a - torch.logsumexp((g[None, :] - c) / eps, dim=1))
        g = eps * (log_b - torch.logsumexp((f[:, None] - c) / eps, dim=0))
        # after the g update the columns are exact; every 10 iterations (one host sync each)
        # stop when the rows are too, to relative error tol
        if it % 10 == 9:
            rows = ((f[:, None] + g[None, :] - c) / eps).exp().sum(1)
            if float((rows * n - 1.0).abs().max()) < tol:
                break
    return ((f[:, None] + g[None, :] - c) / eps).exp()


class JDOT(Adapter):
    """DeepJDOT regression alignment (Damodaran et al. 2018); see the module docstring.

    ``alpha``: feature-cost weight; ``lambda_t``: label-cost weight; ``solver``: "auto", "emd"
    or "sinkhorn"; ``sinkhorn_reg``: fallback's eps as a fraction of the mean cost.
    """

    name = "jdot"
    needs_predictions = True

    def __init__(self, alpha: float = 1.0, lambda_t: float = 1.0, *, solver: str = "auto",
                 sinkhorn_reg: float = SINKHORN_REG) -> None:
        super().__init__()
        if not (alpha >= 0 and lambda_t >= 0 and math.isfinite(alpha) and math.isfinite(lambda_t)):
            raise Sim2ObsValueError(f"alpha and lambda_t must be finite and >= 0, got {alpha}, "
                                    f"{lambda_t}")
        if solver not in SOLVERS:
            raise Sim2ObsValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not sinkhorn_reg > 0:
            raise Sim2ObsValueError(f"sinkhorn_reg must be > 0, got {sinkhorn_reg}")
        self.alpha = float(alpha)
        self.lambda_t = float(lambda_t)
        self.solver = solver
        self.sinkhorn_reg = float(sinkhorn_reg)

    def resolved_solver(self) -> str:
        """"emd" or "sinkhorn" (what "auto" means here)."""
        if self.solver == "auto":
            return "emd" if pot_available() else "sinkhorn"
        return self.solver

    def costs(self, f_s: Tensor, f_t: Tensor, y_s: Tensor, p_t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha |f_s - f_t|^2, lambda_t masked |y_s - p_t|^2), each [N, M], differentiable."""
        return (self.alpha * pairwise_sqdist(f_s, f_t),
                self.lambda_t * masked_label_cost(y_s, p_t.to(f_s.dtype)))

    def plan(self, cost: Tensor) -> Tensor:
        """The coupling gamma [N, M] for the (detached) total cost [N, M], uniform marginals."""
        c = cost.detach()
        n, m = c.shape
        if self.resolved_solver() == "emd":
            ot = require("ot", extra="bench", package="pot")
            gamma = torch.from_numpy(ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m),
                                            c.double().cpu().numpy(), numItermax=EMD_MAX_ITER))
        else:
            scale = float(c.mean())
            gamma = sinkhorn_plan(c, self.sinkhorn_reg * (scale if scale > 0 else 1.0))
        return gamma.to(device=cost.device, dtype=cost.dtype)

    def check_inputs(self, f_s: Tensor, f_t: Tensor, y_s: Tensor | None,
                     p_t: Tensor | None) -> tuple[Tensor, Tensor]:
        """Shapes and presence of ``y_s`` [N, L] and ``p_t`` [M, L]; clear errors otherwise."""
        self.check_features(f_s, f_t)
        if y_s is None or p_t is None:
            missing = " and ".join(k for k, v in (("y_s", y_s), ("p_t", p_t)) if v is None)
            raise Sim2ObsValueError(
                f"JDOT needs the standardised source labels y_s [N, L] (NaN = missing) and the "
                f"head's target predictions p_t [M, L]; missing: {missing}. The training loop "
                "must pass them when adapter.needs_predictions is True")
        if y_s.dim() != 2 or y_s.shape[0] != f_s.shape[0]:
            raise Sim2ObsValueError(f"JDOT: y_s must have shape [{f_s.shape[0]}, L], got "
                                    f"{tuple(y_s.shape)}")
        if p_t.dim() != 2 or p_t.shape != (f_t.shape[0], y_s.shape[1]):
            raise Sim2ObsValueError(f"JDOT: p_t must have shape [{f_t.shape[0]}, {y_s.shape[1]}] "
                                    f"(M target rows, the L label columns of y_s), got "
                                    f"{tuple(p_t.shape)}")
        if not bool(torch.isfinite(p_t).all()):
            raise Sim2ObsValueError("JDOT: p_t contains NaN or inf")
        return y_s, p_t

    def forward(self, f_s: Tensor, f_t: Tensor, *, y_s: Tensor | None = None,
                p_s: Tensor | None = None, p_t: Tensor | None = None) -> AdapterOutput:
        y_s, p_t = self.check_inputs(f_s, f_t, y_s, p_t)
        c_feat, c_lab = self.costs(f_s, f_t, y_s, p_t)
        gamma = self.plan(c_feat + c_lab)
        feat = (gamma * c_feat).sum()
        lab = (gamma * c_lab).sum()
        loss = feat + lab
        return AdapterOutput(loss, {"divergence": float(loss.detach()),
                                    "feature_cost": float(feat.detach()),
                                    "label_cost": float(lab.detach())})


__all__ = ["JDOT", "SOLVERS", "masked_label_cost", "pot_available", "sinkhorn_plan"]
