"""``wasi bench`` end to end: the quick preset on every method, a causal LM and an image model."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from wasi.cli.bench import add_bench_parser
from wasi.training.methods import METHODS, WASI_MODES


def _bench(argv: list[str]) -> int:
    # through the real CLI once `bench` is wired into wasi.cli; through our parser until then
    from wasi.cli import build_parser, main

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "bench" in commands.choices:
        return main(["bench", *argv])
    parser = argparse.ArgumentParser(prog="wasi")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def test_quick_bench_writes_every_method_and_the_report(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _bench(["--quick", "--eps", "0.8", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == []
    assert {r["method"] for r in results["records"]} == set(METHODS)
    for key in ("torch", "wasi", "python"):
        assert results["versions"][key]
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch_threads"] >= 1
    assert results["command"].startswith("wasi bench") and results["repeats"] == 1
    measured = ("peak_memory_mb", "train_peak_mb", "weights_mb", "gradients_mb", "optimizer_state_mb",
                "saved_activation_mb", "train_step_s_median", "inference_ms_per_sample")
    for record in results["records"]:
        assert record["error"] is None, record["error"]
        assert (record["eps"] == 0.8) == (record["method"] in WASI_MODES)
        for key in measured:
            assert isinstance(record[key], float) and math.isfinite(record[key]) and record[key] >= 0, key
        assert record["peak_memory_mb"] > 0 and record["test_accuracy"] is None
        assert record["threads"] >= 1
        # memory over the 2 warm-up steps (strict allocator), time over the other 3 (caching)
        assert record["memory_steps"] == 2 and record["timing_allocator"] == "caching"
        if record["method"] in WASI_MODES:  # analytic accounting, kept apart from the measurements
            assert record["analytic"]["memory_ratio"] > 1 and record["layers"]
        else:
            assert record["analytic"] is None
    rows = {r["method"]: r for r in results["summary"]}
    assert rows["vanilla"]["ratio_to_vanilla"]["peak_memory_mb"] == pytest.approx(1.0)
    for row in rows.values():
        for key, ratio in row["ratio_to_vanilla"].items():
            assert isinstance(ratio, float) and ratio > 0, (row["name"], key)
    assert rows["lora"]["trainable_params"] < rows["vanilla"]["trainable_params"]
    assert rows["wasi"]["weights_mb"] < rows["vanilla"]["weights_mb"]  # factored weights really are smaller
    assert rows["wasi"]["analytic_ratio"] < 1
    table = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
    for png in ("memory.png", "time.png"):
        assert (out / png).stat().st_size > 1000
    assert not (out / "pareto.png").exists()  # no accuracy on synthetic data
    assert "weight rank per layer" in capsys.readouterr().out


def test_a_bf16_bench_stepping_inside_backward_records_both_and_keeps_no_gradients(tmp_path):
    out = tmp_path / "levers"
    assert _bench(["--quick", "--methods", "vanilla,wasi", "--eps", "0.8", "--steps", "3", "--precision", "bf16",
                   "--optimizer-in-backward", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["precision"] == "bf16" and results["settings"]["optimizer_in_backward"] is True
    assert {r["method"] for r in results["records"]} == {"vanilla", "wasi"}
    for record in results["records"]:
        assert record["error"] is None, record["error"]
        assert record["precision"] == "bf16" and record["optimizer_in_backward"] is True
        assert record["gradients_mb"] == 0.0  # each gradient freed inside backward, once its parameter stepped
        assert record["optimizer_state_mb"] > 0  # AdamW's moments, kept by the optimizers inside backward
        assert math.isfinite(record["loss_first"]) and math.isfinite(record["loss_last"])
    table = (out / "results.md").read_text()
    assert "`--precision bf16`" in table and "`--optimizer-in-backward`" in table


def test_a_profiled_bench_reports_the_top_operators_and_wasi_s_own_work(tmp_path):
    out = tmp_path / "profile"
    assert _bench(["--quick", "--methods", "vanilla,wasi", "--eps", "0.8", "--steps", "3", "--profile", "5",
                   "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    profiles = {r["method"]: r["op_profile"] for r in results["records"]}
    for method, profile in profiles.items():
        assert len(profile["ops"]) == 5 and profile["step_ms"] > 0, method
        shares = [op["share"] for op in profile["ops"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert profiles["vanilla"]["wasi_ms"] == {}  # nothing of WASI's in a dense step
    work = profiles["wasi"]["wasi_ms"]
    assert {"wasi::compress_input", "wasi::weight_subspace", "WASILinearFunctionBackward"} <= set(work)
    assert all(0 < ms <= profiles["wasi"]["step_ms"] for ms in work.values())
    table = (out / "results.md").read_text()
    assert "## One training step under the profiler" in table and "compressing inputs" in table
    assert _bench(["--quick", "--profile", "-1", "--out", str(tmp_path / "bad")]) == 2


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_a_causal_lm_bench_reports_perplexity_against_memory_and_time(tiny_llama, text_folder, tmp_path):
    out = tmp_path / "lm"
    code = _bench(["--model", str(tiny_llama), "--data", str(text_folder), "--methods", "vanilla,wasi",
                   "--eps", "0.8", "--fidelity", "0.9,0", "--steps", "3", "--repeats", "1", "--batch-size", "4",
                   "--max-length", "16", "--train-epochs", "1", "--max-train-samples", "16", "--max-eval-samples",
                   "8", "--lr", "3e-3", "--init-samples", "8", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert code == 0 and results["failed"] == [], [r.get("error") for r in results["records"]]
    names = {(r["method"], r["eps"]) for r in results["records"]}
    assert names == {("vanilla", None), ("wasi+fidelity0.9", 0.8), ("wasi", 0.8)}
    for record in results["records"]:
        assert record["task"] == "causal-lm" and record["test_accuracy"] is None
        assert _finite(record["test_perplexity"]) and record["test_perplexity"] > 1
        assert _finite(record["loss_first"]) and _finite(record["peak_memory_mb"])
        run = record["train_run"]  # the accuracy run's own measurements, beside its score
        assert _finite(run["peak_memory_mb"]) and _finite(run["train_step_s_median"])
        assert _finite(run["inference_ms_per_sample"]) and run["train_steps"] == 4  # 16 windows of batch 4
    fitted = next(r for r in results["records"] if r["method"] == "wasi+fidelity0.9")
    assert fitted["fidelity"] == 0.9 and fitted["layers"]
    assert json.loads((out / "train" / "wasi+fidelity0.9-eps0.8" / "summary.json").read_text())["fidelity"] == 0.9
    table = (out / "results.md").read_text()
    assert "## Test perplexity against memory and time (the accuracy runs)" in table
    for name in ("vanilla", "wasi+fidelity0.9", "wasi"):
        assert f"| {name} |" in table
    assert "test ppl" in table and "`+fidelityF`" in table
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "pareto.png" in results["plots"]


def test_an_image_model_bench_runs_through_train_s_preparation(tiny_dinov2, tmp_path):
    out = tmp_path / "img"
    code = _bench(["--model", str(tiny_dinov2), "--data", "digits", "--methods", "vanilla,lora+checkpointing,wasi",
                   "--eps", "0.8", "--steps", "3", "--repeats", "1", "--batch-size", "8", "--train-epochs", "1",
                   "--max-train-samples", "32", "--max-eval-samples", "32", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert code == 0 and results["failed"] == [], [r.get("error") for r in results["records"]]
    assert {r["method"] for r in results["records"]} == {"vanilla", "lora+checkpointing", "wasi"}
    for record in results["records"]:
        assert record["task"] == "image-classification"
        assert 0.0 <= record["test_accuracy"] <= 1.0 and _finite(record["train_run"]["peak_memory_mb"])
    assert next(r for r in results["records"] if r["method"] == "lora+checkpointing")["checkpointing"]
    table = (out / "results.md").read_text()
    assert "## Test accuracy against memory and time (the accuracy runs)" in table and "| test acc |" in table
    assert (out / "pareto.png").stat().st_size > 1000
