"""DANN: domain-adversarial training with a gradient reversal layer.

Ganin et al. (2016, JMLR 17(59), "Domain-adversarial training of neural networks"). A domain
discriminator ``D: R^D -> R`` (a logit; source = 1, target = 0) is trained on the features through
a gradient reversal layer (:mod:`sim2obs.adapters.grl`)::

    loss = 1/2 [ mean_i BCE(D(R(f_s_i)), 1) + mean_j BCE(D(R(f_t_j)), 0) ]

Minimising ``task_loss + w * loss`` trains D to tell the domains apart and, through the reversed
gradient (factor ``lambda_p = 2 / (1 + exp(-10 p)) - 1`` of the training progress p, Ganin et al.
Sect. 5.2.2), drives the features to make the domains indistinguishable. The two domain terms are
averaged separately so that unequal batch sizes N != M weigh both domains equally (Ganin et al.
use equal source and target batches, where this is their plain mean BCE).

Shapes: ``f_s`` [N, D], ``f_t`` [M, D] -> scalar loss. ``y_s``, ``p_s``, ``p_t`` are ignored.

Diagnostics (floats): ``domain_loss`` (the balanced BCE above, nats), ``domain_acc`` (balanced
accuracy of D on this batch), ``lambda``, ``divergence`` = max(0, log 2 - domain_loss), a lower
bound on the Jensen-Shannon divergence between the two feature distributions that is tight for
the optimal discriminator (Goodfellow et al. 2014, NeurIPS, Theorem 1: min_D BCE = log 2 - JSD),
and ``proxy_a_distance`` = max(0, 2 (1 - 2 err)) with err the balanced error of D (Ben-David et
al. 2007, NeurIPS, "Analysis of representations for domain adaptation"). Both are computed on the
training batch, so they overestimate the divergence once D overfits; evaluate on held-out
batches in ``eval()`` mode for a fair number.

The adapter owns parameters (the discriminator): the training loop must put
``adapter.parameters()`` in its optimiser and move the adapter to the features' device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sim2obs.adapters.base import Adapter, AdapterOutput
from sim2obs.adapters.grl import DANN_GAMMA, dann_lambda, grad_reverse
from sim2obs.errors import Sim2ObsValueError

#: Dropout probability of the discriminator's hidden layers: 0.5, as in the official CDAN/DANN
#: PyTorch code (thuml/CDAN, ``network.AdversarialNetwork``, Long et al. 2018).
DISCRIMINATOR_DROPOUT = 0.5


class DomainDiscriminator(nn.Module):
    """MLP ``in_dim -> hidden -> ... -> hidden -> 1`` (a logit), ReLU and dropout after each hidden
    layer. Ganin et al. (2016) and Long et al. (2018) use two hidden layers of 1024 units on a
    256-d bottleneck; we default to two hidden layers whose width is set by the adapter.

    x [B, in_dim] -> logits [B].
    """

    def __init__(self, in_dim: int, hidden: int = 256, n_layers: int = 2,
                 dropout: float = DISCRIMINATOR_DROPOUT) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1 or n_layers < 0:
            raise Sim2ObsValueError(f"discriminator needs in_dim >= 1, hidden >= 1, n_layers >= 0; "
                                    f"got {in_dim}, {hidden}, {n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise Sim2ObsValueError(f"discriminator dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def balanced_domain_loss(logits_s: Tensor, logits_t: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Balanced BCE-with-logits of a domain discriminator (source = 1, target = 0) and its
    diagnostics (see the module docstring). logits_s [N], logits_t [M] -> (scalar, dict)."""
    loss_s = F.binary_cross_entropy_with_logits(logits_s, torch.ones_like(logits_s))
    loss_t = F.binary_cross_entropy_with_logits(logits_t, torch.zeros_like(logits_t))
    loss = 0.5 * (loss_s + loss_t)
    with torch.no_grad():
        acc = 0.5 * ((logits_s > 0).float().mean() + (logits_t <= 0).float().mean())
        value = float(loss)
        acc_f = float(acc)
    diagnostics = {
        "domain_loss": value,
        "domain_acc": acc_f,
        "divergence": max(0.0, math.log(2.0) - value),
        "proxy_a_distance": max(0.0, 2.0 * (1.0 - 2.0 * (1.0 - acc_f))),
    }
    return loss, diagnostics


def check_feature_dim(f_s: Tensor, expected: int, who: str) -> None:
    """The features' dimension must be the one the adapter's discriminator was built for."""
    if f_s.shape[1] != expected:
        raise Sim2ObsValueError(f"{who} was built for feature_dim={expected} but got features of "
                                f"dimension {f_s.shape[1]}")


class DANN(Adapter):
    """Domain-adversarial alignment (Ganin et al. 2016); see the module docstring.

    ``feature_dim``: D. ``hidden``/``n_layers``/``dropout``: discriminator MLP. ``gamma``,
    ``lambda_max``: reversal-factor schedule ``lambda_max (2 / (1 + exp(-gamma p)) - 1)``; with
    ``schedule=False`` the factor is ``lambda_max`` throughout.
    """

    name = "dann"

    def __init__(self, feature_dim: int, hidden: int = 256, *, n_layers: int = 2,
                 dropout: float = DISCRIMINATOR_DROPOUT, gamma: float = DANN_GAMMA,
                 lambda_max: float = 1.0, schedule: bool = True) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.gamma = float(gamma)
        self.lambda_max = float(lambda_max)
        self.schedule = bool(schedule)
        self.discriminator = DomainDiscriminator(self.feature_dim, hidden, n_layers, dropout)

    def current_lambda(self) -> float:
        """The gradient-reversal factor at ``self.progress``."""
        if not self.schedule:
            return self.lambda_max
        return dann_lambda(self.progress, self.gamma, self.lambda_max)

    def forward(self, f_s: Tensor, f_t: Tensor, *, y_s: Tensor | None = None,
                p_s: Tensor | None = None, p_t: Tensor | None = None) -> AdapterOutput:
        self.check_features(f_s, f_t)
        check_feature_dim(f_s, self.feature_dim, "DANN")
        lam = self.current_lambda()
        z = grad_reverse(torch.cat([f_s, f_t]), lam)
        logits = self.discriminator(z)
        n = f_s.shape[0]
        loss, diagnostics = balanced_domain_loss(logits[:n], logits[n:])
        diagnostics["lambda"] = lam
        return AdapterOutput(loss, diagnostics)


__all__ = ["DANN", "DomainDiscriminator", "balanced_domain_loss"]
