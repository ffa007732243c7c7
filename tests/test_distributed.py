"""Data-parallel training of converted models on 2 CPU processes (gloo), against one process."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import wasi
from wasi.distributed import LOCAL_BUFFERS, AllReduceCounter, data_parallel, local_buffer_names, shard

WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    """gloo on the loopback interface: no lookup of the machine's name, whatever the machine."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(nproc: int, mode: str, out: Path) -> tuple[list[list[float]], list[dict]]:
    """Start ``nproc`` worker processes with the environment torchrun gives them (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), without torchrun's agent in between."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   GLOO_SOCKET_IFNAME="lo",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--mode", mode, "--out", str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank}: {log[-3000:]}"
    losses = [json.loads((out / f"losses{r}.json").read_text()) for r in range(nproc)]
    states = [torch.load(out / f"state{r}.pt", weights_only=True) for r in range(nproc)]
    return losses, states


def _shared(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in LOCAL_BUFFERS}


@pytest.fixture(scope="module")
def factored_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return _launch(2, "factored", root / "two"), _launch(1, "factored", root / "one")


def test_weights_only_two_processes_follow_one_process_over_the_global_batch(tmp_path):
    """With exact activations, the mean of the shards' gradients is the global batch's gradient:
    the loss curve and the factors of 2 processes match 1 process's."""
    (two, states2), (one, states1) = _launch(2, "weights-only", tmp_path / "two"), _launch(1, "weights-only", tmp_path / "one")
    assert two[0] == two[1]
    torch.testing.assert_close(torch.tensor(two[0]), torch.tensor(one[0]), rtol=1e-5, atol=1e-6)
    assert two[0][-1] < two[0][0]
    for key, value in states2[0].items():
        assert torch.equal(value, states2[1][key]), key  # the ranks agree exactly
        torch.testing.assert_close(value, states1[0][key], rtol=1e-4, atol=1e-5, msg=key)


def test_factored_ranks_keep_identical_factors_and_their_own_activation_bases(factored_runs):
    (losses, states), _ = factored_runs
    shared0, shared1 = _shared(states[0]), _shared(states[1])
    assert set(shared0) == set(shared1)
    factors = [k for k in shared0 if k.endswith((".left", ".right"))]
    assert len(factors) == 6
    for key in shared0:
        assert torch.equal(shared0[key], shared1[key]), key
    # each process compressed its own shard: its bases are fitted to its own inputs
    bases = [k for k in states[0] if ".basis_" in k and states[0][k].numel()]
    assert bases
    assert any(states[0][k].shape != states[1][k].shape or not torch.equal(states[0][k], states[1][k])
               for k in bases)
    assert losses[0][-1] < losses[0][0]


def test_factored_two_processes_track_one_process(factored_runs):
    """Compressed activations differ per shard, so the curves are close, not equal."""
    (two, _), (one, _) = factored_runs
    assert abs(two[0][-1] - one[0][-1]) < 0.1 * one[0][0]


def test_local_buffer_names_lists_the_activation_side_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    wasi.convert(model, wasi.WASIConfig(eps=0.9), filter_fn=lambda m, fqn: True)
    names = local_buffer_names(model)
    assert "0.basis_0" in names and "2.activation_ranks" in names
    assert not any(n.endswith((".step", ".seed", ".left", ".right")) for n in names)
    weights_only = nn.Sequential(nn.Linear(8, 8))
    wasi.convert(weights_only, wasi.WASIConfig(eps=0.9, mode="weights-only"), filter_fn=lambda m, fqn: True)
    assert local_buffer_names(weights_only) == []


def _isolated(script: str, tmp_path: Path) -> None:
    """Run ``script`` in a fresh process on a 1-process gloo group, with a time limit: the group
    is left without a teardown (``os._exit``), which can wait forever in some environments."""
    prelude = (
        "import datetime, os, torch, torch.distributed as dist\n"
        "from torch import nn\n"
        "import wasi\n"
        "from wasi.distributed import AllReduceCounter, data_parallel, local_buffer_names\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rendezvous'}', rank=0, world_size=1,"
        " timeout=datetime.timedelta(seconds=60))\n"
    )
    done = subprocess.run([sys.executable, "-c", prelude + script + "\nos._exit(0)\n"], capture_output=True,
                          text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("wrap", ["data_parallel", "plain DDP"])
def test_any_ddp_wrap_of_a_converted_model_leaves_out_the_local_buffers(tmp_path, wrap):
    """wasi.convert marks the buffers, so a DDP built by other code (accelerate, Trainer) honours it."""
    make = "data_parallel(model)" if wrap == "data_parallel" else "nn.parallel.DistributedDataParallel(model)"
    _isolated(f"""
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
wasi.convert(model, wasi.WASIConfig(eps=0.9), filter_fn=lambda m, fqn: True)
ddp = {make}
broadcast = set(ddp.named_module_buffers)
assert "0.step" in broadcast, broadcast
assert set(local_buffer_names(model)) and not broadcast & set(local_buffer_names(model)), broadcast
ddp(torch.randn(4, 3, 8)).sum().backward()
""", tmp_path)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, 12), generator=gen)
        self.labels = (self.ids[:, 0] % 2).long()  # a rule the model can learn

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.labels[i]}


def test_a_converted_model_trains_under_transformers_trainer(tmp_path):
    """No code beyond wasi.convert: Trainer (and so `accelerate launch`) trains the factors, and the
    result saves and loads with wasi.save / wasi.load."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    wasi.convert(model, wasi.WASIConfig(eps=0.9, target="mlp"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith((".left", ".right"))}
    assert before
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Pairs(48, config.vocab_size))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed == list(before)
    wasi.save(model, tmp_path / "model")
    fresh = transformers.BertForSequenceClassification(config)
    wasi.load(fresh, tmp_path / "model")
    model.eval(), fresh.eval()
    batch = _Pairs(4, config.vocab_size)[0]
    ids = batch["input_ids"][None]
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_shard_covers_every_item_once():
    parts = [list(shard(11, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        shard(4, 2, 2)


def test_allreduce_counter_counts_the_trainable_gradients_once_per_step(tmp_path):
    """A WASI model all-reduces its factors, k (I + O) per layer, not the dense I O."""
    _isolated("""
dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
converted = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
wasi.convert(converted, wasi.WASIConfig(rank=4, mode="weights-only"), filter_fn=lambda m, fqn: fqn == "0")
sent = {}
for name, model in (("dense", dense), ("wasi", converted)):
    ddp = nn.parallel.DistributedDataParallel(model)
    counter = AllReduceCounter().attach(ddp)
    for _ in range(2):
        ddp(torch.randn(8, 64)).sum().backward()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert counter.bytes == 2 * trainable and counter.calls >= 2, (counter.bytes, trainable)
    sent[name] = counter.bytes / 2
assert sent["wasi"] == 4 * (4 * (64 + 64) + 64 + 64 * 2 + 2), sent
assert sent["dense"] == 4 * (64 * 64 + 64 + 64 * 2 + 2), sent
""", tmp_path)
