"""CDAN: conditional domain-adversarial alignment, adapted to regression heads.

Long et al. (2018, NeurIPS, "Conditional adversarial domain adaptation"). Like DANN
(:mod:`sim2obs.adapters.dann`) but the domain discriminator sees the joint variable of the
features ``f`` [B, D] and the head's predictions ``g`` [B, L'] through a multilinear map, so it
aligns the *joint* distribution of (features, predictions) rather than the features' marginal::

    T(f, g) = f (x) g  (outer product, flattened to D L')           if D L' <= 4096,
    T(f, g) = (R_f f) * (R_g g) / sqrt(d)   (randomized map)         otherwise,

with R_f [d, D], R_g [d, L'] fixed standard-normal matrices drawn once (a seeded generator,
saved as buffers) and d = 1024: the threshold 4096 and d = 1024 are those of Long et al.
(2018, randomized multilinear conditioning and experimental setup); the 1/sqrt(d) normalisation is that of their official code (thuml/CDAN,
``network.RandomLayer``). The loss is DANN's balanced BCE through a gradient reversal layer on
``f`` with the same lambda schedule (Long et al. use Ganin's schedule, gamma = 10)::

    loss = 1/2 [ mean_i BCE(D(T(R(f_s_i), g_s_i)), 1) + mean_j BCE(D(T(R(f_t_j), g_t_j)), 0) ].

**Regression.** For classification g is the softmax output. Here the head regresses L
standardised labels, so ``g = [p, 1]`` (L' = L + 1) with ``p`` the head's predicted standardised
means (``p_s`` [N, L], ``p_t`` [M, L]): the constant 1 puts ``f`` itself in T(f, g), so the
discriminator also sees the unconditioned features (DANN is the special case L = 0) and the
``f p_l`` blocks carry the feature-prediction cross-covariance that CDAN conditions on. ``g`` is
detached, as in the official code (``softmax_output.detach()`` in thuml/CDAN ``loss.CDAN``): the
adversarial gradient reaches the encoder through ``f`` only and never pushes the regression head
to make domain-confusing predictions.

**No entropy conditioning.** CDAN+E weights each example by ``1 + exp(-H(g))``, the certainty of
a class posterior. Point predictions of a regression head have no entropy (and no calibrated
spread is passed in), so every example gets weight 1: this is plain CDAN, without "+E".

Diagnostics as DANN (``domain_loss``, ``domain_acc``, ``divergence`` = max(0, log 2 -
domain_loss), ``proxy_a_distance``, ``lambda``) plus ``randomized`` (1.0 when the randomized map
is used). The adapter owns parameters: put ``adapter.parameters()`` in the optimiser.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sim2obs.adapters.base import Adapter, AdapterOutput
from sim2obs.adapters.dann import (
    DISCRIMINATOR_DROPOUT,
    DomainDiscriminator,
    balanced_domain_loss,
    check_feature_dim,
)
from sim2obs.adapters.grl import DANN_GAMMA, dann_lambda, grad_reverse
from sim2obs.errors import Sim2ObsValueError

#: Largest D * (L + 1) for the exact multilinear map; above it the randomized map is used
#: (Long et al. 2018: exact multilinear map when its dimension is <= 4096).
MAX_MULTILINEAR_DIM = 4096
#: Output dimension d of the randomized multilinear map (Long et al. 2018: d = 1024).
RANDOM_DIM = 1024


def check_predictions(p: Tensor | None, n: int, n_labels: int, which: str, who: str) -> Tensor:
    """``p`` must be a finite [n, n_labels] tensor; a clear error otherwise."""
    if p is None:
        raise Sim2ObsValueError(
            f"{who} needs the head's predictions {which} (standardised predicted means, shape "
            f"[{'N' if which.endswith('s') else 'M'}, L]); the training loop must pass "
            f"p_s=head(f_s) and p_t=head(f_t) when adapter.needs_predictions is True")
    if p.dim() != 2 or p.shape[0] != n or p.shape[1] != n_labels:
        raise Sim2ObsValueError(f"{who}: {which} must have shape [{n}, {n_labels}], got "
                                f"{tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise Sim2ObsValueError(f"{who}: {which} contains NaN or inf")
    return p


class CDAN(Adapter):
    """Conditional adversarial alignment (Long et al. 2018) on ``[p, 1]``; see the module docstring.

    ``feature_dim``: D; ``n_labels``: L (columns of ``p_s``/``p_t``). ``hidden``, ``n_layers``,
    ``dropout``: discriminator MLP. ``max_multilinear_dim``, ``random_dim``: switch to and size of
    the randomized map. ``seed``: generator seed of the random matrices. ``gamma``,
    ``lambda_max``, ``schedule``: reversal factor, as :class:`~sim2obs.adapters.dann.DANN`.
    """

    name = "cdan"
    needs_predictions = True

    def __init__(self, feature_dim: int, n_labels: int, hidden: int = 256, *, n_layers: int = 2,
                 dropout: float = DISCRIMINATOR_DROPOUT,
                 max_multilinear_dim: int = MAX_MULTILINEAR_DIM, random_dim: int = RANDOM_DIM,
                 seed: int = 0, gamma: float = DANN_GAMMA, lambda_max: float = 1.0,
                 schedule: bool = True) -> None:
        super().__init__()
        if feature_dim < 1 or n_labels < 1:
            raise Sim2ObsValueError(f"CDAN needs feature_dim >= 1 and n_labels >= 1, got "
                                    f"{feature_dim} and {n_labels}")
        self.feature_dim = int(feature_dim)
        self.n_labels = int(n_labels)
        self.gamma = float(gamma)
        self.lambda_max = float(lambda_max)
        self.schedule = bool(schedule)
        joint = self.feature_dim * (self.n_labels + 1)
        self.randomized = joint > max_multilinear_dim
        if self.randomized:
            gen = torch.Generator().manual_seed(int(seed))
            self.register_buffer("r_f", torch.randn(self.feature_dim, random_dim, generator=gen))
            self.register_buffer("r_g", torch.randn(self.n_labels + 1, random_dim, generator=gen))
            in_dim = int(random_dim)
        else:
            in_dim = joint
        self.discriminator = DomainDiscriminator(in_dim, hidden, n_layers, dropout)

    def current_lambda(self) -> float:
        """The gradient-reversal factor at ``self.progress``."""
        if not self.schedule:
            return self.lambda_max
        return dann_lambda(self.progress, self.gamma, self.lambda_max)

    def joint_map(self, f: Tensor, p: Tensor) -> Tensor:
        """T(f, [p, 1]): f [B, D], p [B, L] -> [B, D (L + 1)] or [B, d] (randomized)."""
        g = torch.cat([p.detach().to(f.dtype), f.new_ones(f.shape[0], 1)], dim=1)
        if self.randomized:
            return (f @ self.r_f.to(f.dtype)) * (g @ self.r_g.to(f.dtype)) / math.sqrt(
                self.r_f.shape[1])
        return (f.unsqueeze(2) * g.unsqueeze(1)).flatten(1)

    def forward(self, f_s: Tensor, f_t: Tensor, *, y_s: Tensor | None = None,
                p_s: Tensor | None = None, p_t: Tensor | None = None) -> AdapterOutput:
        self.check_features(f_s, f_t)
        check_feature_dim(f_s, self.feature_dim, "CDAN")
        p_s = check_predictions(p_s, f_s.shape[0], self.n_labels, "p_s", "CDAN")
        p_t = check_predictions(p_t, f_t.shape[0], self.n_labels, "p_t", "CDAN")
        lam = self.current_lambda()
        f = grad_reverse(torch.cat([f_s, f_t]), lam)
        logits = self.discriminator(self.joint_map(f, torch.cat([p_s, p_t])))
        n = f_s.shape[0]
        loss, diagnostics = balanced_domain_loss(logits[:n], logits[n:])
        diagnostics["lambda"] = lam
        diagnostics["randomized"] = float(self.randomized)
        return AdapterOutput(loss, diagnostics)


__all__ = ["CDAN", "MAX_MULTILINEAR_DIM", "RANDOM_DIM"]
