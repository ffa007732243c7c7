"""Running a benchmark (:mod:`wasi.bench.runner`): what each worker process is told."""

from __future__ import annotations

import json

from wasi.bench.runner import environment, worker_spec
from wasi.bench.settings import BenchSettings


def test_a_worker_spec_carries_the_run_and_the_shared_train_options(tmp_path):
    settings = BenchSettings(model="vit-micro", data="digits", out=str(tmp_path), methods=("lora", "wasi"),
                             eps=(0.8,), fidelity=(0.995,), train_epochs=1, task="image-classification",
                             image_size=8, max_train_samples=64, max_eval_samples=32, track_every=4)
    specs = {m: worker_spec(settings, m, e, 1) for m, e in settings.runs()}
    assert set(specs) == {"lora", "wasi+fidelity0.995"}
    spec = specs["wasi+fidelity0.995"]
    assert spec["fidelity"] == 0.995 and spec["init_samples"] == 256 and spec["eps"] == 0.8
    assert specs["lora"]["fidelity"] is None and specs["lora"]["init_samples"] is None
    for key, value in (("task", "image-classification"), ("image_size", 8), ("max_train_samples", 64),
                       ("max_eval_samples", 32), ("track_every", 4)):
        assert spec[key] == value, key
    assert spec["train_out"].endswith("train/wasi+fidelity0.995-eps0.8")
    assert worker_spec(settings, "lora", None, 2)["train_out"] is None  # accuracy once, on the first repeat
    json.dumps(spec)  # the worker reads it as JSON


def test_the_environment_names_versions_and_machine():
    env = environment()
    assert env["versions"]["torch"] and env["machine"]["cpu_count"] >= 1
