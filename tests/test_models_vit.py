"""The built-in vision transformer (:mod:`wasi.models.vit`): presets, shapes, attention, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wasi.models import VIT_PRESETS, ViT, build_vit
from wasi.models.vit import AttentionCore, ViTShape

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(VIT_PRESETS))
def test_every_preset_builds_with_the_layer_names_conversion_targets(name):
    shape = VIT_PRESETS[name]
    model = build_vit(name, num_classes=7)
    assert isinstance(model, ViT) and model.shape == shape
    names = dict(model.named_modules())
    for i in range(shape.depth):
        for layer in ("mlp.fc1", "mlp.fc2", "attn.qkv", "attn.proj"):
            assert isinstance(names[f"blocks.{i}.{layer}"], torch.nn.Linear)
    assert names["blocks.0.mlp.fc1"].weight.shape == (shape.mlp_dim, shape.dim)
    assert names["head"].out_features == 7


def test_forward_maps_images_to_class_scores_and_overrides_change_the_shape():
    model = build_vit("vit-micro", num_classes=3)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 3)
    wide = build_vit("vit-micro", num_classes=3, image_size=12, channels=3)
    assert wide.shape.image_size == 12 and wide(torch.randn(2, 3, 12, 12)).shape == (2, 3)
    again = build_vit(model.architecture()["shape"], num_classes=3)
    assert again.shape == model.shape
    with pytest.raises(ValueError, match="unknown ViT preset 'vit-huge'"):
        build_vit("vit-huge", num_classes=2)
    with pytest.raises(ValueError, match="image_size 9 is not a multiple of patch_size 2"):
        ViT(ViTShape(dim=8, depth=1, heads=2, mlp_dim=16, patch_size=2, image_size=9), num_classes=2)


def test_attention_core_is_multi_head_softmax_attention():
    torch.manual_seed(0)
    b, n, heads, d = 2, 5, 2, 8
    qkv = torch.randn(b, n, 3 * d)
    q, k, v = qkv.split(d, dim=-1)  # (B, N, D) each

    def per_head(t):
        return t.reshape(b, n, heads, d // heads).transpose(1, 2)  # (B, h, N, d/h)

    scores = per_head(q) @ per_head(k).transpose(-1, -2) / (d // heads) ** 0.5  # (B, h, N, N)
    expected = (F.softmax(scores, dim=-1) @ per_head(v)).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
    torch.testing.assert_close(AttentionCore(heads)(qkv), expected, rtol=1e-5, atol=1e-5)


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_vit("vit-micro", num_classes=3)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(images), labels).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.checkpointing = True
    F.cross_entropy(model(images), labels).backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)
