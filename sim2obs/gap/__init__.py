"""The sim-to-real gap: embedding-space distances, morphology statistics, reports, search.

* :mod:`sim2obs.gap.embedding` - Sinkhorn, MMD^2, classifier AUC, Fréchet, PRDC with intervals
* :mod:`sim2obs.gap.morphology` - magnitudes, colours, statmorph shapes, noise; KS/AD tests
* :mod:`sim2obs.gap.report` - ``sim2obs gap``: metrics.json, report.md/.html, figures
* :mod:`sim2obs.gap.search` - ``sim2obs similar`` and ``sim2obs anomalies``
"""

from sim2obs.gap.embedding import (
    c2st_auc,
    embedding_gap,
    frechet_distance,
    mmd2_unbiased,
    mmd_permutation_test,
    prdc,
    roc_auc,
    sinkhorn_divergence,
)

__all__ = [
    "c2st_auc",
    "embedding_gap",
    "frechet_distance",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "prdc",
    "roc_auc",
    "sinkhorn_divergence",
]
