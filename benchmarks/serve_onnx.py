"""Serving a trained run with ONNX Runtime: the low-rank export against the dense one, fp32 and int8.

For each run folder given, the model is rebuilt (``wasi.export.predict.load_run``) and exported
four ways: low-rank (each WASI layer as its two thin matmuls) and dense (each WASI layer merged to
``L R``), each in fp32 and int8 (``quantize_int8``). Every export is checked against the PyTorch
model on real test inputs (max abs difference), scored on the run's test data (accuracy, or
perplexity for a causal LM), and timed with ONNX Runtime at 1 and 2 intra-op threads, at batch 1
and at a serving batch, all sessions of a model timed in one process, interleaved, in a shuffled
order per round. An ONNX Runtime profile (batch 1, 1 thread) gives the time per op type of the
low-rank and dense fp32 graphs. The CPU is shared: compare ratios within one run of this script.

    python benchmarks/serve_onnx.py --out docs/results/serve-onnx --work /tmp/serve RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from wasi.convert import wasi_layers
from wasi.export.onnx import export_onnx, max_abs_difference, run_session, session
from wasi.export.predict import Scorer, check_batch, load_run, score
from wasi.export.quantize import quantize_int8

VARIANTS = ("low-rank fp32", "dense fp32", "low-rank int8", "dense int8")


def _feed(scorer: Scorer, example) -> dict[str, torch.Tensor]:
    return {"pixel_values": example} if isinstance(example, torch.Tensor) else dict(example)


def _rows(example, count: int):
    if isinstance(example, torch.Tensor):
        return example[:count]
    return {k: v[:count] for k, v in example.items()}


def _profile(paths: dict[str, Path], feed: dict, runs: int, layers: list[str]) -> dict[str, dict]:
    """ONNX Runtime's own profile of each export (batch 1, 1 thread, runs interleaved): kernel
    milliseconds per run by op type, and those of the nodes of the WASI layers."""
    import onnxruntime as ort

    sessions = {}
    for variant, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix("")) + "-profile"
        options.log_severity_level = 3
        sessions[variant] = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    for sess in sessions.values():
        run_session(sess, feed)  # warm-up, left out below
    for _ in range(runs):
        for sess in sessions.values():
            run_session(sess, feed)
    scopes = ["/" + name.replace(".", "/") + "/" for name in layers]
    out = {}
    for variant, sess in sessions.items():
        events = json.loads(Path(sess.end_profiling()).read_text())
        model_runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
        keep_from = model_runs[1] if len(model_runs) > 1 else 0
        by_op: dict[str, float] = {}
        wasi_ms = 0.0
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < keep_from:
                continue
            ms = e["dur"] / 1000 / runs
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + ms
            node = "/" + e["name"][: -len("_kernel_time")].replace(".", "/")
            if any(scope in node for scope in scopes):
                wasi_ms += ms
        out[variant] = {"total_ms": sum(by_op.values()), "wasi_layers_ms": wasi_ms,
                        "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}
    return out


def bench_run(run_dir: Path, work: Path, args) -> dict:
    scorer = load_run(run_dir, cache_dir=args.cache_dir)
    name = run_dir.name if run_dir.name not in ("run", "") else run_dir.parent.name
    summary = scorer.summary
    folder = work / f"{summary['model']}-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    causal = scorer.feeder.task == "causal-lm"
    serving = args.lm_batch if causal else args.batch
    example, what = check_batch(scorer, max(serving, 2), cache_dir=args.cache_dir)
    layers = wasi_layers(scorer.model)
    paths: dict[str, Path] = {}
    for dense in (False, True):
        label = "dense" if dense else "low-rank"
        fp32 = folder / f"{label}.onnx"
        if not fp32.exists():
            export_onnx(scorer.model, example, fp32, dense=dense)
        int8 = folder / f"{label}.int8.onnx"
        if not int8.exists():
            quantize_int8(fp32, int8)
        paths[f"{label} fp32"], paths[f"{label} int8"] = fp32, int8
    if args.profile_only:  # the four exports' profiles, from the files a full run left
        return {"run": str(run_dir), "model": summary["model"], "profile": _profile(
            paths, _feed(scorer, _rows(example, 1)), args.profile_runs, [n for n, _ in layers])}
    record: dict = {"run": str(run_dir), "model": summary["model"], "task": scorer.feeder.task,
                    "method": summary["method"], "fidelity": summary.get("fidelity"),
                    "image_size": scorer.feeder.image_size if scorer.feeder.kind == "image" else None,
                    "tokens": None if scorer.feeder.kind == "image" else int(example["input_ids"].shape[1]),
                    "converted_layers": len(layers),
                    "ranks": {n: [layer.rank, layer.out_features, layer.in_features] for n, layer in layers},
                    "check_inputs": what, "variants": {}}
    # quality: against PyTorch on the check inputs, and on the run's test data
    samples = args.lm_samples if causal else args.samples
    for variant, path in paths.items():
        entry = record["variants"].setdefault(variant, {})
        entry["file_mib"] = path.stat().st_size / 2**20
        entry["max_abs_diff"] = max_abs_difference(path, scorer.model, example)
        onnx_scorer = load_onnx_plain(path, scorer, threads=2)
        scored = score(onnx_scorer, [summary["data"]], max_samples=samples, cache_dir=args.cache_dir)
        entry[scored.metric] = scored.value
        entry["scored"] = f"{scored.count} ({scored.what})"
    torch_scored = score(scorer, [summary["data"]], max_samples=samples, cache_dir=args.cache_dir)
    record["pytorch_" + torch_scored.metric] = torch_scored.value
    # speed: every session built first, then timed interleaved
    sessions = {(v, t): session(p, t) for v, p in paths.items() for t in (1, 2)}
    feeds = {b: _feed(scorer, _rows(example, b)) for b in (1, serving)}
    times: dict[tuple, list[float]] = {(v, t, b): [] for v, t in sessions for b in feeds}
    for (v, t), sess in sessions.items():  # warm-up
        for feed in feeds.values():
            run_session(sess, feed)
    order = list(times)
    rng = random.Random(0)
    deadline = time.perf_counter() + args.seconds
    rounds = 0
    while rounds < args.min_rounds or (time.perf_counter() < deadline and rounds < args.max_rounds):
        rng.shuffle(order)
        for v, t, b in order:
            start = time.perf_counter()
            run_session(sessions[(v, t)], feeds[b])
            times[(v, t, b)].append(time.perf_counter() - start)
        rounds += 1
    record["rounds"] = rounds
    record["serving_batch"] = serving
    for (v, t, b), values in times.items():
        record["variants"][v][f"ms_per_sample_t{t}_b{b}"] = 1000 * statistics.median(values) / b
    for (v, t, b), own in times.items():  # the dense / low-rank ratio of each round's pair, then its median
        if v.startswith("low-rank"):
            twin = times[("dense" + v[len("low-rank"):], t, b)]
            ratios = [d / lr for d, lr in zip(twin, own)]
            record["variants"][v][f"paired_ratio_t{t}_b{b}"] = statistics.median(ratios)
    record["profile"] = _profile(paths, feeds[1], args.profile_runs, [n for n, _ in layers])
    return record


def load_onnx_plain(path: Path, scorer: Scorer, threads: int) -> Scorer:
    """An export without metadata, fed with the run's own feeder."""
    sess = session(path, threads)
    names = [i.name for i in sess.get_inputs()]

    def logits(batch):
        if "images" in batch:
            return run_session(sess, {names[0]: batch["images"]})
        return run_session(sess, batch)

    return Scorer(logits, scorer.feeder)


def table(records: list[dict]) -> str:
    lines = []
    for r in records:
        size = f"{r['image_size']} px" if r["image_size"] else f"{r['tokens']} tokens"
        metric = "perplexity" if r["task"] == "causal-lm" else "accuracy"
        b = r["serving_batch"]
        lines += [f"### {r['model']} ({size}), {r['converted_layers']} WASI layers; {r['rounds']} interleaved rounds",
                  "", f"PyTorch {metric}: {r['pytorch_' + metric]:.4f}", "",
                  f"| export | file MiB | max abs diff | {metric} | ms/sample b1 t1 | b1 t2 | b{b} t1 | b{b} t2 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v in VARIANTS:
            e = r["variants"][v]
            lines.append(f"| {v} | {e['file_mib']:.1f} | {e['max_abs_diff']:.2g} | {e[metric]:.4f} | "
                         + " | ".join(f"{e[f'ms_per_sample_t{t}_b{bb}']:.2f}" for bb in (1, b) for t in (1, 2)) + " |")
        for q in ("fp32", "int8"):
            lo, de = r["variants"][f"low-rank {q}"], r["variants"][f"dense {q}"]
            ratios = [lo[f"paired_ratio_t{t}_b{bb}"] for bb in (1, b) for t in (1, 2)]
            lines.append(f"| dense / low-rank, {q} | {de['file_mib'] / lo['file_mib']:.2f} | | | "
                         + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
        lines.append("")
        for v, prof in r["profile"].items():
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(prof["by_op_ms"].items())[:4])
            lines.append(f"- profile {v}, batch 1, 1 thread: {prof['total_ms']:.2f} ms in kernels, of which the "
                         f"WASI layers' nodes {prof['wasi_layers_ms']:.2f} ms; by op: {top}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="wasi train run folders")
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--work", required=True, help="folder for the exported .onnx files and profiles")
    parser.add_argument("--batch", type=int, default=16, help="serving batch of the classifiers (default 16)")
    parser.add_argument("--lm-batch", type=int, default=4, help="serving batch of a causal LM (default 4)")
    parser.add_argument("--samples", type=int, default=None, help="test samples (windows) scored per export")
    parser.add_argument("--lm-samples", type=int, default=32, help="test windows scored per causal-LM export")
    parser.add_argument("--seconds", type=float, default=60.0, help="timing budget per model (default 60)")
    parser.add_argument("--min-rounds", type=int, default=3)
    parser.add_argument("--max-rounds", type=int, default=50)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--profile-only", action="store_true",
                        help="only profile the four exports (batch 1, 1 thread), into --out/profile.json")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    if args.profile_only:
        for run in args.runs:
            records.append(bench_run(Path(run), Path(args.work), args))
            (out / "profile.json").write_text(json.dumps(records, indent=2) + "\n")
            for v, prof in records[-1]["profile"].items():
                top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(prof["by_op_ms"].items())[:6])
                print(f"{records[-1]['model']} {v}: {prof['total_ms']:.2f} ms in kernels, WASI layers' nodes "
                      f"{prof['wasi_layers_ms']:.2f} ms; by op: {top}", flush=True)
        return
    for run in args.runs:
        print(f"== {run}", flush=True)
        records.append(bench_run(Path(run), Path(args.work), args))
        (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
        print(table(records[-1:]), flush=True)
    (out / "results.md").write_text(table(records) + "\n")


if __name__ == "__main__":
    main()
