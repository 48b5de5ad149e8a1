"""Self-supervised pretraining: augmentations, losses, projection heads (training loop elsewhere).

* :mod:`sim2obs.pretrain.augment` -- batched, seeded, physically motivated augmentations
* :mod:`sim2obs.pretrain.reobserve` -- worse seeing + dust + shallower depth with consistent noise
* :mod:`sim2obs.pretrain.losses` -- NT-Xent (SimCLR), VICReg, collapse diagnostics
* :mod:`sim2obs.pretrain.heads` -- projection and prediction MLP heads
"""

from __future__ import annotations

from sim2obs.pretrain.heads import PredictionHead, ProjectionHead
from sim2obs.pretrain.losses import NTXentLoss, VICRegLoss, effective_rank, embedding_std

__all__ = [
    "NTXentLoss", "PredictionHead", "ProjectionHead", "VICRegLoss", "effective_rank",
    "embedding_std",
]
