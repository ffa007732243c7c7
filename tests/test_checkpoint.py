"""save / load: exact round trip, identical continued training, and loud failures."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import wasi
from conftest import dense_linear, randn
from wasi import CheckpointError, WASIConfig
from wasi.checkpoint import CONFIG_FILE, WEIGHTS_FILE, config_digest, read_config
from wasi.config import CONFIG_VERSION
from wasi.models import build_vit

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = 8  # vit-micro: 1x8x8 images, 2x2 patches, 17 tokens, width 64, MLP 256


def _vit(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_vit("vit-micro", num_classes=5, **overrides)


def _batches(sizes=(6, 6, 4, 6)):
    return [(randn(b, 1, IMAGES, IMAGES, seed=10 + i), torch.arange(b) % 5) for i, b in enumerate(sizes)]


def _train(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for images, labels in batches:
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
        opt.zero_grad()


def _assert_same_state(a: nn.Module, b: nn.Module, exact: bool = True):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], atol=1e-6, rtol=0, msg=key)


CONFIGS = {
    "factored-energy": WASIConfig(eps=0.7, activation_eps=0.8, reorth_every=2),
    "factored-ranks": WASIConfig(rank=6, activation_rank=(3, 5, 9)),
    "reference": WASIConfig(eps=0.8, activation_rank=(3, 5, 9), mode="reference"),
    "activations-only": WASIConfig(activation_rank=(3, 5, 9), mode="activations-only"),
    "weights-only": WASIConfig(eps=0.8, mode="weights-only", target="all-linear"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_then_training_on_stays_identical(tmp_path, name):
    model = wasi.convert(_vit(), CONFIGS[name])
    _train(model, _batches())
    wasi.save(model, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {WEIGHTS_FILE, CONFIG_FILE}

    loaded = wasi.load(_vit(seed=1), tmp_path / "ckpt")  # other random weights, overwritten
    assert [n for n, _ in wasi.wasi_layers(loaded)] == [n for n, _ in wasi.wasi_layers(model)]
    for (_, a), (_, b) in zip(wasi.wasi_layers(model), wasi.wasi_layers(loaded)):
        assert (a.rank, a.config, a.source) == (b.rank, b.config, b.source)
    _assert_same_state(model, loaded)
    probe = randn(3, 1, IMAGES, IMAGES, seed=99)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(probe), loaded(probe))

    # both go on with a fresh optimizer, the same batches, a batch-size change included
    more = _batches((5, 5, 3, 5, 5))
    _train(model, more)
    _train(loaded, more)
    _assert_same_state(model, loaded)
    assert int(wasi.wasi_layers(model)[0][1].step) == 9


def test_gpt2_round_trip_keeps_tied_weights_and_conv1d(tmp_path, gpt2):
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    wasi.convert(gpt2, WASIConfig(eps=0.9, activation_rank=(2, 4, 16)))
    opt = torch.optim.AdamW(gpt2.parameters(), lr=1e-3)
    gpt2.train()
    gpt2(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    wasi.save(gpt2, tmp_path)
    fresh = transformers.GPT2LMHeadModel(gpt2.config)
    wasi.load(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    _assert_same_state(gpt2, fresh)
    gpt2.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(gpt2(input_ids=ids).logits, fresh(input_ids=ids).logits)
    wasi.unconvert(fresh)
    assert type(fresh.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"


def test_unconvert_after_load_gives_linear_with_l_times_r(tmp_path):
    model = wasi.convert(_vit(), WASIConfig(rank=5, activation_rank=2))
    _train(model, _batches((4,)))
    wasi.save(model, tmp_path)
    loaded = wasi.load(_vit(seed=3), tmp_path)
    probe = randn(2, 1, IMAGES, IMAGES, seed=5)
    loaded.eval()
    with torch.no_grad():
        expected = loaded(probe)
        weights = {n: m.left @ m.right for n, m in wasi.wasi_layers(loaded)}
    wasi.unconvert(loaded)
    for name, weight in weights.items():
        layer = loaded.get_submodule(name)
        assert type(layer) is nn.Linear
        assert torch.equal(layer.weight.detach(), weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe), expected, atol=1e-6, rtol=1e-6)


def test_saved_config_records_version_config_and_layers(tmp_path):
    model = wasi.convert(_vit(), WASIConfig(rank=4, activation_rank=(2, 3, 4), seed=3))
    wasi.save(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["format"] == "wasi" and meta["version"] == CONFIG_VERSION
    assert meta["config"]["activation_rank"] == [2, 3, 4] and meta["config"]["seed"] == 3
    assert meta["layers"]["blocks.1.mlp.fc2"] == {"rank": 4, "in_features": 256, "out_features": 64,
                                                   "source": "linear"}
    config, layers = read_config(tmp_path)
    assert config == WASIConfig(rank=4, activation_rank=(2, 3, 4), seed=3) and len(layers) == 4


# ---------------------------------------------------------------------------- failures
@pytest.fixture
def saved(tmp_path):
    model = wasi.convert(_vit(), WASIConfig(rank=4, activation_rank=2))
    _train(model, _batches((4,)))
    wasi.save(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_keys_are_named(saved):
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.2\.attn\.proj\.bias'"):
        wasi.load(_vit(depth=3), saved)


def test_layers_the_model_lacks_are_named(saved):
    with pytest.raises(CheckpointError, match=r"does not have: blocks\.1\.mlp\.fc1, blocks\.1\.mlp\.fc2"):
        wasi.load(_vit(depth=1), saved)


def test_unexpected_keys_are_named(tmp_path):
    big = nn.Sequential()
    big.add_module("mlp", dense_linear(6, 4))
    big.add_module("extra", nn.Linear(4, 3))
    wasi.convert(big, WASIConfig(rank=2))
    wasi.save(big, tmp_path)
    small = nn.Sequential()
    small.add_module("mlp", dense_linear(6, 4))
    with pytest.raises(CheckpointError, match=r"missing keys \[\], unexpected keys \['extra\.bias', 'extra\.weight'\]"):
        wasi.load(small, tmp_path)


def test_shape_mismatches_are_named(saved):
    with pytest.raises(CheckpointError, match=r"layer blocks\.0\.mlp\.fc1: the model has shape \(128, 32\), "
                                              r"the checkpoint \(256, 64\)"):
        wasi.load(_vit(dim=32, mlp_dim=128), saved)
    with pytest.raises(CheckpointError, match=r"(?s)does not fit the model.*size mismatch for head\.weight"):
        wasi.load(build_vit("vit-micro", num_classes=7), saved)


def test_loading_into_a_converted_model_is_refused(saved):
    with pytest.raises(CheckpointError, match="expects an unconverted model"):
        wasi.load(wasi.convert(_vit(), WASIConfig(rank=4)), saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_weights_raise_checkpoint_error(saved, damage):
    file = saved / WEIGHTS_FILE
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        file.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    else:
        file.write_bytes(data[:8] + b"{" * 16 + data[24:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        wasi.load(_vit(), saved)


def test_unknown_config_keys_warn_and_still_load(saved):
    file = saved / CONFIG_FILE
    meta = json.loads(file.read_text())
    meta["config"]["future_knob"] = 3
    meta["config_sha256"] = config_digest(meta)  # as a newer wasi that knows the key would write it
    file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"ignoring unknown config keys \['future_knob'\]"):
        model = wasi.load(_vit(), saved)
    assert len(wasi.wasi_layers(model)) == 4


def test_newer_format_version_is_refused(saved):
    file = saved / CONFIG_FILE
    meta = json.loads(file.read_text())
    meta["version"] = CONFIG_VERSION + 1
    file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"format version {CONFIG_VERSION + 1}; this wasi reads up to "
                                              rf"version {CONFIG_VERSION}"):
        wasi.load(_vit(), saved)


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"version": 1}), "is not a WASI checkpoint config"),
    (json.dumps({"format": "wasi", "version": 1, "config": {"eps": 3}, "layers": {"a": {}}}),
     r"invalid config: WASIConfig\.eps"),
    (json.dumps({"format": "wasi", "version": 1, "config": {}}), "the layer table is missing"),
])
def test_bad_config_files(saved, text, message):
    (saved / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        wasi.load(_vit(), saved)


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=r"wasi_config\.json is missing"):
        wasi.load(_vit(), tmp_path / "nowhere")
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        wasi.load(_vit(), saved)


def test_saving_an_unconverted_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="call wasi.convert before wasi.save"):
        wasi.save(_vit(), tmp_path)


def test_a_version_1_checkpoint_loads_with_the_plain_factor_step(tmp_path):
    # written before the scaled step existed: no precondition key, no scaled_step / rank_boost tensors
    from safetensors.torch import load_file, save_file

    model = wasi.convert(_vit(), WASIConfig(rank=4, activation_rank=(2, 3, 4), precondition=False,
                                            grad_cosine_floor=0.0))
    _train(model, _batches((4,)))
    wasi.save(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["version"] = 1
    for key in ("precondition", "grad_check_every", "grad_cosine_floor"):
        del meta["config"][key]
    meta.pop("weights_sha256", None)  # the weights file is rewritten below
    meta.pop("config_sha256", None)  # version 1 recorded no checksum of its config
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    tensors = {k: v for k, v in load_file(str(tmp_path / WEIGHTS_FILE)).items()
               if not k.endswith((".scaled_step", ".rank_boost", ".recheck"))}
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))

    loaded = wasi.load(_vit(seed=1), tmp_path)
    for (_, a), (_, b) in zip(wasi.wasi_layers(model), wasi.wasi_layers(loaded)):
        assert b.config.precondition is False and b.config.grad_cosine_floor == 0.0
        assert not bool(b.scaled_step) and int(b.rank_boost) == 1
        assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
    more = _batches((5, 3))
    _train(model, more)
    _train(loaded, more)
    _assert_same_state(model, loaded)  # trains on as it was trained


def test_a_state_without_the_new_buffers_loads_into_a_default_layer_as_trained():
    # a training checkpoint of a run that began before the scaled step: the layer follows the state
    layer = wasi.WASILinear.from_module(dense_linear(8, 6, seed=1), WASIConfig(rank=3))
    assert bool(layer.scaled_step)
    state = {k: v for k, v in layer.state_dict().items() if k not in ("scaled_step", "rank_boost", "recheck")}
    layer.load_state_dict(state)  # strict: the missing buffers take their old meaning, no error
    assert not bool(layer.scaled_step) and int(layer.rank_boost) == 1


def _hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}




@pytest.fixture
def saved_after_a_step(tmp_path) -> Path:
    model = wasi.convert(_vit(), WASIConfig(rank=4, activation_rank=2))
    model.train()
    nn.functional.cross_entropy(model(randn(4, 1, 8, 8)), torch.arange(4)).backward()
    wasi.save(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _flip_a_data_byte(file: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside ``tensor``'s bytes in ``file``: every header and index stays valid."""
    data = bytearray(file.read_bytes())
    raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    data[at + len(raw) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _damage(folder: Path, how: str) -> None:
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    meta = json.loads(config.read_text())
    if how == "bit-flip":
        from safetensors.torch import load_file

        _flip_a_data_byte(weights, load_file(weights)["blocks.0.mlp.fc1.left"])
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "newer-version":
        meta["version"] = CONFIG_VERSION + 1
        config.write_text(json.dumps(meta))
    elif how == "bad-layer-entry":
        meta["layers"]["blocks.0.mlp.fc1"] = {"rank": "four"}
        meta["config_sha256"] = config_digest(meta)  # past the checksum: the layer table's own check
        config.write_text(json.dumps(meta))
    elif how == "edited-eps":
        meta["config"]["eps"] = 0.5
        config.write_text(json.dumps(meta, indent=2))
    elif how == "not-json":
        config.write_bytes(b"\xff\xfe garbage")


LOAD_FAILURES = {
    # name: (model factory, damage, message)
    "other-depth": (lambda: _vit(depth=3), None, r"missing keys \['blocks\.2\."),
    "other-width": (lambda: _vit(dim=32, mlp_dim=128), None, r"the model has shape \(128, 32\)"),
    "other-head": (lambda: build_vit("vit-micro", num_classes=7), None,
                   (r"does not fit the model: size mismatch for head\.weight: the checkpoint has shape \(5, 64\), "
                    r"the model \(7, 64\)")),
    "bit-flip": (_vit, "bit-flip", r"model\.safetensors is corrupt or truncated: its SHA-256 .* differs"),
    "truncated": (_vit, "truncated", r"model\.safetensors is corrupt or truncated"),
    "newer-version": (_vit, "newer-version", rf"format version {CONFIG_VERSION + 1}; this wasi reads up to"),
    "bad-layer-entry": (_vit, "bad-layer-entry", r"the entry of layer 'blocks\.0\.mlp\.fc1' is malformed"),
    "not-json": (_vit, "not-json", r"is not valid JSON"),
    "edited-eps": (_vit, "edited-eps", (r"wasi_config\.json was changed after it was saved \(its contents do not "
                                        r"match the SHA-256 recorded in it\)")),
    # a model the caller converted with another config: the checkpoint's own config must win
    "converted-with-another-config": (lambda: wasi.convert(_vit(), WASIConfig(eps=0.5, mode="reference")), None,
                                      r"wasi\.load expects an unconverted model"),
}


@pytest.mark.parametrize("case", list(LOAD_FAILURES))
def test_a_failing_load_leaves_the_model_unconverted_and_the_checkpoint_untouched(saved_after_a_step, case):
    factory, damage, message = LOAD_FAILURES[case]
    if damage:
        _damage(saved_after_a_step, damage)
    before = _hashes(saved_after_a_step)
    model = factory()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        wasi.load(model, saved_after_a_step)
    if case != "converted-with-another-config":
        assert not wasi.wasi_layers(model)  # not converted, not half converted
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert _hashes(saved_after_a_step) == before


def test_save_is_atomic_and_records_the_weights_checksum(saved_after_a_step):
    assert sorted(p.name for p in saved_after_a_step.iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    meta = json.loads((saved_after_a_step / CONFIG_FILE).read_text())
    assert meta["weights_sha256"] == hashlib.sha256((saved_after_a_step / WEIGHTS_FILE).read_bytes()).hexdigest()
    wasi.load(_vit(seed=1), saved_after_a_step)  # and it loads


def test_a_full_disk_during_save_keeps_the_previous_checkpoint_byte_identical(saved_after_a_step, monkeypatch):
    before = _hashes(saved_after_a_step)
    from wasi import checkpoint

    real = checkpoint.save_model

    def disk_full(model, filename, metadata=None):
        real(model, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # half the file made it to the disk
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_model", disk_full)
    model = wasi.convert(_vit(seed=2), WASIConfig(rank=4, activation_rank=2))
    with pytest.raises(OSError, match=r"wasi\.save: writing .* failed: No space left on device; the checkpoint "
                                      r"already there is unchanged") as info:
        wasi.save(model, saved_after_a_step)
    assert info.value.errno == errno.ENOSPC
    assert _hashes(saved_after_a_step) == before  # byte-identical, and no temporary file left behind
    wasi.load(_vit(), saved_after_a_step)


def test_a_real_full_disk_during_save_raises_the_documented_os_error(small_disk):
    saved_after_a_step = small_disk.folder / "ckpt"
    model = wasi.convert(_vit(), WASIConfig(rank=4, activation_rank=2))
    wasi.save(model, saved_after_a_step)
    before = _hashes(saved_after_a_step)
    small_disk.fill()
    try:
        with pytest.raises(OSError) as info:
            wasi.save(wasi.convert(_vit(seed=2), WASIConfig(rank=4, activation_rank=2)), saved_after_a_step)
    finally:
        small_disk.free()
    assert type(info.value) is OSError and info.value.errno == small_disk.errno  # not safetensors' own error
    assert str(info.value) == (f"[Errno {small_disk.errno}] wasi.save: writing {str(saved_after_a_step)!r} failed: "
                               f"{small_disk.reason}; the checkpoint already there is unchanged")
    assert _hashes(saved_after_a_step) == before  # byte-identical, and no temporary file left
    wasi.load(_vit(), saved_after_a_step)


def test_saving_into_an_unwritable_place_is_a_clear_os_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = wasi.convert(_vit(), WASIConfig(rank=4))
    with pytest.raises(OSError, match=r"wasi\.save: cannot create the folder '.*a-file/ckpt'"):
        wasi.save(model, blocker / "ckpt")


def test_unknown_config_keys_warn_and_the_files_stay_as_they_were(saved_after_a_step):
    meta = json.loads((saved_after_a_step / CONFIG_FILE).read_text())
    meta["config"]["future_knob"] = 1
    meta["config_sha256"] = config_digest(meta)  # as a newer wasi that knows the key would write it
    (saved_after_a_step / CONFIG_FILE).write_text(json.dumps(meta))
    before = _hashes(saved_after_a_step)
    with pytest.warns(UserWarning, match=r"ignoring unknown config keys \['future_knob'\]"):
        wasi.load(_vit(), saved_after_a_step)
    assert _hashes(saved_after_a_step) == before
