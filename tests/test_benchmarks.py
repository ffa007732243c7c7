"""The scripts in benchmarks/ run on tiny inputs."""

from __future__ import annotations


def test_step_profile_script_reports_the_peak_and_where(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "step_profile.py"
    spec = importlib.util.spec_from_file_location("step_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # --top lists every label, so that the recomputed block's is there whatever the resident set's noise
    # (a tiny model's labels differ by fractions of a MB); --ops ends under the caching allocator
    module.main(["--model", "vit-micro", "--method", "wasi+checkpointing", "--eps", "0.8", "--batch-size", "4",
                 "--steps", "2", "--top", "1000", "--ops"])
    out = capsys.readouterr().out
    assert "wasi+checkpointing eps 0.8, batch 4: peak" in out
    assert "backward blocks." in out  # a block recomputed in backward, labelled
    assert "one training step, top operators" in out and "one inference batch" in out


def test_grad_fidelity_script_takes_image_batches():
    import importlib.util
    from pathlib import Path

    import torch

    from wasi.training.batches import Split
    from wasi.training.models import build_model

    path = Path(__file__).parent.parent / "benchmarks" / "grad_fidelity.py"
    spec = importlib.util.spec_from_file_location("grad_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    bundle = build_model("vit-micro", num_classes=3)
    images = torch.randn(5, bundle.channels, bundle.image_size, bundle.image_size)
    split = Split(5, torch.tensor([0, 1, 2, 0, 1]), images=images)
    loss = module._loss(bundle.model, {"images": images[:2], "labels": split.labels[:2]})
    assert loss.ndim == 0 and torch.isfinite(loss)
    accuracy, mean_loss = module._evaluate(bundle.model, split, 0)
    assert 0 <= accuracy <= 1 and mean_loss > 0
    layer = {"min": 0.5, "median": 0.9, "final_activation_ranks": [2, 3, 4]}
    table = module.markdown([{"variant": "after", "val_accuracy": 0.5, "val_loss": 1.0,
                              "layers": {"dinov2.encoder.layer.0.mlp.fc1": layer}}])
    assert "| layer.0.mlp.fc1 | 0.500 / 0.900 | 2x3x4 |" in table


def test_allreduce_bytes_script_counts_every_trainable_gradient_once_per_step(tmp_path, monkeypatch):
    import importlib.util
    import json
    import os
    from pathlib import Path

    root = Path(__file__).parent.parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    spec = importlib.util.spec_from_file_location("allreduce_bytes", root / "benchmarks" / "allreduce_bytes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bytes.json"
    code = module.main(["--model", "vit-micro", "--data", "digits", "--methods", "vanilla,wasi", "--batch-size", "8",
                        "--steps", "1", "--warmup", "0", "--init-samples", "16", "--timeout", "300",
                        "--out", str(out)])
    assert code == 0
    methods = {m["method"]: m for m in json.loads(out.read_text())["methods"]}
    for record in methods.values():
        assert record["allreduce_bytes_per_step"] == 4 * record["trainable_params"]  # float32 gradients
        assert len(record["step_s_parallel"]) == len(record["step_s_alone"]) == 1
    wasi = methods["wasi"]
    assert 0 < wasi["factor_params"] < wasi["dense_params_of_factored"]
    saved = 4 * (wasi["dense_params_of_factored"] - wasi["factor_params"])
    assert methods["vanilla"]["allreduce_bytes_per_step"] - wasi["allreduce_bytes_per_step"] == saved


def test_decomposition_threads_script_times_both_rules_and_restores_the_threshold(capsys):
    import importlib.util
    from pathlib import Path

    from wasi import functional as WF

    path = Path(__file__).parent.parent / "benchmarks" / "decomposition_threads.py"
    spec = importlib.util.spec_from_file_location("decomposition_threads", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rule = WF.SERIAL_SIDE
    assert module.main(["--shapes", "minilm", "--threads", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert f"| one thread for sides <= {rule} |" in out and "| every thread |" in out
    assert "minilm: 36 layers" in out and "every thread / rule:" in out
    assert WF.SERIAL_SIDE == rule
