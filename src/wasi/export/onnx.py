"""Export a converted model to ONNX in its low-rank serving form, and run it with ONNX Runtime.

A WASI layer serves as ``y = (x R^T) L^T + b`` (docs WASI.md section 5): two thin matmuls,
``(..., I) -> (..., k) -> (..., O)``. The exported graph keeps exactly that: every WASI layer
becomes two ``MatMul`` nodes with weights ``R^T: (I, k)`` and ``L^T: (k, O)`` (an activation
fused into the layer follows the second one), and every other layer is exported as PyTorch
runs it. ``dense=True`` exports the same model with each WASI layer merged to one ``(O, I)``
weight (``L @ R``), the form a dense checkpoint serves in, for comparison.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi.convert import _set_submodule, wasi_layers
from wasi.modules import WASILinear

OPSET = 17
INSTALL_HINT = "pip install 'wasi[serve]' (or: pip install onnxruntime)"
METADATA_KEY = "wasi"  # metadata_props entry holding the preprocessing JSON (predict reads it)
TOKENIZER_KEY = "wasi.tokenizer"  # metadata_props entry holding a text model's tokenizer.json


class ExportError(ValueError):
    """A model or input that cannot be exported, or an export that does not match PyTorch."""


def import_onnxruntime():
    """``onnxruntime``, or an ImportError naming the install command."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"serving with ONNX Runtime needs the package onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def import_onnx():
    """``onnx``, or an ImportError naming the install command."""
    try:
        import onnx
    except ImportError:
        raise ImportError("exporting to ONNX needs the package onnx: pip install 'wasi[models]' "
                          "(or: pip install onnx)") from None
    return onnx


class LowRankLinear(nn.Module):
    """The serving form of a WASI layer: ``act((x @ R^T) @ L^T + b)``, nothing else.

    Holds ``right_t: (I, k)`` and ``left_t: (k, O)`` pre-transposed, so the traced graph has two
    plain ``MatMul`` nodes whose weight initializers are the thin factors themselves.
    """

    def __init__(self, layer: WASILinear) -> None:
        super().__init__()
        if layer.left is None:
            raise ExportError(f"{layer.name or 'layer'}: mode {layer.config.mode!r} keeps a dense weight; "
                              "only the factored modes have a low-rank form")
        self.right_t = nn.Parameter(layer.right.detach().T.contiguous(), requires_grad=False)  # (I, k)
        self.left_t = nn.Parameter(layer.left.detach().T.contiguous(), requires_grad=False)  # (k, O)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.activation = layer.fused_activation

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(torch.matmul(x, self.right_t), self.left_t)  # (..., I) -> (..., k) -> (..., O)
        if self.bias is not None:
            y = y + self.bias
        return y if self.activation is None else self.activation(y)


class DenseLinear(nn.Module):
    """A WASI layer merged to one weight for comparison: ``act(x @ (L R)^T + b)``."""

    def __init__(self, layer: WASILinear) -> None:
        super().__init__()
        weight = layer.effective_weight().detach()  # (O, I)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.activation = layer.fused_activation

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., I) -> (..., O)
        return y if self.activation is None else self.activation(y)


def serving_copy(model: nn.Module, *, dense: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode with each WASI layer in its serving form.

    Args:
        model: a converted model (a model without WASI layers is copied as it is).
        dense: merge each WASI layer to one dense weight instead of two thin factors.

    Returns:
        A new model; ``model`` is not changed.

    Raises:
        ExportError: a WASI layer without factors (modes ``activations-only``, ``reference``
            keep a dense weight) when ``dense`` is False.
    """
    served = copy.deepcopy(model).eval()
    for fqn, layer in wasi_layers(served):
        if dense:
            replacement = DenseLinear(layer)
        elif layer.left is None or layer.config.mode == "reference":
            replacement = DenseLinear(layer)  # its weight is dense: that is its serving form
        else:
            replacement = LowRankLinear(layer)
        _set_submodule(served, fqn, replacement)
    for p in served.parameters():
        p.requires_grad_(False)
    return served


class _Logits(nn.Module):
    """Calls the model with named inputs and returns one tensor (a ``transformers`` output's logits)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], keywords: bool) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.keywords = keywords

    def forward(self, *inputs: Tensor) -> Tensor:
        if self.keywords:
            extra = {"use_cache": False} if _accepts_cache(self.model) else {}
            out = self.model(**dict(zip(self.names, inputs)), **extra)
        else:
            out = self.model(*inputs)
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            logits = out[0]
        if logits is None:
            raise ExportError(f"the model returned {type(out).__name__}, neither a tensor nor an output with logits")
        return logits


def _accepts_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")


def as_inputs(example: Tensor | Mapping[str, Tensor] | tuple) -> tuple[tuple[str, ...], tuple[Tensor, ...], bool]:
    """Names and tensors of an example input; True when the model takes them as keywords."""
    if isinstance(example, Tensor):
        return ("pixel_values" if example.dim() == 4 else "input",), (example,), False
    if isinstance(example, Mapping):
        if not example or not all(isinstance(v, Tensor) for v in example.values()):
            raise ExportError("example: give a tensor, a tuple of tensors or a dict of named tensors")
        return tuple(example), tuple(example.values()), True
    if isinstance(example, (tuple, list)) and example and all(isinstance(v, Tensor) for v in example):
        return tuple(f"input_{i}" for i in range(len(example))), tuple(example), False
    raise ExportError(f"example: give a tensor, a tuple of tensors or a dict of named tensors, got "
                      f"{type(example).__name__}")


def dynamic_axes_for(names: tuple[str, ...], inputs: tuple[Tensor, ...], output: Tensor) -> dict[str, dict[int, str]]:
    """Batch (dim 0) is dynamic everywhere; the sequence (dim 1) of integer (token) inputs too,
    and of the output when it keeps one (a causal LM's ``(B, T, V)`` logits)."""
    axes: dict[str, dict[int, str]] = {}
    sequence = False
    for name, tensor in zip(names, inputs):
        axes[name] = {0: "batch"}
        if not tensor.is_floating_point() and tensor.dim() == 2:
            axes[name][1] = "sequence"
            sequence = True
    axes["logits"] = {0: "batch"}
    if sequence and output.dim() >= 3:
        axes["logits"][1] = "sequence"
    return axes


def export_onnx(
    model: nn.Module,
    example: Tensor | Mapping[str, Tensor] | tuple,
    path: str | os.PathLike | None = None,
    *,
    dense: bool = False,
    opset: int = OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Path | bytes:
    """Export ``model`` (converted with :func:`wasi.convert`) to ONNX in its low-rank serving form.

    The model is copied (:func:`serving_copy`) and traced in eval mode with the TorchScript
    exporter; batch and sequence axes are dynamic (:func:`dynamic_axes_for`), the output is
    named ``logits``. ``model`` itself is left as it was.

    Args:
        model: a converted model, or any model (exported as it is).
        example: one input batch: a tensor (an image batch ``(B, C, H, W)``), a tuple of
            tensors, or a dict of named tensors (``input_ids``, ``attention_mask``: the model is
            then called with keywords, a ``transformers`` model's ``.logits`` exported).
        path: the ``.onnx`` file to write (a new file: an existing one is not replaced); None
            returns the bytes.
        dense: export each WASI layer merged to one dense weight (the comparison form).
        opset: the ONNX opset.
        metadata: string entries stored in the model's ``metadata_props``.

    Returns:
        The path written, or the serialized model when ``path`` is None.

    Raises:
        ExportError: bad example, or a model the tracer cannot export.
        FileExistsError: ``path`` already exists.
        ImportError: ``onnx`` is missing (the install command is named).
    """
    onnx = import_onnx()
    names, inputs, keywords = as_inputs(example)
    if path is not None and Path(path).exists():
        raise FileExistsError(f"{str(path)!r} already exists; remove it or give another path")
    served = _Logits(serving_copy(model, dense=dense), names, keywords).eval()
    with torch.no_grad():
        output = served(*inputs)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow of fixed shapes
        try:
            torch.onnx.export(
                served, inputs, buffer, dynamo=False, input_names=list(names), output_names=["logits"],
                dynamic_axes=dynamic_axes_for(names, inputs, output), opset_version=opset,
            )
        except Exception as err:  # noqa: BLE001 - the tracer raises many kinds; one message names the model
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ExportError(f"torch.onnx.export could not trace {type(model).__name__}: {first}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    if path is None:
        return data
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        if path.exists():  # created meanwhile: the user's file stays
            raise FileExistsError(f"{str(path)!r} already exists; remove it or give another path")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights are not loaded)."""
    onnx = import_onnx()
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def session(path: str | os.PathLike | bytes, threads: int = 1):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads (one inter-op thread, sequential)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(sess, inputs: Mapping[str, Tensor]) -> Tensor:
    """Run ``sess`` on named tensors; returns the ``logits`` as a float32 tensor."""
    wanted = {i.name for i in sess.get_inputs()}
    feed = {name: t.detach().cpu().numpy() for name, t in inputs.items() if name in wanted}
    missing = wanted - set(feed)
    if missing:
        raise ExportError(f"the ONNX model needs inputs {sorted(missing)}; given {sorted(inputs)}")
    return torch.from_numpy(sess.run(["logits"], feed)[0])


def max_abs_difference(path: str | os.PathLike | bytes, model: nn.Module,
                       example: Tensor | Mapping[str, Tensor] | tuple) -> float:
    """Largest ``|ONNX Runtime - PyTorch|`` over the logits of ``example``, PyTorch in eval mode."""
    names, inputs, keywords = as_inputs(example)
    served = _Logits(model, names, keywords)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = served(*inputs).float()
    finally:
        model.train(training)
    got = run_session(session(path), dict(zip(names, inputs)))
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output has shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    return float((got - expected).abs().max())


def matmul_weights(path: str | os.PathLike | bytes) -> list[tuple[str, tuple[int, ...]]]:
    """``(op, weight shape)`` of every ``MatMul`` / ``Gemm`` node whose second input is a stored weight.

    The weight may reach the node through a ``Transpose`` of an initializer (the exporter's
    form of ``F.linear``); its shape is then given as stored.
    """
    onnx = import_onnx()
    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
    graph = proto.graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    produced = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        source = produced.get(name)
        if name not in shapes and source is not None and source.op_type == "Transpose":
            name = source.input[0]
        if name in shapes:
            found.append((node.op_type, shapes[name]))
    return found


def preprocessing_metadata(info: Mapping) -> dict[str, str]:
    """``metadata_props`` entries for what :mod:`wasi.export.predict` needs to feed the model."""
    entries = {METADATA_KEY: json.dumps({k: v for k, v in info.items() if k != "tokenizer"})}
    if info.get("tokenizer") is not None:
        entries[TOKENIZER_KEY] = info["tokenizer"]
    return entries


__all__ = [
    "INSTALL_HINT",
    "DenseLinear",
    "ExportError",
    "LowRankLinear",
    "export_onnx",
    "matmul_weights",
    "max_abs_difference",
    "read_metadata",
    "run_session",
    "serving_copy",
    "session",
]
