"""Does a WASI step still descend on a real model? Gradient cosine per layer and the first step's size.

Fine-tunes all-MiniLM-L6-v2 on SpamAssassin e-mails (the split ``wasi train --data spam`` uses,
factors fitted to 256 training e-mails as ``wasi train`` does) once per variant, every variant from
the same model, batches and seed, and prints for each converted layer the cosine between the
compressed and the exact weight gradient at its probes (``WASIConfig.grad_check_every``), the
activation ranks it ends with, and the validation accuracy and loss at the end.

Variants: ``before`` (plain factor gradients, no fidelity floor: the behaviour of format version
1), ``after`` (the defaults: scaled factor step, ``grad_cosine_floor``), ``reference`` (the paper's
algorithm). ``--first-step`` instead measures, per layer, how far one SGD step moves ``L R``
(``||delta(L R)||``) in each mode from the same weights and batch, and its ratio to ``reference``.

``--model dinov2-s --data fashion-mnist`` runs the same comparison on DINOv2 ViT-S/14 (the split and
image size of ``wasi train``; ``--fidelity`` chooses the weight ranks as ``wasi train`` does, 0: by
``--eps``).

    python benchmarks/grad_fidelity.py --steps 96 --grad-check-every 8 --variants before,after
    python benchmarks/grad_fidelity.py --first-step --lr 0.05
    python benchmarks/grad_fidelity.py --model dinov2-s --data fashion-mnist --image-size 56 \
        --max-train-samples 2000 --max-eval-samples 500 --fidelity 0.9998 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import wasi
from wasi.data import load_dataset, split_stratified
from wasi.modules import collect_grad_cosines
from wasi.training.batches import epoch_order, make_batch, make_split
from wasi.training.models import build_model, model_logits

VARIANTS = {
    "before": {"mode": "factored", "precondition": False, "grad_cosine_floor": 0.0},
    "after": {"mode": "factored"},
    "reference": {"mode": "reference"},
}


def _setup(args):
    torch.manual_seed(args.seed)
    data = load_dataset(args.data)
    train, val, _ = split_stratified(data, fractions=(0.8, 0.1, 0.1), seed=args.seed)
    bundle = build_model(args.model, num_classes=len(data.classes))
    pad = bundle.tokenizer.pad_token_id if bundle.tokenizer is not None else 0
    train = _head(train, args.max_train_samples)
    val = _head(val, args.max_eval_samples)
    return (bundle, make_split(train, bundle, args.max_length, args.image_size),
            make_split(val, bundle, args.max_length, args.image_size), pad)


def _head(ds, count):
    """The first ``count`` samples of a Dataset (all when None or larger), as ``wasi train`` cuts them."""
    return ds if count is None or count >= len(ds) else ds.subset(list(range(count)))


def _convert(args, bundle, train, pad, fields, fit=True):
    model = bundle.model

    def calibration():
        count = min(args.init_samples, train.size)
        step = 64 if args.model == "minilm" else args.batch_size  # the fidelity measure runs a backward
        for start in range(0, count, step):
            idx = torch.arange(start, min(start + step, count))
            bundle.logits(make_batch(train, idx, pad, torch.device("cpu")))

    fit = fit and args.init_samples > 0 and fields["mode"] != "reference"  # as wasi train: wsi and wasi only
    fidelity = (args.fidelity or None) if fit else None  # ranks by fidelity are chosen from the fit
    config = wasi.WASIConfig(eps=args.eps, target=args.target, seed=args.seed, fidelity=fidelity,
                             grad_check_every=args.grad_check_every, **fields)
    wasi.convert(model, config, calibration=calibration if fit else None)
    model.train()
    return model


def _loss(model, batch):
    return F.cross_entropy(model_logits(model, batch), batch["labels"])


@torch.no_grad()
def _evaluate(model, split, pad):
    model.eval()
    correct = total = 0.0
    for start in range(0, split.size, 64):
        idx = torch.arange(start, min(start + 64, split.size))
        batch = make_batch(split, idx, pad, torch.device("cpu"))
        logits = model_logits(model, batch)
        total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    model.train()
    return correct / split.size, total / split.size


def _optimizer(args, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr or 0.05, momentum=0.0, weight_decay=1e-4)
    return torch.optim.AdamW(params, lr=args.lr or 1e-4, weight_decay=0.0)


def run_variant(args, name):
    bundle, train, val, pad = _setup(args)
    model = _convert(args, bundle, train, pad, VARIANTS[name])
    opt = _optimizer(args, model)
    order = epoch_order(train.size, args.seed, 0)
    cosines: dict[str, list[tuple[int, float]]] = {}
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = order[step * args.batch_size: (step + 1) * args.batch_size]
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, make_batch(train, idx, pad, torch.device("cpu")))
        loss.backward()
        for layer, value in collect_grad_cosines(model).items():
            cosines.setdefault(layer, []).append((step + 1, value))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 2.0)
        opt.step()
        losses.append(loss.item())
    accuracy, val_loss = _evaluate(model, val, pad)
    layers = {}
    for layer_name, layer in wasi.wasi_layers(model):
        values = [v for _, v in cosines.get(layer_name, [])]
        layers[layer_name] = {
            "cosines": cosines.get(layer_name, []),
            "min": min(values) if values else None,
            "median": statistics.median(values) if values else None,
            "final_activation_ranks": layer.last_activation_ranks,
            "rank_boost": int(layer.rank_boost),
        }
    return {"variant": name, "config": VARIANTS[name], "val_accuracy": accuracy, "val_loss": val_loss,
            "first_loss": losses[0], "last10_loss": statistics.mean(losses[-10:]), "layers": layers,
            "seconds": time.perf_counter() - t0}


def first_step(args):
    """Per layer, ||delta(L R)|| of one SGD step (no weight decay) in each mode, same weights and batch.

    Every mode starts from the truncated SVD (no fit), so ``L R`` is the same before the step.
    """
    out = {}
    for name, fields in (("reference", {"mode": "reference"}),
                         ("factored, plain factor gradients", {"mode": "factored", "precondition": False}),
                         ("factored, scaled step (default)", {"mode": "factored"})):
        bundle, train, _, pad = _setup(args)
        model = _convert(args, bundle, train, pad, {**fields, "grad_cosine_floor": 0.0}, fit=False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr or 0.05)
        idx = epoch_order(train.size, args.seed, 0)[: args.batch_size]
        loss = _loss(model, make_batch(train, idx, pad, torch.device("cpu")))
        before = {n: layer.effective_weight().detach().clone() for n, layer in wasi.wasi_layers(model)}
        loss.backward()
        opt.step()
        moved = {}
        with torch.no_grad():
            for n, layer in wasi.wasi_layers(model):
                if layer.config.mode == "reference":  # the next forward's subspace step projects the new W
                    left, right = wasi.functional.track_weight_subspace(layer.weight, layer.left)
                    now = left @ right
                else:
                    now = layer.effective_weight()
                moved[n] = float((now - before[n]).norm())
        out[name] = moved
    return out


def markdown(results: list[dict]) -> str:
    """One row per layer: each variant's lowest and median cosine and its final activation ranks."""
    head = "| layer | " + " | ".join(f"{r['variant']}: cosine min / median | ranks" for r in results) + " |"
    lines = [head, "|---|" + "---|---|" * len(results)]
    for name in results[0]["layers"]:
        cells = []
        for r in results:
            layer = r["layers"][name]
            cosine = "-" if layer["min"] is None else f"{layer['min']:.3f} / {layer['median']:.3f}"
            ranks = layer["final_activation_ranks"]
            cells += [cosine, "x".join(map(str, ranks)) if ranks else "-"]
        short = name.replace("bert.encoder.", "").replace("dinov2.encoder.", "")
        lines.append(f"| {short} | " + " | ".join(cells) + " |")
    lines.append("| val accuracy / loss | " + " | ".join(
        f"{r['val_accuracy']:.4f} / {r['val_loss']:.4f} | " for r in results) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="before,after", help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--model", default="minilm", choices=("minilm", "dinov2-s"))
    parser.add_argument("--data", default=None, help="default spam (minilm), fashion-mnist (dinov2-s)")
    parser.add_argument("--image-size", type=int, default=None, help="dinov2-s: image side (default 224)")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None, help="validation samples")
    parser.add_argument("--fidelity", type=float, default=0.0,
                        help="weight ranks by output fidelity on the fit samples (0, the default: by --eps)")
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--target", default="mlp")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--lr", type=float, default=None, help="default 1e-4 adamw, 0.05 sgd")
    parser.add_argument("--grad-check-every", type=int, default=8)
    parser.add_argument("--init-samples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-step", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--table", default=None, help="print the markdown table of a --json file and exit")
    args = parser.parse_args()
    if args.data is None:
        args.data = "spam" if args.model == "minilm" else "fashion-mnist"
    if args.table:
        with open(args.table) as handle:
            print(markdown(json.load(handle)["results"]))
        return
    warnings.simplefilter("ignore", FutureWarning)
    if args.first_step:
        results = first_step(args)
        names = list(next(iter(results.values())))
        print(f"{'layer':<40} " + " ".join(f"{k[:30]:>30}" for k in results))
        for n in names:
            ref = results["reference"][n]
            print(f"{n:<40} " + " ".join(f"{v[n]:>21.3e} ({v[n] / ref:5.1f}x)" for v in results.values()))
    else:
        results = []
        for variant in args.variants.split(","):
            r = run_variant(args, variant)
            results.append(r)
            print(f"\n{r['variant']} {r['config']}: val accuracy {r['val_accuracy']:.4f}, val loss "
                  f"{r['val_loss']:.4f}, loss first {r['first_loss']:.4f} / mean of last 10 "
                  f"{r['last10_loss']:.4f} ({r['seconds']:.0f} s)")
            for n, layer in r["layers"].items():
                if layer["min"] is None:
                    continue
                print(f"  {n:<40} cosine min {layer['min']:6.3f} median {layer['median']:6.3f} "
                      f"({len(layer['cosines'])} probes) final ranks {layer['final_activation_ranks']}",
                      flush=True)
        print("\n" + markdown(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
