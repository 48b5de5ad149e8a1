"""Domain adapters: align simulated (source) and real (target) embeddings.

One module per method; :func:`build` makes one by name. The adaptation loop is in
:mod:`sim2obs.adapters.loop`.
"""

from __future__ import annotations

from sim2obs.adapters.base import Adapter, AdapterOutput, NoAdapter
from sim2obs.errors import Sim2ObsValueError

METHODS = ("none", "dann", "cdan", "sinkhorn", "mmd", "coral", "jdot")


def build(method: str, feature_dim: int, n_labels: int, **options) -> Adapter:
    """An adapter by name (one of :data:`METHODS`); ``options`` go to its constructor."""
    method = method.lower()
    if method == "none":
        return NoAdapter()
    if method == "dann":
        from sim2obs.adapters.dann import DANN

        return DANN(feature_dim, **options)
    if method == "cdan":
        from sim2obs.adapters.cdan import CDAN

        return CDAN(feature_dim, n_labels, **options)
    if method == "sinkhorn":
        from sim2obs.adapters.sinkhorn import SinkhornAdapter

        return SinkhornAdapter(**options)
    if method == "mmd":
        from sim2obs.adapters.mmd import MMDAdapter

        return MMDAdapter(**options)
    if method == "coral":
        from sim2obs.adapters.coral import CORAL

        return CORAL(**options)
    if method == "jdot":
        from sim2obs.adapters.jdot import JDOT

        return JDOT(**options)
    raise Sim2ObsValueError(f"unknown adaptation method {method!r}; choose one of {', '.join(METHODS)}")


__all__ = ["METHODS", "Adapter", "AdapterOutput", "NoAdapter", "build"]
