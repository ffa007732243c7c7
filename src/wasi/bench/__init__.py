"""``wasi bench``: every method side by side on one model, data, batch and seed.

Each (method, eps, repeat) runs in a fresh process (:mod:`wasi.bench.worker`) that measures
the process peak memory above a baseline and its breakdown, step and inference times and,
for the WASI methods, the paper-style analytic accounting; :mod:`wasi.bench.runner`
interleaves the runs over repeats and :mod:`wasi.bench.report` writes medians, ratios to
vanilla and plots.
"""

from wasi.bench.command import add_bench_parser, cmd_bench
from wasi.bench.runner import run_bench
from wasi.bench.settings import BenchSettings

__all__ = ["BenchSettings", "add_bench_parser", "cmd_bench", "run_bench"]
