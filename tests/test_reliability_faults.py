"""Reliability under faults and bad input at the edges: checkpoints (atomic, checksummed, never
damaged by a failure), the command line's one-line errors, skipped non-finite steps, SIGKILL at
random points, and memory that stays flat over a long run.

The cases and the messages users see are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import wasi
from conftest import SmallDisk, dense_linear, randn
from wasi import CheckpointError, WASIConfig, WASILinear
from wasi.checkpoint import CONFIG_FILE, WEIGHTS_FILE, config_digest
from wasi.cli import build_parser, main
from wasi.config import CONFIG_VERSION
from wasi.models import build_vit
from wasi.training.loop import Run, RunError, TrainSettings, run_training

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: threads only contend

CLI_RUN = ["train", "--model", "vit-micro", "--data", "digits", "--max-train-samples", "64", "--steps", "4",
           "--batch-size", "16", "--checkpoint-every", "2", "--log-every", "2", "--lr", "1e-3"]


def _hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _quiet(_message: str) -> None:
    pass


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A short finished `wasi train` run: checkpoint, metrics, summary, model folder."""
    out = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*CLI_RUN, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# ============================================================================ wasi.save / wasi.load
def _vit(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_vit("vit-micro", num_classes=5, **overrides)


@pytest.fixture
def saved(tmp_path) -> Path:
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
def test_a_failing_load_leaves_the_model_unconverted_and_the_checkpoint_untouched(saved, case):
    factory, damage, message = LOAD_FAILURES[case]
    if damage:
        _damage(saved, damage)
    before = _hashes(saved)
    model = factory()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        wasi.load(model, saved)
    if case != "converted-with-another-config":
        assert not wasi.wasi_layers(model)  # not converted, not half converted
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert _hashes(saved) == before


def test_save_is_atomic_and_records_the_weights_checksum(saved):
    assert sorted(p.name for p in saved.iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    meta = json.loads((saved / CONFIG_FILE).read_text())
    assert meta["weights_sha256"] == hashlib.sha256((saved / WEIGHTS_FILE).read_bytes()).hexdigest()
    wasi.load(_vit(seed=1), saved)  # and it loads


def test_a_full_disk_during_save_keeps_the_previous_checkpoint_byte_identical(saved, monkeypatch):
    before = _hashes(saved)
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
        wasi.save(model, saved)
    assert info.value.errno == errno.ENOSPC
    assert _hashes(saved) == before  # byte-identical, and no temporary file left behind
    wasi.load(_vit(), saved)


def test_a_real_full_disk_during_save_raises_the_documented_os_error(small_disk):
    saved = small_disk.folder / "ckpt"
    model = wasi.convert(_vit(), WASIConfig(rank=4, activation_rank=2))
    wasi.save(model, saved)
    before = _hashes(saved)
    small_disk.fill()
    try:
        with pytest.raises(OSError) as info:
            wasi.save(wasi.convert(_vit(seed=2), WASIConfig(rank=4, activation_rank=2)), saved)
    finally:
        small_disk.free()
    assert type(info.value) is OSError and info.value.errno == small_disk.errno  # not safetensors' own error
    assert str(info.value) == (f"[Errno {small_disk.errno}] wasi.save: writing {str(saved)!r} failed: "
                               f"{small_disk.reason}; the checkpoint already there is unchanged")
    assert _hashes(saved) == before  # byte-identical, and no temporary file left
    wasi.load(_vit(), saved)


def test_saving_into_an_unwritable_place_is_a_clear_os_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = wasi.convert(_vit(), WASIConfig(rank=4))
    with pytest.raises(OSError, match=r"wasi\.save: cannot create the folder '.*a-file/ckpt'"):
        wasi.save(model, blocker / "ckpt")


def test_unknown_config_keys_warn_and_the_files_stay_as_they_were(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta["config"]["future_knob"] = 1
    meta["config_sha256"] = config_digest(meta)  # as a newer wasi that knows the key would write it
    (saved / CONFIG_FILE).write_text(json.dumps(meta))
    before = _hashes(saved)
    with pytest.warns(UserWarning, match=r"ignoring unknown config keys \['future_knob'\]"):
        wasi.load(_vit(), saved)
    assert _hashes(saved) == before


# ============================================================================ command line
@pytest.mark.parametrize("change,message", [
    (["--eps", "0.5"], r"--resume: the settings differ from the checkpoint's \(eps: checkpoint 0\.8 vs now 0\.5\)"),
    (["--target", "all-linear"], r"target: checkpoint 'mlp' vs now 'all-linear'"),
    (["--method", "asi"], r"method: checkpoint 'wasi' vs now 'asi'"),
])
def test_cli_resume_with_another_config_or_architecture_is_refused(run_copy, capsys, change, message):
    before = _hashes(run_copy)
    code, err = _cli(capsys, *CLI_RUN, "--out", str(run_copy), "--resume", *change)
    assert code == 2
    assert _one_line_error(err).startswith("wasi train: error: --resume:")
    assert re.search(message, err), err
    assert _hashes(run_copy) == before


@pytest.mark.parametrize("damage,message", [
    ("bit-flip", r"checkpoint\.pt is corrupt: its contents do not match the SHA-256"),
    ("truncated", r"cannot read .*checkpoint\.pt \(truncated or corrupt\?\)"),
    ("garbage", r"cannot read .*checkpoint\.pt \(truncated or corrupt\?\)"),
])
def test_cli_resume_from_a_damaged_checkpoint_is_refused_and_keeps_the_file(run_copy, capsys, damage, message):
    file = run_copy / "checkpoint.pt"
    if damage == "bit-flip":
        _flip_a_data_byte(file, torch.load(file, weights_only=True)["model"]["blocks.0.mlp.fc1.left"])
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:5000])
    else:
        file.write_bytes(b"not a checkpoint" * 100)
    before = _hashes(run_copy)
    code, err = _cli(capsys, *CLI_RUN, "--out", str(run_copy), "--resume")
    assert code == 2
    assert re.search(message, _one_line_error(err)), err
    assert _hashes(run_copy) == before


def test_a_flipped_bit_in_tensor_data_is_caught_by_the_checksum(run_copy):
    # torch's zip reader does not check tensor bytes: only the recorded SHA-256 sees this
    path = run_copy / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    key = "blocks.0.mlp.fc1.left"
    state["model"][key] = state["model"][key].clone()
    state["model"][key].view(-1)[0] += 1e-6
    torch.save(state, path)
    settings = TrainSettings(model="vit-micro", data="digits", out=str(run_copy), steps=4, batch_size=16,
                             checkpoint_every=2, log_every=2, max_train_samples=64, lr=1e-3, resume=True)
    with pytest.raises(RunError, match=r"checkpoint\.pt is corrupt: its contents do not match the SHA-256"):
        run_training(settings, print_fn=_quiet)


@pytest.mark.parametrize("argv,message", [
    (["--eps", "0"], r"--eps 0\.0: must be in \(0, 1\]"),
    (["--eps", "-1"], r"--eps -1\.0: must be in \(0, 1\]"),
    (["--eps", "1.5"], r"--eps 1\.5: must be in \(0, 1\]"),
    (["--eps", "nan"], r"--eps nan: must be in \(0, 1\]"),
    (["--eps", "abc"], r"--eps 'abc': must be a number"),
    (["--target", "mlps"], r"--target 'mlps': choose mlp, attention or all-linear"),
    (["--data", "/nonexistent/train.csv"], r"--data '/nonexistent/train\.csv': not one of"),
    (["--batch-size", "0"], r"--batch-size 0: must be a positive integer"),
])
def test_cli_bad_values_are_reported_with_exit_status_2(run_copy, capsys, argv, message):
    before = _hashes(run_copy)
    code, err = _cli(capsys, *CLI_RUN, "--out", str(run_copy), *argv)
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err
    assert _hashes(run_copy) == before  # the run already there is untouched


@pytest.mark.parametrize("kind,message", [
    ("empty-folder", r"has no class folders"),
    ("empty-csv", r"has no rows: the dataset is empty"),
    ("text-into-vision-model", r"model 'vit-micro' takes image inputs but data '.*reviews\.csv' is text"),
])
def test_cli_missing_or_empty_dataset_files_are_one_line_errors(tmp_path, capsys, kind, message):
    if kind == "empty-folder":
        data = tmp_path / "images"
        data.mkdir()
    elif kind == "empty-csv":
        data = tmp_path / "train.csv"
        data.write_text("text,label\n")
    else:
        data = tmp_path / "reviews.csv"
        data.write_text("text,label\n" + "".join(f"review number {i},{i % 2}\n" for i in range(40)))
    out = tmp_path / "run"
    code, err = _cli(capsys, *CLI_RUN, "--out", str(out), "--data", str(data))
    assert code == 2 and re.search(message, _one_line_error(err)), err
    assert not out.exists() or not any(out.iterdir())  # nothing written: the same command runs once fixed


def test_cli_unwritable_output_folder_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    code, err = _cli(capsys, *CLI_RUN, "--out", str(blocker / "out"))
    assert code == 2 and "is not writable" in _one_line_error(err)
    assert blocker.read_text() == "keep me"
    if os.geteuid() != 0:  # root writes anywhere: the permission case only holds for users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = _cli(capsys, *CLI_RUN, "--out", str(locked / "out"))
        assert code == 2 and "is not writable" in _one_line_error(err)


def _fail_the_nth_save(monkeypatch, n: int, snapshots: list[bytes], out: Path) -> None:
    real = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            snapshots.append((out / "checkpoint.pt").read_bytes())
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of it fits on the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_cli_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    snapshots: list[bytes] = []
    _fail_the_nth_save(monkeypatch, 2, snapshots, out)
    code, err = _cli(capsys, *CLI_RUN, "--out", str(out))
    line = _one_line_error(err)
    assert code == 2
    assert "could not write the checkpoint" in line and "at step 4: No space left on device; the previous " \
                                                         "checkpoint is unchanged" in line
    assert (out / "checkpoint.pt").read_bytes() == snapshots[0]  # byte-identical to the step-2 checkpoint
    assert not (out / "checkpoint.pt.tmp").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"] == 2


def _fill_at(monkeypatch, disk: SmallDisk, phase: str) -> None:
    """Fill ``disk`` just before the run writes ``phase``'s file."""
    if phase == "checkpoint":  # the second one, at step 4: the step-2 checkpoint is there
        original, calls = Run.save_checkpoint, []

        def hooked(self):
            calls.append(1)
            if len(calls) == 2:
                disk.fill()
            return original(self)

        monkeypatch.setattr(Run, "save_checkpoint", hooked)
    elif phase == "metrics":  # the first metric line (the layers' gradient cosines), at step 1
        original_metric, metric_calls = Run._metric, []

        def hooked_metric(self, record):
            metric_calls.append(1)
            if len(metric_calls) == 1:
                disk.fill()
            return original_metric(self, record)

        monkeypatch.setattr(Run, "_metric", hooked_metric)
    else:
        name = {"model": "_export", "plot": "_plot", "summary": "_plot"}[phase]
        original_phase = getattr(Run, name)

        def hooked_phase(self, *args):
            if phase != "summary":
                disk.fill()
            original_phase(self, *args)
            if phase == "summary":  # after the plot: only summary.json is left to write
                disk.fill()

        monkeypatch.setattr(Run, name, hooked_phase)


@pytest.mark.parametrize("phase,file", [
    ("checkpoint", "the checkpoint {out}/checkpoint.pt at step 4"),
    ("metrics", "{out}/metrics.jsonl at step 1"),
    ("model", "{out}/model at step 4"),
    ("plot", "{out}/curves.png at step 4"),
    ("summary", "{out}/summary.json at step 4"),
])
def test_cli_a_full_disk_anywhere_is_one_line_leaves_nothing_half_written_and_resume_finishes(
        small_disk, monkeypatch, capsys, phase, file):
    out = small_disk.folder / "run"
    argv = [*CLI_RUN, "--out", str(out)]
    if phase == "metrics":
        argv += ["--checkpoint-every", "1"]
    _fill_at(monkeypatch, small_disk, phase)
    try:
        code, err = _cli(capsys, *argv)
    finally:
        small_disk.free()
    line = _one_line_error(err)
    assert code == 2
    where = "the previous checkpoint is unchanged" if phase == "checkpoint" else \
        f"{out}/checkpoint.pt is intact: free some space and continue with --resume"
    assert line == f"wasi train: error: could not write {file.format(out=out)}: {small_disk.reason}; {where}"
    # nothing half-written looks complete: no summary, no temporary file, no partial model or line
    assert not (out / "summary.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "model").exists() or phase in ("plot", "summary")
    if phase in ("plot", "summary"):
        wasi.load(build_vit("vit-micro", num_classes=10), out / "model")  # written whole before the failure
    if phase == "plot":
        assert not (out / "curves.png").exists()
    if (out / "metrics.jsonl").exists():
        assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    monkeypatch.undo()
    code, err = _cli(capsys, *argv, "--resume")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] == 4
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert logged == [2, 4]
    wasi.load(build_vit("vit-micro", num_classes=10), out / "model")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_skip_nonfinite_flag_reaches_the_settings(tmp_path, capsys):
    from wasi.cli.train import train_settings

    args = build_parser().parse_args([*CLI_RUN, "--out", str(tmp_path), "--skip-nonfinite"])
    assert train_settings(args).skip_nonfinite is True
    args = build_parser().parse_args([*CLI_RUN, "--out", str(tmp_path)])
    assert train_settings(args).skip_nonfinite is False


# ============================================================================ non-finite steps in a run
def _settings(out: Path, **kw) -> TrainSettings:
    base = {"model": "vit-micro", "data": "digits", "out": str(out), "method": "wasi", "steps": 6,
            "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "max_train_samples": 96,
            "eval_batch_size": 128, "lr": 1e-3}
    base.update(kw)
    return TrainSettings(**base)


def _poison(monkeypatch, at_step: int, how: str) -> None:
    """Make the batch of step ``at_step`` (1-based) non-finite: NaN pixels, or a NaN gradient."""
    original_step, original_logits = Run._train_step, Run._logits

    def train_step(self, batch):
        if self.step + 1 == at_step and how == "input":
            batch = dict(batch, images=batch["images"].clone())
            batch["images"][0, 0, 0, 0] = float("nan")
        return original_step(self, batch)

    def logits(self, batch):
        out = original_logits(self, batch)
        if self.step + 1 == at_step and how == "gradient" and out.requires_grad:
            out.register_hook(lambda g: g * float("nan"))  # finite loss, NaN gradient
        return out

    monkeypatch.setattr(Run, "_train_step", train_step)
    monkeypatch.setattr(Run, "_logits", logits)


@pytest.mark.parametrize("how", ["input", "gradient"])
def test_skip_nonfinite_skips_the_step_counts_it_and_keeps_the_model_usable(tmp_path, monkeypatch, how):
    _poison(monkeypatch, 3, how)
    summary = run_training(_settings(tmp_path, skip_nonfinite=True), print_fn=_quiet)
    assert summary["skipped_steps"] == 1 and summary["train_steps"] == 6
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in records if r["type"] == "skip"]
    assert [r["step"] for r in skips] == [3]
    assert ("loss is nan" if how == "input" else "gradient norm is nan") in skips[0]["reason"]
    train = {r["step"]: r for r in records if r["type"] == "train"}
    assert train[3]["loss"] is None and train[2]["skipped_steps"] == 0 and train[6]["skipped_steps"] == 1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["skipped_steps"] == 1
    for key, value in state["model"].items():
        assert not value.is_floating_point() or bool(torch.isfinite(value).all()), key
    assert 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.parametrize("how,names", [("input", "blocks.0.mlp.fc1: the training input"),
                                       ("gradient", "blocks.1.mlp.fc2: the gradient reaching this layer")])
def test_without_skip_a_nonfinite_step_stops_the_run_naming_the_layer(tmp_path, monkeypatch, how, names):
    _poison(monkeypatch, 3, how)
    snapshot = {}
    original = Run._train_step

    def remember(self, batch):
        if self.step == 2:
            snapshot["checkpoint"] = (tmp_path / "checkpoint.pt").read_bytes()
        return original(self, batch)

    monkeypatch.setattr(Run, "_train_step", remember)
    with pytest.raises(RunError, match=rf"^step 3: {names}.*--skip-nonfinite"):
        run_training(_settings(tmp_path), print_fn=_quiet)
    assert (tmp_path / "checkpoint.pt").read_bytes() == snapshot["checkpoint"]


def test_vanilla_training_skips_an_infinite_loss_too(tmp_path, monkeypatch):
    original = Run._logits

    def logits(self, batch):
        out = original(self, batch)
        return out * float("inf") if self.step + 1 == 2 else out

    monkeypatch.setattr(Run, "_logits", logits)
    summary = run_training(_settings(tmp_path, method="vanilla", steps=3, skip_nonfinite=True), print_fn=_quiet)
    assert summary["skipped_steps"] == 1
    with pytest.raises(RunError, match=r"^step 2: the loss is (nan|inf); nothing was updated"):
        run_training(_settings(tmp_path / "again", method="vanilla", steps=3), print_fn=_quiet)


# ============================================================================ SIGKILL at random points
_WRAPPER = """
import io, os, signal, sys
kill_at = int(os.environ.get("WASI_TEST_KILL_IN_SAVE", "0"))
if kill_at:
    import torch
    real, calls = torch.save, []
    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at and hasattr(f, "write"):  # die half way through writing a checkpoint
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)
    torch.save = save
from wasi.cli import main
sys.exit(main(sys.argv[1:]))
"""

# seconds after which a child run counts as hung: a guard, not a speed limit (a loaded machine is slow)
HANG = 900
KILL_RUN = ["train", "--model", "vit-micro", "--data", "digits", "--max-train-samples", "200", "--steps", "30",
            "--checkpoint-every", "3", "--log-every", "1", "--batch-size", "32", "--lr", "1e-3"]


def _start(out: Path, resume: bool, kill_in_save: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "WASI_TEST_KILL_IN_SAVE": str(kill_in_save)}
    argv = [sys.executable, "-c", _WRAPPER, *KILL_RUN, "--out", str(out), *(["--resume"] if resume else [])]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _last_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return max(steps)


def test_sigkill_at_random_points_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    rng = random.Random(20260101)
    reference = _start(tmp_path / "straight", resume=False)  # runs alongside the interrupted one
    cut = tmp_path / "cut"
    # 1. killed while writing its third checkpoint (step 9): half a temporary file, the step-6 one intact
    proc = _start(cut, resume=False, kill_in_save=3)
    assert proc.wait(timeout=HANG) == -signal.SIGKILL
    assert (cut / "checkpoint.pt.tmp").exists()
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["position"]["step"] == 6
    # 2. killed from outside at random moments of training, a few ms after a random step
    kills = 0
    for _ in range(2):
        proc = _start(cut, resume=True)
        start = _last_logged_step(cut)
        target = rng.randint(start + 1, 28)
        deadline = time.monotonic() + HANG
        while proc.poll() is None and _last_logged_step(cut) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=HANG)
    assert kills >= 1
    # 3. resume until done
    for _ in range(3):
        proc = _start(cut, resume=True)
        _, err = proc.communicate(timeout=HANG)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, err.decode()
    _, err = reference.communicate(timeout=HANG)
    assert reference.returncode == 0, err.decode()

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert resumed["position"]["step"] == straight["position"]["step"] == 30
    assert straight["model"].keys() == resumed["model"].keys()
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    logged = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert logged == list(range(1, 31))  # each step logged once: the killed runs' extras were dropped
    assert not (cut / "checkpoint.pt.tmp").exists()


# ============================================================================ long run, flat memory
def test_a_long_run_with_varying_shapes_keeps_memory_flat():
    from wasi.training.measure import PeakMemory, status_kb

    model = nn.Sequential(
        WASILinear.from_module(dense_linear(16, 32, seed=0), WASIConfig(eps=0.9, activation_eps=0.9), name="fc1"),
        nn.GELU(),
        WASILinear.from_module(dense_linear(32, 32, seed=1), WASIConfig(eps=0.9, activation_rank=3, mode="reference"),
                               name="fc2"),
        nn.GELU(),
        WASILinear.from_module(dense_linear(32, 16, seed=2), WASIConfig(rank=4, activation_rank=3, reorth_every=2),
                               name="fc3"),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    # batch, sequence length and number of dims all vary (every change is a cold restart of a basis);
    # torch keeps per-shape kernel caches, so every shape is met once before the measurement starts
    shapes = sorted({(b, n, 16) for b in range(1, 7) for n in range(1, 9)} | {(b * n, 16) for b in range(1, 7)
                                                                              for n in range(1, 9)})
    order = rng.sample(shapes, len(shapes))
    assert len(order) < 100
    whole, late = PeakMemory("cpu"), PeakMemory("cpu")
    for step in range(2000):
        if step in (100, 1000):
            (whole if step == 100 else late).reset()
            hwm, rss = status_kb("VmHWM"), status_kb("VmRSS")
            if hwm is None or rss is None or hwm > rss + 1024:
                pytest.skip("the kernel's peak (VmHWM) cannot be reset here")
        shape = order[step] if step < len(order) else rng.choice(shapes)
        loss = model(torch.randn(*shape, generator=generator)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert whole.peak_mb() < 5.0  # steps 100 to 2000
    assert late.peak_mb() < 1.0  # steps 1000 to 2000: no slow leak either
