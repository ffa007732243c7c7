"""The training run: resume equality, outputs, and the CLI's error path."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from wasi.cli import main
from wasi.training.loop import Run, TrainSettings, run_training


def _settings(out, **kw) -> TrainSettings:
    base = {"model": "vit-micro", "data": "digits", "out": str(out), "method": "wasi", "steps": 12, "batch_size": 32,
                "checkpoint_every": 5, "log_every": 4, "max_train_samples": 200, "eval_batch_size": 128, "lr": 1e-3}
    base.update(kw)
    return TrainSettings(**base)


def _final_model(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("run", [{"method": "wasi"}, {"method": "vanilla"}, {"method": "wsi", "init_samples": 50}])
def test_resume_reaches_the_same_weights(tmp_path, monkeypatch, run):
    run_training(_settings(tmp_path / "straight", **run), print_fn=lambda _m: None)

    original = Run._train_step

    def interrupt_at_seven(self, batch):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Run, "_train_step", interrupt_at_seven)
    with pytest.raises(KeyboardInterrupt):
        run_training(_settings(tmp_path / "cut", **run), print_fn=lambda _m: None)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["position"]["step"] == 7
    monkeypatch.setattr(Run, "_train_step", original)
    run_training(_settings(tmp_path / "cut", resume=True, **run), print_fn=lambda _m: None)

    straight, resumed = _final_model(tmp_path / "straight"), _final_model(tmp_path / "cut")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == [4, 8, 12]  # logged once each: the interrupted run's extras were dropped


def test_run_writes_summary_model_and_plot(tmp_path):
    out = tmp_path / "run"
    summary = run_training(_settings(out, steps=None, epochs=2), print_fn=lambda _m: None)
    written = json.loads((out / "summary.json").read_text())
    assert written["method"] == summary["method"] == "wasi"
    for field in ("method", "model", "data", "test_accuracy", "best_val_accuracy", "train_steps",
                  "peak_memory_mb", "saved_activation_mb", "train_step_s_median", "inference_ms_per_sample",
                  "trainable_params", "model_params"):
        assert field in written, field
    assert written["train_steps"] == 2 * 7  # ceil(200 / 32) batches per epoch
    assert 0.0 <= written["test_accuracy"] <= 1.0
    assert written["saved_activation_mb"] > 0
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "model" / "wasi_config.json").is_file()
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "val" for r in vals) == 2
    # the gradient cosine each WASI layer measured: logged per step, summarised per layer
    probes = [r for r in vals if r["type"] == "grad_cosine"]
    layers = {name for r in probes for name in r["grad_cosine"]}
    assert layers == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"}
    assert all(-1.0 <= v <= 1.0 for r in probes for v in r["grad_cosine"].values())
    assert set(written["grad_cosine"]) == layers
    for name, stats in written["grad_cosine"].items():
        values = [r["grad_cosine"][name] for r in probes if name in r["grad_cosine"]]
        assert stats == {"min": min(values), "median": statistics.median(values), "last": values[-1],
                         "probes": len(values)}
    assert written["grad_cosine_min"] == min(v["min"] for v in written["grad_cosine"].values())


def test_pretrain_then_finetune_loads_the_weights(tmp_path):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--model", "vit-micro", "--data", "digits", "--out", str(pre), "--steps", "5",
                 "--max-train-samples", "64"]) == 0
    assert (pre / "wasi_pretrained.json").is_file()
    summary = run_training(_settings(tmp_path / "ft", model=str(pre), steps=3), print_fn=lambda _m: None)
    assert summary["train_steps"] == 3


def test_cli_reports_every_configuration_error_at_once(tmp_path, capsys):
    code = main(["train", "--model", "no-such-model", "--data", "no-such-data", "--method", "magic",
                 "--eps", "1.5", "--batch-size", "abc", "--lr", "-1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    for needle in ("no-such-model", "no-such-data", "magic", "--eps 1.5", "--batch-size 'abc'", "--lr -1"):
        assert needle in err, needle
    assert "Traceback" not in err


def test_init_samples_fit_the_factors_and_are_checked(tmp_path, capsys, monkeypatch):
    from wasi.training import pipeline

    seen = []
    original = pipeline.apply_method

    def spy(model, method, options, *, head, calibration=None):
        seen.append(calibration)
        return original(model, method, options, head=head, calibration=calibration)

    monkeypatch.setattr(pipeline, "apply_method", spy)
    run_training(_settings(tmp_path / "fit", init_samples=40, steps=2, fidelity=0.0), print_fn=lambda _m: None)
    run_training(_settings(tmp_path / "plain", init_samples=0, steps=2), print_fn=lambda _m: None)
    run_training(_settings(tmp_path / "default", steps=2, fidelity=0.0), print_fn=lambda _m: None)
    run_training(_settings(tmp_path / "vanilla", method="vanilla", steps=2), print_fn=lambda _m: None)
    assert callable(seen[0]) and seen[1] is None and callable(seen[2]) and seen[3] is None
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("fit", "plain", "default", "vanilla")]
    assert [s["init_samples"] for s in summaries] == [40, 0, 256, 0]
    fitted, plain = _final_model(tmp_path / "fit"), _final_model(tmp_path / "plain")
    layer = "blocks.0.mlp.fc1"
    assert fitted[f"{layer}.left"].shape == plain[f"{layer}.left"].shape  # same rank
    assert not torch.allclose(fitted[f"{layer}.left"], plain[f"{layer}.left"])

    code = main(["train", "--model", "vit-micro", "--data", "digits", "--out", str(tmp_path / "x"),
                 "--method", "lora", "--init-samples", "16"])
    assert code == 2 and "--init-samples fits the weight factors" in capsys.readouterr().err
    code = main(["train", "--model", "vit-micro", "--data", "digits", "--out", str(tmp_path / "x"),
                 "--init-samples", "-3"])
    assert code == 2 and "--init-samples -3: must be a non-negative integer" in capsys.readouterr().err


def test_fidelity_chooses_the_ranks_and_is_checked(tmp_path, capsys):
    from wasi.training.loop import DEFAULT_FIDELITY

    assert _settings(tmp_path).weight_fidelity == DEFAULT_FIDELITY  # wsi / wasi by default
    assert _settings(tmp_path, init_samples=0).weight_fidelity is None  # no samples to measure on
    assert _settings(tmp_path, method="asi").weight_fidelity is None
    lines = []
    tight = run_training(_settings(tmp_path / "tight", steps=2, fidelity=0.99), print_fn=lines.append)
    loose = run_training(_settings(tmp_path / "loose", steps=2, fidelity=0.9), print_fn=lambda _m: None)
    energy = run_training(_settings(tmp_path / "energy", steps=2, fidelity=0.0), print_fn=lambda _m: None)
    assert (tight["fidelity"], loose["fidelity"], energy["fidelity"]) == (0.99, 0.9, None)
    assert any("kept dense" in line for line in lines)
    configs = [json.loads((tmp_path / n / "model" / "wasi_config.json").read_text())["layers"]
               for n in ("tight", "loose", "energy")]
    assert len(configs[2]) == 4  # by --eps every target layer is factored

    def weights(layers: dict) -> int:  # the four MLP layers are 64 x 256: a missing one stayed dense
        return sum(layers[n]["rank"] * 320 if n in layers else 64 * 256 for n in configs[2])

    assert weights(configs[0]) > weights(configs[1])  # a tighter target keeps more
    assert all(configs[1][name]["rank"] <= layer["rank"] for name, layer in configs[0].items() if name in configs[1])

    # the random-weight micro ViT: the default target would keep every layer dense, so --eps decides
    lines.clear()
    default = run_training(_settings(tmp_path / "default", steps=2), print_fn=lines.append)
    assert default["fidelity"] is None and any("ranks from --eps 0.8 instead" in line for line in lines)
    assert json.loads((tmp_path / "default" / "model" / "wasi_config.json").read_text())["layers"] == configs[2]

    for argv, message in (
        (["--fidelity", "1.5"], "--fidelity 1.5: must be in (0, 1]"),
        (["--fidelity", "0.9", "--method", "lora"], "--fidelity chooses the ranks of the weight factors"),
        (["--fidelity", "0.9", "--init-samples", "0"], "--init-samples 0 leaves none"),
        (["--fidelity", "high"], "--fidelity 'high': must be a number"),
        (["--fidelity", "0.9999", "--steps", "1"], "--fidelity 0.9999: all 4 selected layers stay dense at fidelity "
                                                   "0.9999: nothing to convert; give a lower --fidelity, or --fidelity 0"),
    ):
        code = main(["train", "--model", "vit-micro", "--data", "digits", "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, argv


def test_cli_resume_without_checkpoint_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--model", "vit-micro", "--data", "digits", "--out", str(tmp_path / "r"),
                 "--steps", "2", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err and "Traceback" not in err


def test_training_runs_in_train_mode_whatever_mode_the_model_arrives_in(tmp_path, monkeypatch):
    from wasi.training import pipeline

    original = pipeline.build_model

    def build_in_eval_mode(*args, **kwargs):
        bundle = original(*args, **kwargs)
        bundle.model.eval()  # as transformers' from_pretrained returns it
        return bundle

    monkeypatch.setattr(pipeline, "build_model", build_in_eval_mode)
    run_training(_settings(tmp_path / "eval", steps=3), print_fn=lambda _m: None)
    state = _final_model(tmp_path / "eval")
    steps = [v.item() for k, v in state.items() if k.endswith(".step")]
    assert steps and all(s == 3 for s in steps)  # every WASI layer compressed on every step


def test_text_batches_pad_to_the_longest_row_and_mask_the_padding():
    from wasi.training.batches import Split, make_batch

    split = Split(3, torch.tensor([0, 1, 1]), tokens=[[5, 6, 7], [8], [9, 10]])
    batch = make_batch(split, torch.tensor([2, 1]), pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[9, 10], [8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["labels"].tolist() == [1, 1]


def test_epoch_order_is_a_function_of_seed_and_epoch_only():
    from wasi.training.batches import epoch_order

    first = epoch_order(50, seed=3, epoch=1)
    assert sorted(first.tolist()) == list(range(50))
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(first, epoch_order(50, seed=3, epoch=1))
    assert not torch.equal(first, epoch_order(50, seed=3, epoch=2))
    assert not torch.equal(first, epoch_order(50, seed=4, epoch=1))


@pytest.mark.parametrize("method", ["vanilla", "wasi", "lora"])
def test_freeze_embeddings_keeps_the_token_tables_out_of_the_step(minilm, minilm_batch, method):
    from wasi.training.methods import MethodOptions, apply_method, build_optimizer

    options = MethodOptions(eps=0.8, target="all-linear", freeze_embeddings=True)
    model = apply_method(minilm, method, options, head="classifier")
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(tables) == 3  # word, position, token type
    optimizer = build_optimizer(model, method, options, name="adamw", lr=1e-3)
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not stepped & {id(p) for t in tables for p in t.parameters()}
    before = [t.weight.detach().clone() for t in tables]
    classifier = next(p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)
    head_before = classifier.detach().clone()
    model(**minilm_batch).loss.backward()
    optimizer.step()
    assert all(torch.equal(b, t.weight) for b, t in zip(before, tables, strict=True))
    assert not torch.equal(head_before, classifier)


def test_freeze_embeddings_without_token_tables_is_a_clear_error(tmp_path, capsys):
    from wasi.models import build_vit
    from wasi.training.methods import freeze_embeddings

    with pytest.raises(ValueError, match="ViT has no nn.Embedding layer to freeze"):
        freeze_embeddings(build_vit("vit-micro", num_classes=3))
    code = main(["train", "--model", "vit-micro", "--data", "digits", "--out", str(tmp_path / "x"), "--steps", "1",
                 "--freeze-embeddings"])
    err = capsys.readouterr().err
    assert code == 2 and "--freeze-embeddings: model 'vit-micro' has no nn.Embedding layer" in err
    assert "Traceback" not in err and not (tmp_path / "x" / "checkpoint.pt").exists()


def test_a_rank_raise_is_logged_at_the_runs_step(tmp_path, monkeypatch):
    # the layer's own step counter starts at 0; metrics.jsonl counts the run's steps from 1
    from torch import nn

    import wasi
    from wasi.training import loop

    model = wasi.convert(nn.Sequential(nn.Linear(8, 8)), wasi.WASIConfig(rank=2, activation_rank=2),
                         filter_fn=lambda _m, _n: True)
    layer = wasi.wasi_layers(model)[0][1]
    layer.grad_actions.append({"step": 36, "cosine": 0.1, "action": "raise", "ranks": [1, 1], "new_ranks": [2, 2]})
    monkeypatch.setattr(loop, "collect_grad_cosines", lambda _model: {"0": 0.1})
    run = loop.Run(_settings(tmp_path / "run"), print_fn=lambda _m: None)
    run.out.mkdir(parents=True)
    run.model, run.step = model, 36
    run._log_grad_cosines()
    records = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in records] == [("grad_cosine", 37), ("grad_action", 37)]
    assert records[1]["new_ranks"] == [2, 2] and layer.grad_actions == []
