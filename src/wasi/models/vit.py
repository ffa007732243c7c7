"""A plain vision transformer (ViT), with named presets including ViT-B/32's shapes.

Attention uses ``scaled_dot_product_attention`` (no stored probability matrix); the MLP
linears are ``blocks.<i>.mlp.fc1`` / ``fc2``, the attention ones ``blocks.<i>.attn.qkv`` /
``proj``, the classifier ``head``: the names ``wasi.convert``'s targets recognise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ViTShape:
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    channels: int = 3


# ViT-B/32: 768 wide, 12 blocks, 12 heads, MLP 3072, 32x32 patches on 224x224 (50 tokens)
VIT_PRESETS: dict[str, ViTShape] = {
    "vit-micro": ViTShape(dim=64, depth=2, heads=4, mlp_dim=256, patch_size=2, image_size=8, channels=1),
    "vit-tiny": ViTShape(dim=128, depth=4, heads=4, mlp_dim=512, patch_size=4, image_size=28, channels=1),
    "vit-small": ViTShape(dim=384, depth=12, heads=6, mlp_dim=1536, patch_size=4, image_size=28, channels=1),
    "vit-b32": ViTShape(dim=768, depth=12, heads=12, mlp_dim=3072, patch_size=32, image_size=224, channels=3),
}


class AttentionCore(nn.Module):
    """Multi-head attention of packed ``(B, N, 3 D)`` query/key/value to ``(B, N, D)``.

    Parameter-free and a function of its input only, so a WASI ``qkv`` layer can absorb it
    (``WASIConfig.fuse_activation``) and rebuild ``q, k, v`` from its small code in backward.
    """

    wasi_fusable = True

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, qkv: Tensor) -> Tensor:
        b, n, d3 = qkv.shape
        d = d3 // 3
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d/h)
        return out.transpose(1, 2).reshape(b, n, d)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.core = AttentionCore(heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.core(self.qkv(x)))  # (B, N, D) -> (B, N, 3D) -> (B, N, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D) -> (B, N, H) -> (B, N, D)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer: patch embedding, class token, pre-norm blocks, linear head.

    Args:
        shape: the architecture; num_classes: outputs of the head.

    Input ``(B, C, H, W)`` with ``H = W = shape.image_size``; output ``(B, num_classes)``.
    """

    def __init__(self, shape: ViTShape, num_classes: int) -> None:
        super().__init__()
        if shape.image_size % shape.patch_size:
            raise ValueError(f"image_size {shape.image_size} is not a multiple of patch_size {shape.patch_size}")
        self.shape = shape
        self.num_classes = num_classes
        tokens = (shape.image_size // shape.patch_size) ** 2
        self.patch_embed = nn.Conv2d(shape.channels, shape.dim, shape.patch_size, stride=shape.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, shape.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(shape.dim, shape.heads, shape.mlp_dim) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, num_classes)
        self.checkpointing = False  # recompute each block in backward instead of storing its inputs

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N-1, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        x = x + self.pos_embed
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x[:, 0]))  # (B, classes)

    def architecture(self) -> dict:
        """What :func:`build_vit` needs to rebuild this model."""
        return {"shape": asdict(self.shape), "num_classes": self.num_classes}


def build_vit(name_or_shape: str | ViTShape | dict, num_classes: int, **overrides) -> ViT:
    """Build a ViT from a preset name (``VIT_PRESETS``), a shape, or a shape dict.

    ``overrides`` replace shape fields, e.g. ``image_size=8, channels=1`` for small images.

    Raises:
        ValueError: unknown preset name.
    """
    if isinstance(name_or_shape, str):
        if name_or_shape not in VIT_PRESETS:
            raise ValueError(f"unknown ViT preset {name_or_shape!r}; choose one of {sorted(VIT_PRESETS)}")
        shape = VIT_PRESETS[name_or_shape]
    elif isinstance(name_or_shape, dict):
        shape = ViTShape(**name_or_shape)
    else:
        shape = name_or_shape
    if overrides:
        shape = ViTShape(**{**asdict(shape), **overrides})
    return ViT(shape, num_classes)
