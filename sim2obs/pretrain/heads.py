"""Projection and prediction heads for self-supervised pretraining.

* :class:`ProjectionHead` -- the MLP ``g`` between encoder and loss of SimCLR (Chen et al. 2020,
  ICML, "A Simple Framework for Contrastive Learning of Visual Representations", Sec. 2.1) and
  the "expander" of VICReg (Bardes, Ponce & LeCun 2022, ICLR, Sec. 4.2). The loss is computed on
  ``z = g(h)`` while the representation kept for downstream use is ``h``.
* :class:`PredictionHead` -- the small bottleneck MLP of BYOL (Grill et al. 2020) and SimSiam
  (Chen & He 2021) applied to one branch only.

Maths. With ``n_layers = L``: ``z = W_L relu(BN(W_{L-1} ... relu(BN(W_1 h))))``; hidden layers
have no bias (BatchNorm follows). ``last_bn=True`` adds an affine-free BatchNorm on the output
(SimCLR v2 / MoCo v3 style).

Shapes: ``(N, in_dim) -> (N, out_dim)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from sim2obs.errors import Sim2ObsValueError


class ProjectionHead(nn.Module):
    """MLP projection head with BatchNorm: ``(N, in_dim) -> (N, out_dim)``.

    ``n_layers=1`` is a single linear map; ``n_layers=2`` is SimCLR's head; VICReg uses 3 layers
    of width 8192 (``hidden_dim=out_dim=8192``).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128,
                 n_layers: int = 2, batch_norm: bool = True, last_bn: bool = False) -> None:
        super().__init__()
        if n_layers < 1:
            raise Sim2ObsValueError(f"ProjectionHead: n_layers must be >= 1, got {n_layers}")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise Sim2ObsValueError(
                f"ProjectionHead: dimensions must be >= 1 (in {in_dim}, hidden {hidden_dim}, out {out_dim})"
            )
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(n_layers - 1):
            layers.append(nn.Linear(d, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class PredictionHead(nn.Module):
    """BYOL/SimSiam predictor ``Linear -> BN -> ReLU -> Linear``: ``(N, in_dim) -> (N, out_dim)``."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
