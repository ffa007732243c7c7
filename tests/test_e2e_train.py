"""``wasi train`` end to end through the command line, under faults: resume refused on other settings
or a damaged checkpoint, bad values, a full disk at every write, SIGKILL at random points.

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

import wasi
from conftest import SmallDisk, one_line_error
from wasi.cli import main
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


def _flip_a_data_byte(file: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside ``tensor``'s bytes in ``file``: every header and index stays valid."""
    data = bytearray(file.read_bytes())
    raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    data[at + len(raw) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("change,message", [
    (["--eps", "0.5"], r"--resume: the settings differ from the checkpoint's \(eps: checkpoint 0\.8 vs now 0\.5\)"),
    (["--target", "all-linear"], r"target: checkpoint 'mlp' vs now 'all-linear'"),
    (["--method", "asi"], r"method: checkpoint 'wasi' vs now 'asi'"),
])
def test_cli_resume_with_another_config_or_architecture_is_refused(run_copy, capsys, change, message):
    before = _hashes(run_copy)
    code, err = _cli(capsys, *CLI_RUN, "--out", str(run_copy), "--resume", *change)
    assert code == 2
    assert one_line_error(err).startswith("wasi train: error: --resume:")
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
    assert re.search(message, one_line_error(err)), err
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
    line = one_line_error(err)
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
    line = one_line_error(err)
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
