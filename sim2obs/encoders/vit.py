"""Small Vision Transformer encoder for multi-band galaxy stamps.

Paper: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale" (ICLR). Pre-norm blocks as in that paper; optional fixed 2-D sine-cosine
position embeddings as in He et al. 2022 (MAE, CVPR); interpolation of learned embeddings to
other grids as in Caron et al. 2021 (DINO).

Maths. The stamp is cut into non-overlapping ``p x p`` patches, each linearly projected to
``dim`` (a strided convolution); a learned class token is prepended and position embeddings are
added. Each of ``depth`` blocks computes

    x <- x + MHSA(LN(x)),   MHSA = softmax(Q K^T / sqrt(d_head)) V over ``heads`` heads
    x <- x + MLP(LN(x)),    MLP = Linear(dim, mlp_ratio dim) -> GELU -> Linear(., dim)

and the embedding is ``Linear(LN(x_cls))`` (``pool='cls'``) or of the mean patch token
(``pool='mean'``).

Position embeddings: ``'learned'`` stores a (1 + g*g, dim) table for the ``image_size`` grid
(g = image_size / patch_size); another grid (gh, gw) bicubically interpolates the patch part, so a
model trained on 64x64 stamps also runs on 48x48 or 96x80. ``'sincos'`` computes fixed 2-D
sine-cosine embeddings for whatever grid arrives.

Shapes::

    x        (N, in_bands, H, W)     H % patch_size == 0 and W % patch_size == 0
    tokens   (N, 1 + (H/p)(W/p), dim)
    output   (N, embed_dim)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sim2obs.errors import Sim2ObsValueError

_POS = ("learned", "sincos")
_POOL = ("cls", "mean")


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings (MAE), shape ``(grid_h * grid_w, dim)``.

    A quarter of the channels each hold sin(y w_k), cos(y w_k), sin(x w_k), cos(x w_k) with
    ``w_k = temperature^(-k / (dim/4))``; ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise Sim2ObsValueError(f"vit: sincos position embeddings need dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32),
                          torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    omega = temperature ** (-torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y = y.reshape(-1, 1) * omega
    x = x.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: ``(N, B, H, W) -> (N, (H/p)(W/p), dim)``."""

    def __init__(self, in_bands: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_bands, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, ``(N, L, dim) -> (N, L, dim)`` (fused SDPA kernel)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class MLP(nn.Module):
    """Token-wise feed-forward network ``dim -> hidden -> dim`` with GELU."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block, ``(N, L, dim) -> (N, L, dim)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Vision Transformer encoder: (N, in_bands, H, W) -> (N, embed_dim).

    Parameters
    ----------
    in_bands : number of input bands
    embed_dim : size of the output embedding
    image_size : stamp size the learned position table is made for (other sizes interpolate)
    patch_size : patch side p; H and W must be multiples of p
    dim : token width; must be divisible by ``heads``
    depth : number of transformer blocks
    heads : attention heads
    mlp_ratio : hidden width of the MLP relative to ``dim``
    pos_embed : ``'learned'`` (interpolated to other grids) or ``'sincos'`` (fixed)
    pool : ``'cls'`` (class token) or ``'mean'`` (average of patch tokens)
    dropout : dropout in attention and MLP
    """

    name = "vit"

    def __init__(self, in_bands: int, embed_dim: int = 128, image_size: int = 64,
                 patch_size: int = 8, dim: int = 192, depth: int = 6, heads: int = 3,
                 mlp_ratio: float = 4.0, pos_embed: str = "learned", pool: str = "cls",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if int(in_bands) < 1 or int(embed_dim) < 1:
            raise Sim2ObsValueError(f"vit: in_bands and embed_dim must be >= 1, got {in_bands}, {embed_dim}")
        if int(patch_size) < 1 or int(image_size) % int(patch_size):
            raise Sim2ObsValueError(
                f"vit: image_size {image_size} must be a positive multiple of patch_size {patch_size}"
            )
        if int(dim) % int(heads):
            raise Sim2ObsValueError(f"vit: dim {dim} must be divisible by heads {heads}")
        if pos_embed not in _POS:
            raise Sim2ObsValueError(f"vit: pos_embed '{pos_embed}' unknown; use one of {list(_POS)}")
        if pool not in _POOL:
            raise Sim2ObsValueError(f"vit: pool '{pool}' unknown; use one of {list(_POOL)}")
        if pos_embed == "sincos" and int(dim) % 4:
            raise Sim2ObsValueError(f"vit: pos_embed='sincos' needs dim divisible by 4, got {dim}")
        self.in_bands = int(in_bands)
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.grid = int(image_size) // self.patch_size
        self.pos_kind = pos_embed
        self.pool = pool
        self._config = dict(
            name=self.name, in_bands=self.in_bands, embed_dim=self.embed_dim,
            image_size=int(image_size), patch_size=self.patch_size, dim=int(dim), depth=int(depth),
            heads=int(heads), mlp_ratio=float(mlp_ratio), pos_embed=pos_embed, pool=pool,
            dropout=float(dropout),
        )

        self.patch_embed = PatchEmbed(self.in_bands, dim, self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_parameter("pos_embed", None)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, self.embed_dim)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def config(self) -> dict:
        """Keyword arguments of :func:`sim2obs.encoders.build` that rebuild this encoder."""
        return dict(self._config)

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings ``(1, 1 + grid_h * grid_w, dim)`` (class token first)."""
        dim = self.cls_token.shape[-1]
        if self.pos_embed is None:
            patch = sincos_2d(grid_h, grid_w, dim).to(self.cls_token.device)
            return torch.cat([torch.zeros(1, dim, device=patch.device), patch])[None]
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic",
                                  align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised pooled token ``(N, dim)`` before the output projection."""
        self._check(x)
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embedding(grid_h, grid_w)
        tokens = self.norm(self.blocks(tokens))
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_bands, H, W) -> (N, embed_dim)``."""
        return self.head(self.forward_features(x))

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise Sim2ObsValueError(
                f"vit encoder expects a (N, B, H, W) batch, got a tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_bands:
            raise Sim2ObsValueError(
                f"vit encoder was built for {self.in_bands} bands but got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p or h < p or w < p:
            near = [max(p, p * math.floor(s / p)) for s in (h, w)]
            raise Sim2ObsValueError(
                f"vit encoder with patch_size {p} needs stamps whose height and width are "
                f"multiples of {p}; got {h}x{w}. Crop or pad to {near[0]}x{near[1]}, or build "
                f"the encoder with a patch_size that divides both"
            )
