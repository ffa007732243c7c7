"""int8 variants of an exported model through ONNX Runtime's own quantization tools."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from wasi.export.onnx import ExportError, import_onnxruntime


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike, *, per_channel: bool = True) -> Path:
    """Write ``target``: ``source`` with every ``MatMul``/``Gemm`` weight in int8 (dynamic quantization).

    ``onnxruntime.quantization.quantize_dynamic``: weights are stored as int8 with a scale per
    output channel (``per_channel``) or per tensor; activations are quantized to uint8 at run
    time, batch by batch. A WASI layer's two thin factors are quantized each on its own. The
    ``metadata_props`` of ``source`` (preprocessing, tokenizer) are carried over.

    Returns:
        ``target``.

    Raises:
        FileExistsError: ``target`` exists (an existing file is never replaced).
        ExportError: the quantizer failed (its message is kept).
        ImportError: onnxruntime is missing (the install command is named).
    """
    import_onnxruntime()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{str(target)!r} already exists; remove it or give another path")
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        tmp = Path(work) / target.name
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a note per skipped node
        try:
            quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel)
        except Exception as err:  # noqa: BLE001 - one message, the quantizer's own first line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ExportError(f"onnxruntime could not quantize {str(source)!r}: {first}") from None
        finally:
            logging.getLogger().setLevel(level)
        kept = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
        if kept:
            proto = onnx.load(str(tmp))
            present = {p.key for p in proto.metadata_props}
            for key, value in kept.items():
                if key not in present:
                    entry = proto.metadata_props.add()
                    entry.key, entry.value = key, value
            onnx.save(proto, str(tmp))
        if target.exists():
            raise FileExistsError(f"{str(target)!r} already exists; remove it or give another path")
        os.replace(tmp, target)
    return target


__all__ = ["quantize_int8"]
