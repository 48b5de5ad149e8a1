"""Gradient reversal layer and the DANN adaptation-factor schedule.

Ganin et al. (2016, JMLR 17(59), "Domain-adversarial training of neural networks"): the
*gradient reversal layer* R_lambda is the identity in the forward pass and multiplies the
incoming gradient by ``-lambda`` in the backward pass::

    R(x) = x,        dR/dx = -lambda I.

Putting R between the features and a domain discriminator D, *minimising* the single sum
``task_loss + BCE(D(R(f)), domain)`` trains D to tell the domains apart (its parameters see
the plain BCE gradient) while the feature extractor receives ``-lambda`` times that gradient,
i.e. it ascends the discriminator's loss: Ganin et al.'s saddle-point problem solved with a
single optimiser and a single backward pass.

The adaptation factor ``lambda`` ramps from 0 to 1 with the training progress p in [0, 1]
(Ganin et al. 2016, Sect. 5.2.2: it damps the noisy signal of the still-untrained domain
classifier early in training)::

    lambda_p = 2 / (1 + exp(-gamma p)) - 1,     gamma = 10.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sim2obs.errors import Sim2ObsValueError

#: gamma of the lambda schedule: 10, the value of Ganin et al. (2016), Sect. 5.2.2, in all runs.
DANN_GAMMA = 10.0


class _GradReverse(torch.autograd.Function):
    """Identity forward, ``-lambda * grad`` backward (the GRL of Ganin et al. 2016)."""

    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:  # type: ignore[override]
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.lambd * grad_output, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``-lambd`` on the way back.

    x: any shape -> same shape. ``lambd`` is a plain float (not differentiated).
    """
    lambd = float(lambd)
    if not math.isfinite(lambd) or lambd < 0:
        raise Sim2ObsValueError(f"gradient-reversal factor must be finite and >= 0, got {lambd}")
    return _GradReverse.apply(x, lambd)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` with a settable factor ``lambd``."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


def dann_lambda(progress: float, gamma: float = DANN_GAMMA, lambda_max: float = 1.0) -> float:
    """Ganin et al. (2016) schedule ``lambda_max * (2 / (1 + exp(-gamma p)) - 1)``, p in [0, 1].

    0 at the start of training, ~``lambda_max`` (0.9999 of it for gamma = 10) at the end.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return float(lambda_max) * (2.0 / (1.0 + math.exp(-float(gamma) * p)) - 1.0)


__all__ = ["DANN_GAMMA", "GradientReversal", "dann_lambda", "grad_reverse"]
