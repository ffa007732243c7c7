"""Model definitions shipped with wasi."""

from wasi.models.vit import VIT_PRESETS, ViT, build_vit

__all__ = ["ViT", "VIT_PRESETS", "build_vit"]
