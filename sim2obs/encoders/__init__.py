"""Image encoders (backbones) for multi-band galaxy stamps.

``build(name, in_bands, embed_dim, **kwargs)`` returns an ``nn.Module`` mapping a
``(N, in_bands, H, W)`` batch to ``(N, embed_dim)`` embeddings. Every encoder exposes
``.embed_dim``, ``.in_bands`` and ``.config()``; ``build(**encoder.config())`` rebuilds it
(checkpoints store that dict next to the weights).

=========  ==========================================  ===============================
name       class                                       paper
=========  ==========================================  ===============================
resnet     :class:`~sim2obs.encoders.resnet.ResNetEncoder`  He et al. 2016
vit        :class:`~sim2obs.encoders.vit.ViTEncoder`        Dosovitskiy et al. 2021
=========  ==========================================  ===============================
"""

from __future__ import annotations

from torch import nn

from sim2obs.encoders.resnet import ResNetEncoder
from sim2obs.encoders.vit import ViTEncoder
from sim2obs.errors import Sim2ObsKeyError, Sim2ObsValueError

ENCODERS: dict[str, type[nn.Module]] = {"resnet": ResNetEncoder, "vit": ViTEncoder}

__all__ = ["ENCODERS", "ResNetEncoder", "ViTEncoder", "build", "names"]


def names() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted(ENCODERS)


def build(name: str, in_bands: int, embed_dim: int = 128, **kwargs) -> nn.Module:
    """Build the encoder ``name`` for ``in_bands`` input bands and ``embed_dim`` outputs.

    ``kwargs`` go to the encoder class (e.g. ``width``, ``depths``, ``norm`` for ``resnet``;
    ``patch_size``, ``dim``, ``depth``, ``heads`` for ``vit``). Unknown names raise
    :class:`~sim2obs.errors.Sim2ObsKeyError`; unknown keyword arguments a
    :class:`~sim2obs.errors.Sim2ObsValueError` that lists the accepted ones.
    """
    key = str(name).lower()
    if key not in ENCODERS:
        raise Sim2ObsKeyError(f"unknown encoder '{name}'; available: {', '.join(names())}")
    cls = ENCODERS[key]
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise Sim2ObsValueError(
            f"encoder '{key}' got unknown argument(s) {unknown}; accepted: {accepted}"
        )
    return cls(in_bands=in_bands, embed_dim=embed_dim, **kwargs)
