"""What each memory lever buys on a real model: peak memory and step time, interleaved, as ratios.

One process, one model converted once (WASI factored, ``--target`` linears at energy ``--eps``:
real ranks), then for every round and every configuration: a fresh copy of the converted model
and a fresh optimizer, the peak resident memory of ``--steps`` training steps above the memory
before the copy (strict allocator, :func:`wasi.training.measure.set_cpu_allocator`: the resident
set follows the live tensors), then the median time of ``--steps`` more steps under the caching
allocator. Configurations run in turn within each round, so a slower or busier moment of the
machine touches them all. The optimizer state and gradient bytes are counted from the tensors.

Configurations (each one lever on top of ``baseline``, then the levers together):

- ``baseline``: AdamW, ordinary step, global gradient clipping at 2.0, float32;
- ``in-backward``: AdamW stepped inside backward (:class:`wasi.optim.OptimizerInBackward`),
  per-parameter clipping at 2.0;
- ``sgd``: the paper's SGD (no momentum: no state), ordinary step;
- ``adamw8bit``: torchao's AdamW8bit inside backward (its step is compiled per parameter shape:
  the first round pays that; only with ``--only``, as a model with many factor shapes compiles for
  long). Without it, the bytes of AdamW8bit's state are still counted from the zero states torchao
  builds for each trainable parameter (no step needed);
- ``autocast``: AdamW, the forward under ``torch.autocast("cpu", torch.bfloat16)``;
- ``frozen-embeddings``: AdamW, :func:`wasi.freeze_embeddings`;
- ``chunked-ce`` (causal LM only): the loss by :func:`wasi.causal_lm_loss`;
- ``all``: in-backward AdamW + autocast + frozen embeddings (+ chunked CE for a causal LM);
- ``all-8bit``: the same with AdamW8bit (only with ``--only``).

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WASI_CACHE=...
    python benchmarks/memory_levers.py --model minilm --data bbc-news --batch-size 32 --max-length 128
    python benchmarks/memory_levers.py --model smollm2-135m --data brown --batch-size 4 --max-length 128
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import wasi
from wasi.optim import OptimizerInBackward, follow_rotations, make_optimizer
from wasi.training.batches import make_batch, make_split
from wasi.training.measure import PeakMemory, set_cpu_allocator
from wasi.training.models import build_model

CLIP = 2.0
CLASSIFIER = ["baseline", "in-backward", "sgd", "adamw8bit", "autocast", "frozen-embeddings", "all", "all-8bit"]
CAUSAL = ["baseline", "in-backward", "sgd", "adamw8bit", "autocast", "frozen-embeddings", "chunked-ce", "all",
          "all-8bit"]
LEVERS = {  # name -> (optimizer, in backward, autocast, frozen embeddings, chunked CE)
    "baseline": ("adamw", False, False, False, False),
    "in-backward": ("adamw", True, False, False, False),
    "sgd": ("sgd", False, False, False, False),
    "adamw8bit": ("adamw8bit", True, False, False, False),
    "autocast": ("adamw", False, True, False, False),
    "frozen-embeddings": ("adamw", False, False, True, False),
    "chunked-ce": ("adamw", False, False, False, True),
    "all": ("adamw", True, True, True, True),
    "all-8bit": ("adamw8bit", True, True, True, True),
}


def _batches(args, bundle, causal: bool) -> list[dict[str, torch.Tensor]]:
    if causal:
        from wasi.data.lmtext import load_lm_documents, split_documents
        from wasi.training.causal_lm import make_lm_split

        train = split_documents(load_lm_documents(args.data, cache_dir=args.cache_dir), seed=0)[0]
        split = make_lm_split([d.text for d in train[:200]], bundle.tokenizer, args.max_length, "training")
    else:
        from wasi.data import load_dataset

        ds = load_dataset(args.data, cache_dir=args.cache_dir)
        split = make_split(ds, bundle, args.max_length)
    pad = bundle.tokenizer.pad_token_id if bundle.tokenizer.pad_token_id is not None else 0
    return [make_batch(split, torch.arange(i * args.batch_size, (i + 1) * args.batch_size), pad, torch.device("cpu"))
            for i in range(2)]


def _loss(model, bundle, batch, causal: bool, chunked: bool) -> torch.Tensor:
    if not causal:
        return F.cross_entropy(bundle.logits(batch).float(), batch["labels"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if chunked:
        return wasi.causal_lm_loss(model, batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def _release_heap() -> None:
    # hand the heap's free pages back (the previous configuration's, cached under the caching
    # allocator) so that the next peak counts its own memory, not reused pages
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "codes"):  # a torchao quantized state: codes, scales and its code map
        return sum(getattr(t, n).nbytes for n in ("codes", "scale", "qmap") if hasattr(t, n))
    return t.nbytes


def _adamw8bit_state_mb(params: list[torch.Tensor]) -> tuple[float, int]:
    """AdamW8bit's state bytes for ``params`` from the state tensors torchao creates (no step), and how
    many parameters keep float32 moments (fewer than 4096 elements, or not a multiple of its block)."""
    from torchao.optim import AdamW8bit

    opt = AdamW8bit(params, lr=1e-4)
    total, plain = 0, 0
    for p in params:
        moments = [opt._new_buffer(p, True), opt._new_buffer(p, False)]
        plain += not hasattr(moments[0], "codes")
        total += sum(_tensor_bytes(m) for m in moments) + 4  # and the step counter
    return total / 2**20, plain


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


class Run:
    """One configuration on a fresh copy of the converted model."""

    def __init__(self, name: str, template, bundle, args, causal: bool) -> None:
        optimizer, self.in_backward, self.autocast, frozen, chunked = LEVERS[name]
        self.chunked = chunked and causal
        self.model = copy.deepcopy(template)
        self.bundle = copy.copy(bundle)
        self.bundle.model = self.model
        self.causal = causal
        if frozen:
            wasi.freeze_embeddings(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = 1e-4 if optimizer != "sgd" else 1e-2
        self.opt = make_optimizer(params, optimizer, lr=lr, in_backward=self.in_backward,
                                  max_norm=CLIP if self.in_backward else None)
        follow_rotations(self.model, self.opt)
        self.params = params
        self.grad_bytes = 0

    def step(self, batch) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else nullcontext():
            loss = _loss(self.model, self.bundle, batch, self.causal, self.chunked)
        loss.backward()
        self.grad_bytes = sum(p.grad.nbytes for p in self.params if p.grad is not None)
        if not isinstance(self.opt, OptimizerInBackward):
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="bbc-news")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--target", default="all-linear")
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps per measurement (memory, then time)")
    parser.add_argument("--only", nargs="*", help="configurations to run (default: all that apply)")
    parser.add_argument("--cache-dir", default=os.environ.get("WASI_CACHE"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    causal = args.model.startswith("smollm2")
    bundle = build_model(args.model, num_classes=5, task="causal-lm" if causal else None, cache_dir=args.cache_dir)
    batches = _batches(args, bundle, causal)
    template = bundle.model
    wasi.convert(template, wasi.WASIConfig(target=args.target, eps=args.eps))
    template.train()
    layers = wasi.wasi_layers(template)
    dense = sum(m.in_features * m.out_features for _, m in layers)
    factors = sum(m.rank * (m.in_features + m.out_features) for _, m in layers)
    print(f"{args.model}: {len(layers)} {args.target} layers at eps {args.eps}: factors are {factors / dense:.0%} of "
          f"their dense weights; {sum(p.numel() for p in template.parameters()) / 1e6:.2f} M parameters; "
          f"batch {tuple(batches[0]['input_ids'].shape)}")
    names = [n for n in (CAUSAL if causal else CLASSIFIER)
             if (n in args.only if args.only else n not in ("adamw8bit", "all-8bit"))]
    try:
        trainable = [p for p in template.parameters() if p.requires_grad]
        frozen = {id(m.weight) for m in template.modules() if isinstance(m, torch.nn.Embedding)}
        for label, params in (("all trainable", trainable), ("embeddings frozen", [p for p in trainable
                                                                                 if id(p) not in frozen])):
            mb, plain = _adamw8bit_state_mb(params)
            fp32 = 2 * sum(p.nbytes for p in params) / 2**20
            print(f"optimizer state, {label}: AdamW {fp32:.1f} MB, AdamW8bit {mb:.1f} MB ({plain} of {len(params)} "
                  "tensors keep float32 moments)")
    except ImportError:
        print("torchao is not installed: no AdamW8bit state count")
    results = {n: {"peak_mb": [], "step_s": [], "first_step_s": []} for n in names}
    meter = PeakMemory("cpu")
    for rnd in range(args.rounds):
        for name in names:
            gc.collect()
            set_cpu_allocator("strict")
            _release_heap()
            meter.reset()
            run = Run(name, template, bundle, args, causal)
            first = run.step(batches[0])  # creates the optimizer state (and compiles torchao's step)
            for i in range(1, args.steps):
                run.step(batches[i % 2])
            peak = meter.peak_mb()
            set_cpu_allocator("caching")
            times = [run.step(batches[i % 2]) for i in range(args.steps)]
            r = results[name]
            r["peak_mb"].append(peak)
            r["step_s"].append(statistics.median(times))
            r["first_step_s"].append(first)
            r["state_mb"] = _state_bytes(run.opt) / 2**20
            r["grad_mb"] = run.grad_bytes / 2**20
            r["trainable_m"] = sum(p.numel() for p in run.params) / 1e6
            print(f"round {rnd} {name:18s} peak {peak:8.1f} MB  step {statistics.median(times):6.2f} s  "
                  f"first {first:6.1f} s  state {r['state_mb']:7.1f} MB  grads left {r['grad_mb']:6.1f} MB",
                  flush=True)
            del run
    base = results.get("baseline")
    print("\n| configuration | trainable (M) | optimizer state (MB) | peak (MB) | peak / baseline | step / baseline |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        peak, step = statistics.median(r["peak_mb"]), statistics.median(r["step_s"])
        r["peak_median_mb"], r["step_median_s"] = peak, step
        ratio_m = f"{peak / statistics.median(base['peak_mb']):.2f}" if base else "-"
        ratio_t = f"{step / statistics.median(base['step_s']):.2f}" if base else "-"
        print(f"| {name} | {r['trainable_m']:.2f} | {r['state_mb']:.1f} | {peak:.0f} | {ratio_m} | {ratio_t} |")
    if args.json:
        with open(args.json, "x") as f:  # never overwrite an earlier record
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
