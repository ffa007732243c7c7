"""``wasi bench``: every method side by side on one model, data, batch and seed.

Each (method, eps, repeat) runs in a fresh process (:mod:`wasi.bench.worker`) that prepares
the data and trains with ``wasi train``'s own pieces (:mod:`wasi.training.pipeline`,
:mod:`wasi.training.step`) and measures the process peak memory above a baseline and its
breakdown, step and inference times and, for the WASI methods, the paper-style analytic
accounting; with ``--train-epochs`` it also runs ``wasi train`` for the test score (accuracy,
or perplexity for a causal LM). :mod:`wasi.bench.runner` interleaves the runs over repeats and
:mod:`wasi.bench.report` writes medians, ratios to vanilla, the score against memory and time,
and plots. The command line is :mod:`wasi.cli.bench`.
"""

from wasi.bench.runner import run_bench
from wasi.bench.settings import BenchSettings

__all__ = ["BenchSettings", "run_bench"]
