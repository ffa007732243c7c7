"""A benchmark's report (:mod:`wasi.bench.report`): medians, ratios, the text of results.md."""

from __future__ import annotations

import json

import pytest

from wasi.bench.report import summarize


def test_summary_takes_medians_and_ratios_to_vanilla():
    def record(method, eps, repeat, peak, error=None):
        base = {"method": method, "eps": eps, "repeat": repeat, "error": error}
        return base if error else {**base, "peak_memory_mb": peak, "train_peak_mb": peak,
                                   "saved_activation_mb": 1.0, "train_step_s_median": 0.1,
                                   "inference_ms_per_sample": 2.0}

    records = [record("vanilla", None, 1, 100.0), record("vanilla", None, 2, 120.0),
               record("vanilla", None, 3, 90.0), record("wasi", 0.8, 1, 40.0), record("wasi", 0.8, 2, 60.0),
               record("wasi", 0.8, 3, 0, error="boom")]
    rows = summarize(records, [("vanilla", None), ("wasi", 0.8)])
    assert rows[0]["peak_memory_mb"] == 100.0 and rows[1]["peak_memory_mb"] == 50.0
    assert rows[1]["ratio_to_vanilla"]["peak_memory_mb"] == pytest.approx(0.5)
    assert rows[1]["repeats_ok"] == 2 and rows[1]["errors"] == ["boom"]
    assert summarize(records[3:5], [("wasi", 0.8)])[0]["ratio_to_vanilla"]["peak_memory_mb"] is None


@pytest.mark.parametrize(("init_samples", "expected"), [
    (None, "fitted to the layers' outputs on 256 training samples"),
    (64, "fitted to the layers' outputs on 64 training samples"),
    (0, "start from the truncated SVD of each weight"),
    ("absent", "start from the truncated SVD of each weight"),  # results written before the option existed
])
def test_report_says_how_the_accuracy_runs_started(init_samples, expected):
    from pathlib import Path

    from wasi.bench.report import markdown

    stored = Path(__file__).parents[1] / "docs" / "results" / "minilm-spam-e1-all-linear" / "results.json"
    results = json.loads(stored.read_text())
    results["settings"].pop("init_samples", None)
    if init_samples != "absent":
        results["settings"]["init_samples"] = init_samples
    text = markdown(results)
    assert expected in text
    results["settings"]["train_epochs"] = None  # no accuracy runs: nothing to say
    assert "accuracy runs:" not in markdown(results)


def test_the_rank_table_matches_each_run_s_layers_by_name():
    from pathlib import Path

    from wasi.bench.report import markdown

    # DINOv2 at three fidelities: 2, 6 and 17 of the 24 MLP linears converted, not the same ones
    stored = Path(__file__).parents[1] / "docs" / "results" / "bench-dinov2-fm" / "results.json"
    results = json.loads(stored.read_text())
    runs = {r["method"]: {x["name"]: x for x in r["layers"]} for r in results["records"] if r.get("layers")}
    text = markdown(results)
    table = text.split("## Ranks at eps 0.8")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| dinov2.")]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert set(names) == set().union(*runs.values()) and len(names) == len(set(names))
    blocks = [int(name.split(".")[3]) for name in names]
    assert blocks == sorted(blocks)  # block 10 after block 9
    methods = ["wasi+fidelity0.9998", "wasi+fidelity0.999", "wasi+fidelity0.995"]
    for row, name in zip(rows, names):
        cells = row.strip("| ").split(" | ")[2:]
        for method, cell in zip(methods, cells):
            layer = runs[method].get(name)
            assert cell == ("not converted" if layer is None else f"k={layer['rank']}; "
                            + "x".join(map(str, layer["activation_ranks"])))
