"""Self-supervised losses and collapse diagnostics.

* :class:`NTXentLoss` -- normalised-temperature cross entropy of SimCLR (Chen et al. 2020, ICML,
  "A Simple Framework for Contrastive Learning of Visual Representations", eq. 1).
* :class:`VICRegLoss` -- variance-invariance-covariance regularisation (Bardes, Ponce & LeCun
  2022, ICLR, "VICReg", eqs. 1-6).
* :func:`embedding_std`, :func:`effective_rank` -- dimensional-collapse diagnostics (the std of
  l2-normalised outputs of Chen & He 2021, SimSiam, Sec. 4.1; the effective rank of Roy &
  Vetterli 2007, EUSIPCO, used as "RankMe" by Garrido et al. 2023).

All inputs are embeddings of two augmented views ``z1, z2`` of shape ``(N, D)``, row ``i`` of
both coming from the same image. Losses are computed in float32 whatever the input dtype, with
autocast switched off inside them (under a caller's bf16/fp16 autocast, the similarity logits
and VICReg's covariance would otherwise be low-precision matmuls).

Distributed training: with ``gather=True`` and an initialised process group of more than one
rank, embeddings are all-gathered differentiably (:class:`_AllGather`: ``all_gather`` forward,
its backward sums the gradients of every rank into the local slice, as the deprecated
``torch.distributed.nn.functional.all_gather`` does), so each rank's loss sees the global batch. With DDP's gradient averaging, the parameter gradient then
equals that of the loss over the global batch. Without ``gather`` (or in a single process),
``torch.distributed`` is never touched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sim2obs.errors import Sim2ObsValueError


def _check_pair(z1: Tensor, z2: Tensor, name: str, min_n: int = 1) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise Sim2ObsValueError(
            f"{name}: z1 and z2 must both be (N, D) with the same shape, got "
            f"{tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < min_n:
        raise Sim2ObsValueError(f"{name}: needs a batch of at least {min_n} pairs, got {z1.shape[0]}")


def _distributed_world() -> tuple[int, int]:
    """(rank, world size) when a process group is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """``(N, D)`` on each of W ranks -> ``(W N, D)``, rank order. Backward: the gradient of the
    gathered tensor summed over ranks (each rank's loss depends on every rank's slice), of which
    this rank keeps its own rows -- one ``all_reduce`` (public ``torch.distributed`` API only)."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(), z.shape[0]
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()  # all_reduce works in place; autograd's own stays intact
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(z: Tensor) -> Tensor:
    """Concatenate ``z`` (N, D) of every rank into (world * N, D), differentiably.

    Every rank must pass the same N. Returns ``z`` itself outside a multi-rank process group.
    """
    _, world = _distributed_world()
    if world == 1:
        return z
    return _AllGather.apply(z.contiguous())


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss: ``(z1 (N, D), z2 (N, D)) -> scalar``.

    With u = z / ||z|| and the 2N views ``u_1..u_2N`` (``z1`` then ``z2``), for a view ``i`` with
    positive partner ``j(i)`` (the other view of the same image)::

        l_i = -log[ exp(u_i . u_j(i) / t) / sum_{k != i} exp(u_i . u_k / t) ]
        loss = (1 / 2N) sum_i l_i

    so each view has 1 positive and 2N - 2 negatives. The loss is symmetric in ``z1, z2``.
    With ``gather=True`` under DDP, the keys ``u_k`` run over the global batch of all ranks while
    the queries ``u_i`` are the local views.
    """

    def __init__(self, temperature: float = 0.1, gather: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise Sim2ObsValueError(f"NTXentLoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather = bool(gather)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        _check_pair(z1, z2, "NTXentLoss")
        with torch.autocast(z1.device.type, enabled=False):
            return self._loss(z1, z2)

    def _loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        n = z1.shape[0]
        u1 = F.normalize(z1.float(), dim=1)
        u2 = F.normalize(z2.float(), dim=1)
        rank, world = _distributed_world() if self.gather else (0, 1)
        if world > 1:
            k1, k2 = gather_with_grad(u1), gather_with_grad(u2)
        else:
            k1, k2 = u1, u2
        queries = torch.cat([u1, u2])  # (2N, D): local views
        keys = torch.cat([k1, k2])  # (2WN, D): views of every rank, z1 block then z2 block
        logits = queries @ keys.T / self.temperature  # (2N, 2WN)
        total = world * n
        local = torch.arange(n, device=logits.device) + rank * n
        self_idx = torch.cat([local, local + total])
        pos_idx = torch.cat([local + total, local])
        rows = torch.arange(2 * n, device=logits.device)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[rows, self_idx] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        return F.cross_entropy(logits, pos_idx)


class VICRegLoss(nn.Module):
    """VICReg loss: ``(z1 (N, D), z2 (N, D)) -> (total, {"invariance", "variance", "covariance"})``.

    Terms (Bardes et al. 2022; coefficients lambda, mu, nu = sim, std, cov)::

        invariance s = (1 / (N D)) sum_{i,d} (z1_id - z2_id)^2                  (mean squared error)
        variance   v = 1/2 sum_{z in z1,z2} (1/D) sum_d relu(1 - sqrt(Var_N(z_d) + eps))
        covariance c = sum_{z in z1,z2} (1/D) sum_{d != e} C(z)_de^2,
                       C(z) = (z - mean)^T (z - mean) / (N - 1)
        total = lambda s + mu v + nu c

    matching the authors' reference implementation (variance averaged, covariance summed over
    the two branches). Needs N >= 2 (a variance over one sample is undefined). The returned terms
    are the unweighted values, detached, for logging. With ``gather=True`` under DDP the
    variance and covariance use the global batch (as the reference implementation does).
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4, gather: bool = False) -> None:
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = float(sim_coeff), float(std_coeff), float(cov_coeff)
        self.eps = float(eps)
        self.gather = bool(gather)

    @staticmethod
    def invariance(z1: Tensor, z2: Tensor) -> Tensor:
        """Mean squared distance between the two views."""
        return F.mse_loss(z1, z2)

    def variance(self, z: Tensor) -> Tensor:
        """Hinge on the per-dimension standard deviation, mean over dimensions."""
        std = torch.sqrt(z.var(dim=0) + self.eps)
        return F.relu(1.0 - std).mean()

    @staticmethod
    def covariance(z: Tensor) -> Tensor:
        """Sum of squared off-diagonal covariances divided by D."""
        n, d = z.shape
        zc = z - z.mean(dim=0)
        cov = zc.T @ zc / (n - 1)
        off = cov - torch.diag_embed(torch.diagonal(cov))
        return off.pow(2).sum() / d

    def forward(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        _check_pair(z1, z2, "VICRegLoss", min_n=2)
        with torch.autocast(z1.device.type, enabled=False):
            return self._loss(z1, z2)

    def _loss(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = z1.float(), z2.float()
        inv = self.invariance(z1, z2)
        if self.gather:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        var = 0.5 * (self.variance(z1) + self.variance(z2))
        cov = self.covariance(z1) + self.covariance(z2)
        total = self.sim_coeff * inv + self.std_coeff * var + self.cov_coeff * cov
        terms = {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
        return total, terms


@torch.no_grad()
def embedding_std(z: Tensor, normalize: bool = False) -> float:
    """Mean over dimensions of the per-dimension standard deviation of ``z`` (N, D).

    Near 0 means collapse to a point. With ``normalize=True`` the rows are first l2-normalised;
    SimSiam (Chen & He 2021, Fig. 2) shows that a healthy representation then has a value close to
    ``1 / sqrt(D)``.
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise Sim2ObsValueError(f"embedding_std: needs (N >= 2, D) embeddings, got {tuple(z.shape)}")
    z = z.float()
    if normalize:
        z = F.normalize(z, dim=1)
    return float(z.std(dim=0).mean())


@torch.no_grad()
def effective_rank(z: Tensor, center: bool = False) -> float:
    """Effective rank of ``z`` (N, D) (Roy & Vetterli 2007): ``exp(H(p))``.

    ``p_k = s_k / sum_k s_k`` are the normalised singular values and ``H = -sum p_k log p_k``
    their Shannon entropy (natural log). It lies between 1 (rank one: complete dimensional
    collapse) and ``min(N, D)`` (all singular values equal). ``center=True`` subtracts the mean
    embedding first (then a collapse to a point gives 0's and returns 0).
    """
    if z.ndim != 2:
        raise Sim2ObsValueError(f"effective_rank: needs (N, D) embeddings, got {tuple(z.shape)}")
    z = z.double()
    if center:
        z = z - z.mean(dim=0)
    s = torch.linalg.svdvals(z)
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(math.exp(float(-(p * p.log()).sum())))
