"""``wasi train`` on 2 CPU processes (gloo), against the same run on 1 process.

Each rank is started with the environment ``torchrun`` gives it (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), without torchrun's agent in between, and every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from wasi.training.loop import Run, TrainSettings, run_training

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is needed"),
    pytest.mark.usefixtures("one_thread"),
]

SRC = Path(__file__).parent.parent / "src"
# 67 samples in batches of 16: every epoch ends on a batch of 3, which 2 processes share 2 + 1
RUN = {"model": "vit-micro", "data": "digits", "max_train_samples": 67, "batch_size": 16, "optimizer": "sgd",
       "log_every": 1, "max_eval_samples": 64}


def _argv(settings: dict) -> list[str]:
    argv = ["train"]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(nproc: int, argv: list[str]) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   GLOO_SOCKET_IFNAME="lo",
                   MASTER_PORT=str(port), PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-m", "wasi", *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    results = []
    try:
        for proc in procs:
            results.append((proc.wait(timeout=timeout), proc.stdout.read()))
    finally:
        for proc in procs:
            proc.kill()
            proc.stdout.close()
    return results


def _run(nproc: int, argv: list[str]) -> list[str]:
    results = _finish(_start(nproc, argv))
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank}: {log[-3000:]}"
    return [log for _, log in results]


def _losses(folder: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["type"] == "train"]


def _model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


def _assert_same_training(one: Path, two: Path) -> None:
    steps1, losses1 = zip(*_losses(one))
    steps2, losses2 = zip(*_losses(two))
    assert steps1 == steps2
    torch.testing.assert_close(torch.tensor(losses2), torch.tensor(losses1), rtol=1e-5, atol=1e-5)
    model1, model2 = _model(one), _model(two)
    assert set(model1) == set(model2)
    for key, value in model1.items():
        torch.testing.assert_close(model2[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_weights_only_on_two_processes_trains_as_one_process_on_the_same_global_batches(tmp_path):
    """Exact activations: the mean of the shards' weighted gradients is the global batch's gradient,
    also on the epoch's last batch of 3, split 2 + 1 (weights 4/3 and 2/3); SGD keeps any error."""
    settings = dict(RUN, method="wsi", epochs=1)
    one = run_training(TrainSettings(out=str(tmp_path / "one"), **settings), print_fn=lambda _m: None)
    logs = _run(2, _argv(dict(settings, out=tmp_path / "two")))
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["world_size"] == 1 and one["allreduce_bytes_per_step"] is None
    assert two["world_size"] == 2 and two["train_steps"] == one["train_steps"] == 5
    # every trainable gradient, in float32, once per step
    assert two["allreduce_bytes_per_step"] == 4 * two["trainable_params"]
    _assert_same_training(tmp_path / "one", tmp_path / "two")
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1 / 64)  # ties may break otherwise
    # rank 0 alone prints and writes: the same files as the one-process run
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "test accuracy" in logs[0] and "step 5/5" in logs[0]
    assert not re.search(r"^step \d|accuracy", logs[1], re.MULTILINE)


def test_wasi_on_two_processes_writes_one_run_with_its_allreduce_bytes(tmp_path):
    out = tmp_path / "run"
    logs = _run(2, _argv(dict(RUN, method="wasi", steps=3, out=out)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == 3
    assert summary["allreduce_bytes_per_step"] == 4 * summary["trainable_params"] > 0
    assert (out / "model").is_dir() and (out / "curves.png").is_file()
    assert not list(out.glob("*.tmp"))
    assert "test accuracy" in logs[0] and not re.search(r"^step \d|accuracy", logs[1], re.MULTILINE)


def test_a_two_process_run_resumes_on_one_process(tmp_path):
    """Killed after a checkpoint, the 2-process run continues on 1 process to the same model as an
    uninterrupted 1-process run."""
    settings = dict(RUN, method="wsi", steps=20, checkpoint_every=2, max_eval_samples=16)
    out = tmp_path / "two"
    procs = _start(2, _argv(dict(settings, out=out)))
    try:
        for _ in range(12_000):  # at most 4 minutes
            if (out / "checkpoint.pt").is_file() or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.02)
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
    finally:
        _finish(procs, timeout=60)
    assert (out / "checkpoint.pt").is_file() and not (out / "summary.json").exists()
    at = torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"]
    resumed = run_training(TrainSettings(out=str(out), resume=True, **settings), print_fn=lambda _m: None)
    assert resumed["world_size"] == 1 and resumed["train_steps"] == 20 and at < 20
    one = tmp_path / "one"
    run_training(TrainSettings(out=str(one), **settings), print_fn=lambda _m: None)
    _assert_same_training(one, out)


def test_a_one_process_run_resumes_on_two_processes(tmp_path, monkeypatch):
    """Interrupted at step 7 (Ctrl-C: a checkpoint there), the 1-process run continues on 2
    processes, through epoch ends with uneven last batches, to the uninterrupted run's model."""
    settings = dict(RUN, method="wsi", steps=12, checkpoint_every=100, max_eval_samples=16)
    one = tmp_path / "one"
    run_training(TrainSettings(out=str(one), **settings), print_fn=lambda _m: None)
    original = Run._train_step

    def interrupt(self, batch):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self, batch)

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(Run, "_train_step", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_training(TrainSettings(out=str(out), **settings), print_fn=lambda _m: None)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"] == 7
    logs = _run(2, [*_argv(dict(settings, out=out)), "--resume"])
    assert "resumed from" in logs[0] and "at step 7" in logs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == 12
    _assert_same_training(one, out)


def test_a_model_with_a_parameter_no_loss_reaches_trains_on_two_processes(tiny_dinov2, tmp_path):
    """DINOv2's mask token takes part only in masked pretraining: DDP must not wait for its gradient."""
    out = tmp_path / "run"
    _run(2, _argv(dict(RUN, model=tiny_dinov2, method="vanilla", steps=3, out=out)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == 3
    assert summary["allreduce_bytes_per_step"] == 4 * summary["trainable_params"]
