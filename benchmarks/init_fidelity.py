"""How far conversion moves pretrained MiniLM-L6 from itself: plain SVD init against the data-aware fit.

Converts all-MiniLM-L6-v2 at one eps with each target, once with the truncated SVD of each weight
(docs WASI.md section 3) and once with the factors fitted to the layers' outputs on calibration
e-mails (``wasi.convert(..., calibration=...)``, the same ranks), and prints the mean cosine
between the converted and the dense model's outputs on held-out SpamAssassin e-mails: the tokens'
last hidden states and the pooled output. Evaluation and calibration e-mails do not overlap.
With ``--fidelity F``, one more row per target: ranks chosen by output fidelity F
(``WASIConfig(fidelity=F)``, docs WASI.md section 11; layers kept dense are counted apart),
with the weight parameters of the target layers against the dense ones.

    python benchmarks/init_fidelity.py --eps 0.8 --samples 256 --fidelity 0.999
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import wasi
from wasi.convert import select_layers
from wasi.data import load_dataset
from wasi.training.models import build_model


def _cosines(model, reference, batch) -> tuple[float, float]:
    with torch.no_grad():
        out = model.bert(**batch)
    hidden = F.cosine_similarity(out.last_hidden_state, reference.last_hidden_state, dim=-1)  # (B, N)
    mask = batch["attention_mask"].bool()  # padding tokens are not scored
    pooled = F.cosine_similarity(out.pooler_output, reference.pooler_output, dim=-1)  # (B,)
    return float(hidden[mask].mean()), float(pooled.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--samples", type=int, default=256, help="calibration e-mails")
    parser.add_argument("--eval-samples", type=int, default=128, help="held-out e-mails scored")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fidelity", type=float, nargs="*", default=[], help="also convert with ranks by fidelity")
    parser.add_argument("--targets", nargs="+", default=["mlp", "attention", "all-linear"])
    args = parser.parse_args()

    bundle = build_model("minilm", num_classes=2)
    dense, tokenizer = bundle.model.eval(), bundle.tokenizer
    texts = load_dataset("spam").texts
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held_out = [texts[i] for i in order[: args.eval_samples]]
    calibration_texts = [texts[i] for i in order[args.eval_samples : args.eval_samples + args.samples]]

    def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(chunk, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"))

    batch = encode(held_out)
    chunks = [encode(calibration_texts[i : i + 64]) for i in range(0, len(calibration_texts), 64)]
    with torch.no_grad():
        reference = dense.bert(**batch)

    print(f"all-MiniLM-L6-v2, eps {args.eps}: mean cosine to the dense model on {len(held_out)} held-out "
          f"e-mails; fit on {len(calibration_texts)} others")
    print("| target | init | layers factored / dense | weight parameters | hidden-state cosine | pooled cosine "
          "| convert s |")
    print("|---|---|---|---|---|---|---|")
    for target in args.targets:
        paths = select_layers(dense, wasi.WASIConfig(target=target))
        full = sum(dense.get_submodule(p).weight.numel() for p in paths)
        for fitted, fidelity in [(False, None), (True, None), *((True, f) for f in args.fidelity)]:
            model = copy.deepcopy(dense)

            def calibration(model=model) -> None:
                for chunk in chunks:
                    model(**chunk)

            start = time.perf_counter()
            wasi.convert(model, wasi.WASIConfig(eps=args.eps, target=target, fidelity=fidelity),
                         calibration=calibration if fitted else None)
            seconds = time.perf_counter() - start
            hidden, pooled = _cosines(model.eval(), reference, batch)
            name = f"fitted ({len(calibration_texts)})" if fitted else "plain SVD"
            if fidelity is not None:
                name = f"fidelity {fidelity:g}, {name}"
            layers = wasi.wasi_layers(model)
            kept = sum(model.get_submodule(p).weight.numel() for p in paths
                       if isinstance(model.get_submodule(p), torch.nn.Linear))
            params = kept + sum(m.left.numel() + m.right.numel() for _, m in layers)
            print(f"| {target} | {name} | {len(layers)} / {len(paths) - len(layers)} | "
                  f"{params / 1e6:.2f} M of {full / 1e6:.2f} M | {hidden:.3f} | {pooled:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
