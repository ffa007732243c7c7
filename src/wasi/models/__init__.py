"""Model definitions shipped with wasi."""

from wasi.models.vit import VIT_PRESETS, ViT, build_vit

__all__ = ["VIT_PRESETS", "ViT", "build_vit"]
