"""ResNet-style convolutional encoder for multi-band galaxy stamps.

Paper: He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition" (CVPR), with
the CIFAR-style stem (a 3x3 convolution and no max-pool) that suits small astronomical stamps,
and the zero-initialised last normalisation of each residual branch of Goyal et al. 2017
("Accurate, Large Minibatch SGD", arXiv:1706.02677), so every block starts as the identity.

Maths. A basic block computes ``y = relu(x' + F(x))`` with ``F = norm o conv3x3 o relu o norm o
conv3x3`` and ``x'`` either ``x`` or a strided 1x1 projection when the width or resolution
changes. Stage ``s`` (0-based) has ``width * 2**s`` channels and halves the resolution for
``s > 0``. The final feature map is averaged over space (adaptive pooling, so any stamp size
works) and mapped linearly to the embedding.

Shapes::

    x          (N, in_bands, H, W)                       H, W >= min_stamp (16 by default)
    stem       (N, width, H / stem_stride, W / stem_stride)
    stage s    (N, width * 2**s, ~H / (stem_stride * 2**s), ...)
    pooled     (N, width * 2**(n_stages - 1))
    output     (N, embed_dim)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sim2obs.errors import Sim2ObsValueError

_NORMS = ("batch", "group")


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """BatchNorm2d (``'batch'``) or GroupNorm (``'group'``, Wu & He 2018) over ``channels``.

    For GroupNorm the number of groups is ``gcd(groups, channels)`` so that it always divides
    the channel count.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    raise Sim2ObsValueError(f"norm '{kind}' unknown; use one of {list(_NORMS)}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016, Fig. 2 left).

    ``(N, c_in, H, W) -> (N, c_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str = "batch",
                 groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out, groups)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), make_norm(norm, c_out, groups)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet encoder: (N, in_bands, H, W) -> (N, embed_dim).

    Parameters
    ----------
    in_bands : number of input bands (channels), any positive integer
    embed_dim : size of the output embedding
    width : channels of the first stage; stage ``s`` has ``width * 2**s``
    depths : number of basic blocks per stage, e.g. ``(2, 2, 2, 2)`` (ResNet-18 layout)
    norm : ``'batch'`` (BatchNorm) or ``'group'`` (GroupNorm; batch-size independent)
    groups : GroupNorm groups (ignored for BatchNorm)
    stem_stride : stride of the stem convolution (1 keeps full resolution; 2 for large stamps)
    min_stamp : smallest accepted H and W (a clear error below it)
    zero_init_residual : start every residual branch at zero (Goyal et al. 2017)
    """

    name = "resnet"

    def __init__(self, in_bands: int, embed_dim: int = 128, width: int = 32,
                 depths: tuple[int, ...] | list[int] = (2, 2, 2, 2), norm: str = "batch",
                 groups: int = 8, stem_stride: int = 1, min_stamp: int = 16,
                 zero_init_residual: bool = True) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if int(in_bands) < 1 or int(embed_dim) < 1 or int(width) < 1:
            raise Sim2ObsValueError(
                f"resnet: in_bands, embed_dim and width must be >= 1 "
                f"(got {in_bands}, {embed_dim}, {width})"
            )
        if not depths or min(depths) < 1:
            raise Sim2ObsValueError(f"resnet: depths must be a non-empty list of ints >= 1, got {depths}")
        if norm not in _NORMS:
            raise Sim2ObsValueError(f"resnet: norm '{norm}' unknown; use one of {list(_NORMS)}")
        if int(stem_stride) not in (1, 2):
            raise Sim2ObsValueError(f"resnet: stem_stride must be 1 or 2, got {stem_stride}")
        self.in_bands = int(in_bands)
        self.embed_dim = int(embed_dim)
        self._config = dict(
            name=self.name, in_bands=self.in_bands, embed_dim=self.embed_dim, width=int(width),
            depths=list(depths), norm=norm, groups=int(groups), stem_stride=int(stem_stride),
            min_stamp=int(min_stamp), zero_init_residual=bool(zero_init_residual),
        )
        self.min_stamp = int(min_stamp)

        self.stem = nn.Sequential(
            nn.Conv2d(self.in_bands, width, 3, stride=stem_stride, padding=1, bias=False),
            make_norm(norm, width, groups),
            nn.ReLU(inplace=True),
        )
        stages = []
        c_in = width
        for s, depth in enumerate(depths):
            c_out = width * 2**s
            blocks = [BasicBlock(c_in, c_out, stride=1 if s == 0 else 2, norm=norm, groups=groups)]
            blocks += [BasicBlock(c_out, c_out, norm=norm, groups=groups) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c_in
        self.fc = nn.Linear(c_in, self.embed_dim)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.norm2.weight)

    def config(self) -> dict:
        """Keyword arguments of :func:`sim2obs.encoders.build` that rebuild this encoder."""
        return dict(self._config, depths=list(self._config["depths"]))

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``(N, feature_dim)`` before the final linear layer."""
        _check_input(x, self.in_bands, self.min_stamp, self.name)
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_bands, H, W) -> (N, embed_dim)``."""
        return self.fc(self.forward_features(x))


def _check_input(x: Tensor, in_bands: int, min_stamp: int, name: str) -> None:
    if x.ndim != 4:
        raise Sim2ObsValueError(
            f"{name} encoder expects a (N, B, H, W) batch, got a tensor of shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_bands:
        raise Sim2ObsValueError(
            f"{name} encoder was built for {in_bands} bands but got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    if x.shape[-2] < min_stamp or x.shape[-1] < min_stamp:
        raise Sim2ObsValueError(
            f"{name} encoder needs stamps of at least {min_stamp}x{min_stamp} pixels, "
            f"got {x.shape[-2]}x{x.shape[-1]}"
        )
