"""Profile what a training step saves for backward: bytes by producing op, per configuration.

One forward pass per configuration of the same model and batch, under
``torch.autograd.graph.saved_tensors_hooks``; each saved tensor is attributed to the autograd
node that saved it (parameters, buffers and tensors already seen are skipped).

    python benchmarks/saved_tensors.py --model vit-b32 --batch-size 128 --eps 0.4
"""

from __future__ import annotations

import argparse
import collections
import copy
import json

import torch

import wasi
from wasi.bench.synthetic import decay_spectrum
from wasi.models import build_vit

CONFIGS = {
    "vanilla": None,
    "wasi mlp": {"target": "mlp"},
    "wasi all-linear": {"target": "all-linear"},
    "wasi all-linear + recompute": {"target": "all-linear", "recompute_from_code": True},
}


def _claim(value, name: str, ids: dict, found: set, by_node: dict) -> None:
    if isinstance(value, torch.Tensor):
        key = (value.data_ptr(), tuple(value.shape))
        if key in ids and key not in found:
            found.add(key)
            by_node[name] += ids[key].untyped_storage().nbytes()


def profile(model: torch.nn.Module, images: torch.Tensor) -> dict[str, int]:
    """Bytes saved for backward by one forward, keyed by the saving autograd node's name.

    Counts storages, as ``wasi.memory.count_saved_tensors`` does (its total is the same).
    """
    ignore = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    pending: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), tuple(t.shape))
        if t.data_ptr() not in ignore and key not in seen:
            seen.add(key)
            pending.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images)
    # views of one storage (SDPA's output and the projection's input) count once, for the
    # node that saved the storage first in the forward pass
    first: dict[int, tuple[int, tuple[int, ...]]] = {}
    for t in pending:
        first.setdefault(t.untyped_storage().data_ptr(), (t.data_ptr(), tuple(t.shape)))
    pending = [t for t in pending if first[t.untyped_storage().data_ptr()] == (t.data_ptr(), tuple(t.shape))]
    by_node: dict[str, int] = collections.Counter()
    ids = {(t.data_ptr(), tuple(t.shape)): t for t in pending}
    found: set[tuple[int, tuple[int, ...]]] = set()
    stack, visited = [out.grad_fn], set()
    while stack:  # walk the graph and match saved tensors to their nodes by identity
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except RuntimeError:
                    continue
                values = value if isinstance(value, (tuple, list)) else (value,)
                for v in values:
                    _claim(v, node.name(), ids, found, by_node)
        if hasattr(node, "saved_tensors") and "Backward" in node.name():
            try:
                for v in node.saved_tensors:
                    _claim(v, node.name(), ids, found, by_node)
            except RuntimeError:
                pass
        stack.extend(f for f, _ in node.next_functions)
    rest = sum(t.untyped_storage().nbytes() for k, t in ids.items() if k not in found)
    if rest:
        by_node["(unattributed)"] += rest
    by_node["total"] = sum(t.untyped_storage().nbytes() for t in ids.values())
    return dict(by_node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-b32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.4)
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = build_vit(args.model, 10)
    decay_spectrum(base, alpha=0.5, seed=0, skip=("head",))
    s = base.shape
    images = torch.randn(args.batch_size, s.channels, s.image_size, s.image_size)
    table = {}
    for name, options in CONFIGS.items():
        model = copy.deepcopy(base).train()
        if options is not None:
            wasi.convert(model, wasi.WASIConfig(eps=args.eps, **options))
        table[name] = profile(model, images)
        del model
    nodes = sorted({n for t in table.values() for n in t if n != "total"}, key=lambda n: -table["vanilla"].get(n, 0))
    mb = 2**20
    print(f"saved for backward, MB: {args.model}, batch {args.batch_size}, eps {args.eps}")
    print("| node | " + " | ".join(CONFIGS) + " |")
    print("|---|" + "---|" * len(CONFIGS))
    for n in [*nodes, "total"]:
        print(f"| {n} | " + " | ".join(f"{table[c].get(n, 0) / mb:.1f}" for c in CONFIGS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "bytes": table}, f, indent=1)


if __name__ == "__main__":
    main()
