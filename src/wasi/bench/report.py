"""A benchmark's report: medians over repeats, ratios to vanilla, results.json/.md and plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from wasi.bench.settings import SYNTHETIC, run_name
from wasi.training.settings import DEFAULT_INIT_SAMPLES

# measured fields whose median over repeats is reported
MEDIAN_FIELDS = (
    "peak_memory_mb", "setup_peak_mb", "train_peak_mb", "weights_mb", "buffers_mb", "gradients_mb",
    "optimizer_state_mb", "saved_activation_mb", "other_mb", "train_step_s_median", "inference_ms_per_batch",
    "inference_ms_per_sample", "test_accuracy", "best_val_accuracy", "test_perplexity", "test_loss", "loss_last",
)
# what the accuracy runs (``--train-epochs``) measured of themselves: the frontier's axes
TRAIN_RUN_FIELDS = (("peak_memory_mb", "measured peak memory (MB)"),
                    ("train_step_s_median", "training step (s, median)"),
                    ("inference_ms_per_sample", "inference (ms per sample)"))
# ratio = method / vanilla, lower is better for every one
RATIO_FIELDS = ("peak_memory_mb", "train_peak_mb", "saved_activation_mb", "train_step_s_median",
                "inference_ms_per_sample")
BREAKDOWN = (("weights_mb", "weights"), ("buffers_mb", "buffers"), ("gradients_mb", "gradients"),
             ("optimizer_state_mb", "optimizer state"), ("saved_activation_mb", "saved activations"),
             ("other_mb", "other: peak - sum of the others"))


def _median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def summarize(records: list[dict], pairs: list[tuple[str, float | None]]) -> list[dict]:
    """One row per (method, eps): medians over the successful repeats and ratios to vanilla.

    Args:
        records: the worker records of every repeat.
        pairs: the (method, eps) pairs, in report order.

    Returns:
        Rows with ``method``, ``eps``, ``repeats_ok``, ``errors``, the median of every
        ``MEDIAN_FIELDS`` entry, ``ratio_to_vanilla`` (method median / vanilla median, None
        without a vanilla run), ``analytic`` (WASI methods, from the first successful repeat;
        ``analytic_ratio`` = WASI / dense of the wrapped layers) and ``layers``.
    """
    rows = []
    for method, eps in pairs:
        mine = [r for r in records if r["method"] == method and r["eps"] == eps]
        ok = [r for r in mine if not r.get("error")]
        row = {"method": method, "eps": eps, "name": run_name(method, eps), "repeats_ok": len(ok),
               "errors": [r["error"] for r in mine if r.get("error")]}
        for key in MEDIAN_FIELDS:
            row[key] = _median([r.get(key) for r in ok])
        first = ok[0] if ok else {}
        row["analytic"] = first.get("analytic")
        ratio = (row["analytic"] or {}).get("memory_ratio")
        row["analytic_ratio"] = 1 / ratio if ratio else None
        row["layers"] = first.get("layers")
        row["trainable_params"] = first.get("trainable_params")
        row["train_run"] = next((r["train_run"] for r in ok if r.get("train_run")), None)
        rows.append(row)
    vanilla = next((r for r in rows if r["method"] == "vanilla" and r["repeats_ok"]), None)
    for row in rows:
        row["ratio_to_vanilla"] = {
            key: (row[key] / vanilla[key] if vanilla and row[key] is not None and vanilla[key] else None)
            for key in RATIO_FIELDS
        }
    return rows


def score_of(rows: list[dict]) -> tuple[str, str, bool]:
    """The test score the accuracy runs report: ``(field, label, lower_is_better)``; perplexity for a
    causal LM, else accuracy."""
    if any(r.get("test_perplexity") is not None for r in rows):
        return "test_perplexity", "test perplexity", True
    return "test_accuracy", "test accuracy", False


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(results: dict) -> str:
    """The results.md text: settings, the table of medians, ranks, failures."""
    s = results["settings"]
    v, m = results["versions"], results["machine"]
    rows = results["summary"]
    lines = [
        "# wasi bench", "",
        f"`{results['command']}`", "",
        f"- model `{s['model']}`, data `{s['data']}`, batch {s['batch_size']}, {s['steps']} steps "
        f"(median step time skips {min(2, s['steps'] - 1)} warm-up), target `{s['target']}`, optimizer "
        f"{s['optimizer']} lr {s['lr']:g}"
        + (f" (lora {s['lora_lr']:g})" if s.get("lora_lr", s["lr"]) != s["lr"] else "")
        + f", seed {s['seed']}, device {s['device']}",
        (f"- {results['repeats']} interleaved repeat(s), each run in a fresh process; medians over repeats; "
        "ratios are method / vanilla of this benchmark (lower is better)"),
        f"- torch {v['torch']}, wasi {v['wasi']}, python {v['python']}; {m['platform']}, "
        f"{m['cpu_count']} CPUs, {m['torch_threads']} torch threads"
        + (f", {m['cuda']}" if m.get("cuda") else ""),
        ("- measured peak: process peak above the baseline taken after the data is loaded and before the "
        "model is built (CPU: VmHWM; CUDA: max_memory_allocated). `train-phase peak` re-arms the peak after "
        "the model, method and optimizer are set up (same baseline) and is read over the warm-up steps. "
        "Analytic = the paper-style count (weights + saved inputs of the wrapped layers only), WASI / dense."),
        ("- CPU allocator: the warm-up steps run with glibc's mmap threshold at 64 KiB, so that the resident "
        "set follows the live tensors; the timed steps and inference run with blocks up to 32 MiB reused "
        "from the heap, glibc's default steady state (`wasi.training.measure.set_cpu_allocator`)."),
    ]
    if s.get("checkpointing"):
        lines.append("- `--checkpointing`: every method runs with activation checkpointing on top")
    if s.get("precision", "fp32") != "fp32":
        lines.append(f"- `--precision {s['precision']}`: every method's forward and loss (training and timed "
                     "inference) run under torch.autocast; weights, gradients and optimizer state stay float32")
    if s.get("optimizer_in_backward"):
        lines.append("- `--optimizer-in-backward`: every method updates each parameter inside backward and frees "
                     "its gradient (each clipped to norm 2.0 on its own, not globally), so `gradients` is what is "
                     "left after backward: none")
    if s.get("freeze_embeddings"):
        lines.append("- `--freeze-embeddings`: every method keeps the model's nn.Embedding tables frozen (no "
                     "gradient, no optimizer state)")
    if s.get("train_epochs") and any(m.split("+")[0] in ("wsi", "wasi") for m in s["methods"]):
        fit = s.get("init_samples", 0)  # None: wasi train's default; absent in results older than the option
        if fit is None:
            fit = DEFAULT_INIT_SAMPLES
        if fit and s.get("max_train_samples") and s["max_train_samples"] < fit:
            fit = s["max_train_samples"]  # the fit takes the training samples there are
        lines.append(f"- accuracy runs: wsi and wasi start from factors fitted to the layers' outputs on {fit} "
                     "training samples (`--init-samples`, same ranks)" if fit else
                     "- accuracy runs: wsi and wasi start from the truncated SVD of each weight (`--init-samples 0`)")
    if s.get("recompute"):
        lines.append("- `--recompute`: wsi, wasi-reference and wasi rebuild the MLP activation's input (and a ViT's "
                     "attention q, k, v) from the low-rank code in backward instead of storing them")
    if s.get("track_every", 1) > 1:
        lines.append(f"- `--track-every {s['track_every']}`: asi, wasi-reference and wasi update their activation "
                     "bases (but the batch mode's) every this many steps and only project the input in between")
    if s.get("fidelity"):
        lines.append("- `+fidelityF`: wsi and wasi choose each layer's weight rank to keep the fraction F of the "
                     "converted layers' output energy on the fit samples (`wasi train --fidelity`), in the "
                     "measurement runs and the accuracy runs alike")
    if s["data"] == SYNTHETIC and s["spectrum_decay"] > 0:
        lines.append("- synthetic data; a randomly initialised model's linear weights get a power-law "
                     f"spectrum s_j ~ j^-{s['spectrum_decay']:g} (same Frobenius norm), see "
                     "`wasi.bench.synthetic`")
    score, score_label, _ = score_of(rows)
    short = "test ppl" if score == "test_perplexity" else "test acc"
    lines += ["", ("| method | eps | peak MB | ÷ vanilla | train-phase peak MB | ÷ vanilla | saved act MB | "
              "÷ vanilla | step s | ÷ vanilla | inference ms/sample | ÷ vanilla | " + short + " | "
              "analytic ÷ dense |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["ratio_to_vanilla"]
        if not r["repeats_ok"]:
            lines.append(f"| {r['method']} | {_fmt(r['eps'], 'g')} | failed |" + " |" * 11)
            continue
        lines.append(
            f"| {r['method']} | {_fmt(r['eps'], 'g')} | {_fmt(r['peak_memory_mb'])} | "
            f"{_fmt(q['peak_memory_mb'], '.2f', 'x')} | {_fmt(r['train_peak_mb'])} | "
            f"{_fmt(q['train_peak_mb'], '.2f', 'x')} | {_fmt(r['saved_activation_mb'], '.2f')} | "
            f"{_fmt(q['saved_activation_mb'], '.3f', 'x')} | {_fmt(r['train_step_s_median'], '.4f')} | "
            f"{_fmt(q['train_step_s_median'], '.2f', 'x')} | {_fmt(r['inference_ms_per_sample'], '.3f')} | "
            f"{_fmt(q['inference_ms_per_sample'], '.2f', 'x')} | {_fmt(r[score], '.4f')} | "
            f"{_fmt(r['analytic_ratio'], '.3f', 'x')} |"
        )
    trained = [r for r in rows if r.get("train_run")]
    if trained:
        lines += ["", f"## {score_label.capitalize()} against memory and time (the accuracy runs)", "",
                  (f"Each row is one training run (`--train-epochs`): its {score_label}, and the peak memory, "
                   "median step time and inference time that same run measured (`wasi train`'s summary)."), "",
                  f"| method | eps | {score_label} | peak MB | step s | inference ms/sample | train steps |",
                  "|---|---|---|---|---|---|---|"]
        for r in trained:
            t = r["train_run"]
            lines.append(f"| {r['method']} | {_fmt(r['eps'], 'g')} | {_fmt(r[score], '.4f')} | "
                         f"{_fmt(t.get('peak_memory_mb'))} | {_fmt(t.get('train_step_s_median'), '.4f')} | "
                         f"{_fmt(t.get('inference_ms_per_sample'), '.3f')} | {_fmt(t.get('train_steps'), 'd')} |")
    lines += ["", "## Memory breakdown (MB, medians)", "",
              ("Sizes of what a step holds; they are not all alive at once (saved activations are freed "
              "during backward while gradients appear; optimizer state is created at the first step), so "
              "`other` = train-phase peak - the rest is negative when they do not coexist and positive for "
              "temporaries (optimizer and clipping workspaces, allocator slack)."), "",
              ("| method | eps | weights | buffers | gradients | optimizer state | saved activations | "
              "other | train-phase peak |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["repeats_ok"]:
            lines.append(f"| {r['method']} | {_fmt(r['eps'], 'g')} | "
                         + " | ".join(_fmt(r[k]) for k, _ in BREAKDOWN) + f" | {_fmt(r['train_peak_mb'])} |")
    analytic = [r for r in rows if r["analytic"]]
    if analytic:
        lines += ["", "## Analytic accounting of the wrapped layers (paper-style, not measured)", "",
                  ("| method | eps | weights MB dense → WASI | saved inputs MB dense → WASI | "
                  "fwd GFLOPs dense → WASI | bwd GFLOPs dense → WASI | inference GFLOPs dense → WASI |"),
                  "|---|---|---|---|---|---|---|"]
        for r in analytic:
            a = r["analytic"]
            lines.append(
                f"| {r['method']} | {_fmt(r['eps'], 'g')} | "
                f"{a['weight_dense_mb']:.1f} → {a['weight_wasi_mb']:.1f} | "
                f"{a['activation_dense_mb']:.2f} → {a['activation_wasi_mb']:.2f} | "
                + " | ".join(f"{a[f'{k}_gflops_dense']:.2f} → {a[f'{k}_gflops_wasi']:.2f}"
                             for k in ("forward", "backward", "inference")) + " |"
            )
    lines += _profile_tables(results.get("records", []))
    lines += _rank_tables(rows)
    failures = [(r["name"], e) for r in rows for e in r["errors"]]
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{name}`: {error.splitlines()[0]}" for name, error in failures]
    plots = results.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _rank_tables(rows: list[dict]) -> list[str]:
    lines = []
    for eps in sorted({r["eps"] for r in rows if r["layers"]}):
        with_layers = [r for r in rows if r["eps"] == eps and r["layers"]]
        lines += ["", f"## Ranks at eps {eps:g} (weight rank k; activation Tucker ranks)", "",
                  "| layer | shape (O, I) | " + " | ".join(r["method"] for r in with_layers) + " |",
                  "|---|---|" + "---|" * len(with_layers)]
        # every layer any run converted, in model order (runs at different fidelities convert
        # different layers); a run that left one unconverted shows it as a plain dense linear
        by_run = [{x["name"]: x for x in r["layers"]} for r in with_layers]
        order: dict[str, dict] = {}
        for r in with_layers:
            for x in r["layers"]:
                order.setdefault(x["name"], x)
        for name in _model_order(order):
            cells = []
            for layers in by_run:
                x = layers.get(name)
                if x is None:
                    cells.append("not converted")
                    continue
                k = "dense" if x["rank"] is None else f"k={x['rank']}"
                act = "exact" if not x["activation_ranks"] else "x".join(map(str, x["activation_ranks"]))
                cells.append(f"{k}; {act}")
            shape = order[name]["shape"]
            lines.append(f"| {name} | ({shape[0]}, {shape[1]}) | " + " | ".join(cells) + " |")
    return lines


_WASI_WORK = {"wasi::compress_input": "compressing inputs", "wasi::weight_subspace": "weight subspace",
              "WASILinearFunctionBackward": "WASI layers' backward",
              "WASILinearActFunctionBackward": "WASI layers' backward (fused activation)"}


def _profile_tables(records: list[dict]) -> list[str]:
    # `--profile N`: the first profiled repeat of each run
    seen, profiled = set(), []
    for r in records:
        name = run_name(r["method"], r["eps"])
        if r.get("op_profile") and name not in seen:
            seen.add(name)
            profiled.append((name, r["op_profile"]))
    if not profiled:
        return []
    lines = ["", "## One training step under the profiler (`--profile`)", "",
             "One more step after the measurements, under `torch.profiler`: the step's CPU time (the sum of every "
             "operator's self time), the time inside WASI's own work (inclusive: the operators it runs are in it) "
             "and the operators of most self time.", "",
             "| run | step CPU ms | WASI's own work, ms (share of the step) | top operators: self ms (share, calls) |",
             "|---|---|---|---|"]
    for name, p in profiled:
        step = p["step_ms"] or 1.0
        work = "; ".join(f"{_WASI_WORK.get(k, k)} {v:.1f} ({v / step:.0%})" for k, v in p["wasi_ms"].items()) or "-"
        ops = "; ".join(f"`{o['name']}` {o['self_ms']:.1f} ({o['share']:.0%}, {o['calls']})" for o in p["ops"])
        lines.append(f"| {name} | {p['step_ms']:.1f} | {work} | {ops} |")
    return lines


def _model_order(layers: dict) -> list[str]:
    # layer paths sorted as the model holds them: numbers compared as numbers (block 10 after block 9)
    def key(name: str) -> list:
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]

    return sorted(layers, key=key)


def plot(results: dict, out: Path) -> list[str]:
    """Write the PNG plots into ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["summary"] if r["repeats_ok"]]
    if not rows:
        return []
    names = [r["name"] for r in rows]
    written = []
    width = max(6.0, 0.55 * len(rows) + 2)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(2 * width, 4.5))
    for ax, key, label in ((ax1, "train_step_s_median", "training step (s, median)"),
                           (ax2, "inference_ms_per_sample", "inference (ms per sample, median)")):
        ax.bar(range(len(rows)), [r[key] or 0 for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(out / "time.png", dpi=100)
    plt.close(fig)
    written.append("time.png")

    fig, ax = plt.subplots(figsize=(width, 5))
    bottom = [0.0] * len(rows)
    for key, label in BREAKDOWN:
        values = [max(0.0, r[key] or 0.0) for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot(range(len(rows)), [r["peak_memory_mb"] or 0 for r in rows], "k_", markersize=18,
            label="whole-run peak")
    ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("MB above baseline")
    ax.set_title("what a step holds (not all alive at once) vs the measured peak")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)
    written.append("memory.png")

    score, label, lower = score_of(rows)
    scored = [r for r in rows if r[score] is not None and r.get("train_run")]
    if scored:
        fig, axes = plt.subplots(1, len(TRAIN_RUN_FIELDS), figsize=(6 * len(TRAIN_RUN_FIELDS), 4.5))
        colors = {r["name"]: f"C{i % 10}" for i, r in enumerate(scored)}  # one colour per run in every panel
        for ax, (key, axis) in zip(axes, TRAIN_RUN_FIELDS):
            points = sorted((r["train_run"][key], r[score], r["name"]) for r in scored
                            if isinstance(r["train_run"].get(key), (int, float)))
            for x, y, name in points:
                ax.scatter(x, y, color=colors[name])
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = pareto_front([(x, y) for x, y, _ in points], lower_is_better=lower)
            if front:
                ax.plot(*zip(*front), "k--", linewidth=0.8, label="Pareto front")
                ax.legend(fontsize=7)
            ax.set(xlabel=axis, ylabel=label, title=f"{label} vs {axis.split(' (')[0]}")
        fig.suptitle("the accuracy runs: score and what the same run measured", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=100)
        plt.close(fig)
        written.append("pareto.png")
    return written


def pareto_front(points: list[tuple[float, float]], *, lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no cheaper point beats: sorted by cost ``x``, each better in ``y`` than all before it."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or (y < front[-1][1] if lower_is_better else y > front[-1][1]):
            front.append((x, y))
    return front


def write_report(results: dict, out: Path) -> list[Path]:
    """Write results.json, the plots and results.md into ``out``; returns the paths."""
    results["plots"] = plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *(out / p for p in results["plots"])]
