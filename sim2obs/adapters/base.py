"""The common interface of the alignment methods (adapters).

An adapter is a small ``nn.Module`` with one job: given a batch of source features ``f_s``
(``[N, D]``), target features ``f_t`` (``[M, D]``) and, for the methods that need them, the
standardised source labels ``y_s`` (``[N, L]``, NaN where missing) and the head's predictions on
both domains (``p_s``, ``p_t``: ``[N, L]``, ``[M, L]`` standardised means), it returns an
:class:`AdapterOutput`: a scalar ``loss`` to be *added* to the task loss (adversarial methods
put a gradient-reversal layer inside, so minimising the sum is the right thing for every method)
and a dict of float ``diagnostics`` for the log.

``set_progress(p)`` with ``p`` in [0, 1] (fraction of training done) drives schedules such as
DANN's lambda. ``divergence`` (a float, >= 0, ~0 for identical distributions) is what tests and
reports use to compare methods on point clouds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sim2obs.errors import Sim2ObsValueError


@dataclass
class AdapterOutput:
    """Result of one adapter evaluation: a scalar loss (added to the task loss) and diagnostics."""

    loss: Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.loss, Tensor) or self.loss.dim() != 0:
            raise Sim2ObsValueError("AdapterOutput.loss must be a scalar tensor")


class Adapter(nn.Module):
    """Base class: see the module docstring. Subclasses set ``name`` and implement ``forward``."""

    name: str = "base"
    #: True when ``forward`` uses the head's predictions (``p_s``/``p_t``) or source labels.
    needs_predictions: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        """Fraction of training done, in [0, 1]; drives schedules (e.g. DANN's lambda)."""
        self.progress = float(min(max(progress, 0.0), 1.0))

    def forward(self, f_s: Tensor, f_t: Tensor, *, y_s: Tensor | None = None,
                p_s: Tensor | None = None, p_t: Tensor | None = None) -> AdapterOutput:
        raise NotImplementedError

    @staticmethod
    def check_features(f_s: Tensor, f_t: Tensor) -> None:
        """Same feature dimension, 2-D, finite; a clear error otherwise."""
        if f_s.dim() != 2 or f_t.dim() != 2:
            raise Sim2ObsValueError(f"adapter features must be [N, D]; got {tuple(f_s.shape)} and "
                                    f"{tuple(f_t.shape)}")
        if f_s.shape[1] != f_t.shape[1]:
            raise Sim2ObsValueError(f"source and target feature dimensions differ: {f_s.shape[1]} vs "
                                    f"{f_t.shape[1]}")
        if f_s.shape[0] < 2 or f_t.shape[0] < 2:
            raise Sim2ObsValueError("adapters need at least 2 source and 2 target samples per batch")


class NoAdapter(Adapter):
    """Source-only baseline (``--method none``): zero alignment loss."""

    name = "none"

    def forward(self, f_s: Tensor, f_t: Tensor, *, y_s: Tensor | None = None,
                p_s: Tensor | None = None, p_t: Tensor | None = None) -> AdapterOutput:
        self.check_features(f_s, f_t)
        return AdapterOutput(torch.zeros((), device=f_s.device, dtype=f_s.dtype))
