"""The training loop (:mod:`wasi.training.loop`): resume equality, outputs, non-finite steps, the causal-LM task."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from wasi.cli import main
from wasi.data.lmtext import load_text_folder, split_documents
from wasi.optim import state_classes
from wasi.training.causal_lm import lm_evaluate, make_lm_split
from wasi.training.loop import Run, RunError, TrainSettings, run_training
from wasi.training.models import build_model
from wasi.training.settings import lowbit_available

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: threads only contend


def _quiet(_message: str) -> None:
    pass


def _faulty_settings(out: Path, **kw) -> TrainSettings:
    base = {"model": "vit-micro", "data": "digits", "out": str(out), "method": "wasi", "steps": 6,
            "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "max_train_samples": 96,
            "eval_batch_size": 128, "lr": 1e-3}
    base.update(kw)
    return TrainSettings(**base)


def _poison(monkeypatch, at_step: int, how: str) -> None:
    """Make the batch of step ``at_step`` (1-based) non-finite: NaN pixels, or a NaN gradient."""
    original_step, original_logits = Run._train_step, Run._logits

    def train_step(self, batch):
        if self.step + 1 == at_step and how == "input":
            batch = dict(batch, images=batch["images"].clone())
            batch["images"][0, 0, 0, 0] = float("nan")
        return original_step(self, batch)

    def logits(self, batch):
        out = original_logits(self, batch)
        if self.step + 1 == at_step and how == "gradient" and out.requires_grad:
            out.register_hook(lambda g: g * float("nan"))  # finite loss, NaN gradient
        return out

    monkeypatch.setattr(Run, "_train_step", train_step)
    monkeypatch.setattr(Run, "_logits", logits)


@pytest.mark.parametrize("how", ["input", "gradient"])
def test_skip_nonfinite_skips_the_step_counts_it_and_keeps_the_model_usable(tmp_path, monkeypatch, how):
    _poison(monkeypatch, 3, how)
    summary = run_training(_faulty_settings(tmp_path, skip_nonfinite=True), print_fn=_quiet)
    assert summary["skipped_steps"] == 1 and summary["train_steps"] == 6
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in records if r["type"] == "skip"]
    assert [r["step"] for r in skips] == [3]
    assert ("loss is nan" if how == "input" else "gradient norm is nan") in skips[0]["reason"]
    train = {r["step"]: r for r in records if r["type"] == "train"}
    assert train[3]["loss"] is None and train[2]["skipped_steps"] == 0 and train[6]["skipped_steps"] == 1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["skipped_steps"] == 1
    for key, value in state["model"].items():
        assert not value.is_floating_point() or bool(torch.isfinite(value).all()), key
    assert 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.parametrize("how,names", [("input", "blocks.0.mlp.fc1: the training input"),
                                       ("gradient", "blocks.1.mlp.fc2: the gradient reaching this layer")])
def test_without_skip_a_nonfinite_step_stops_the_run_naming_the_layer(tmp_path, monkeypatch, how, names):
    _poison(monkeypatch, 3, how)
    snapshot = {}
    original = Run._train_step

    def remember(self, batch):
        if self.step == 2:
            snapshot["checkpoint"] = (tmp_path / "checkpoint.pt").read_bytes()
        return original(self, batch)

    monkeypatch.setattr(Run, "_train_step", remember)
    with pytest.raises(RunError, match=rf"^step 3: {names}.*--skip-nonfinite"):
        run_training(_faulty_settings(tmp_path), print_fn=_quiet)
    assert (tmp_path / "checkpoint.pt").read_bytes() == snapshot["checkpoint"]


def test_vanilla_training_skips_an_infinite_loss_too(tmp_path, monkeypatch):
    original = Run._logits

    def logits(self, batch):
        out = original(self, batch)
        return out * float("inf") if self.step + 1 == 2 else out

    monkeypatch.setattr(Run, "_logits", logits)
    summary = run_training(_faulty_settings(tmp_path, method="vanilla", steps=3, skip_nonfinite=True), print_fn=_quiet)
    assert summary["skipped_steps"] == 1
    with pytest.raises(RunError, match=r"^step 2: the loss is (nan|inf); nothing was updated"):
        run_training(_faulty_settings(tmp_path / "again", method="vanilla", steps=3), print_fn=_quiet)


def _settings(out, **kw) -> TrainSettings:
    base = {"model": "vit-micro", "data": "digits", "out": str(out), "method": "wasi", "steps": 12, "batch_size": 32,
                "checkpoint_every": 5, "log_every": 4, "max_train_samples": 200, "eval_batch_size": 128, "lr": 1e-3}
    base.update(kw)
    return TrainSettings(**base)


def _checkpoint(out, optimizer: str = "adamw") -> dict:
    with torch.serialization.safe_globals(state_classes(optimizer)):  # adamw8bit: torchao's 8-bit moments
        return torch.load(out / "checkpoint.pt", weights_only=True)


def _final_model(out, optimizer: str = "adamw") -> dict[str, torch.Tensor]:
    return _checkpoint(out, optimizer)["model"]


@pytest.mark.parametrize("run", [
    {"method": "wasi"}, {"method": "vanilla"}, {"method": "wsi", "init_samples": 50},
    {"method": "wasi", "optimizer_in_backward": True}, {"method": "wasi", "track_every": 3},
    pytest.param({"method": "wasi", "optimizer": "adamw8bit"},
                 marks=pytest.mark.skipif(not lowbit_available(), reason="adamw8bit needs torchao")),
], ids=["wasi", "vanilla", "wsi-fitted", "wasi-in-backward", "wasi-track-every", "wasi-adamw8bit"])
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
    optimizer = run.get("optimizer", "adamw")
    assert _checkpoint(tmp_path / "cut", optimizer)["position"]["step"] == 7
    monkeypatch.setattr(Run, "_train_step", original)
    run_training(_settings(tmp_path / "cut", resume=True, **run), print_fn=lambda _m: None)

    straight, resumed = _final_model(tmp_path / "straight", optimizer), _final_model(tmp_path / "cut", optimizer)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == [4, 8, 12]  # logged once each: the interrupted run's extras were dropped


def test_a_bf16_run_trains_evaluates_and_times_under_autocast_and_says_so(tmp_path, monkeypatch):
    seen = set()
    original = Run._logits

    def logits(self, batch):
        out = original(self, batch)
        seen.add((self.model.training, torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(Run, "_logits", logits)
    summary = run_training(_settings(tmp_path, precision="bf16"), print_fn=_quiet)
    assert seen == {(True, True, torch.bfloat16), (False, True, torch.bfloat16)}  # training, evaluation, timing
    assert json.loads((tmp_path / "summary.json").read_text())["precision"] == summary["precision"] == "bf16"
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(v.dtype != torch.bfloat16 for v in _final_model(tmp_path).values())  # the weights stay float32


def test_a_nonfinite_gradient_inside_backward_stops_the_run_saying_what_was_updated(tmp_path, monkeypatch):
    _poison(monkeypatch, 3, "gradient")
    with pytest.raises(RunError, match=r"^step 3: the gradients of head\.bias, head\.weight, .* and \d+ more are "
                                       r"NaN/inf; the parameters stepped earlier in that backward were updated"):
        run_training(_faulty_settings(tmp_path, method="vanilla", optimizer_in_backward=True), print_fn=_quiet)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["position"]["step"] == 2  # the last checkpoint, from before the bad step, is kept


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


def test_init_samples_fit_the_factors_and_are_checked(tmp_path, capsys, monkeypatch):
    from wasi.training import pipeline

    seen = []
    original = pipeline.apply_method

    def spy(model, method, options, *, head, calibration=None, check=None):
        seen.append(calibration)
        return original(model, method, options, head=head, calibration=calibration, check=check)

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


def _task_settings(model, data, out, **kw) -> TrainSettings:
    base = {"model": str(model), "data": str(data), "out": str(out), "method": "wasi", "steps": 4, "batch_size": 4,
            "max_length": 32, "eval_batch_size": 16, "lr": 3e-3, "checkpoint_every": 100, "log_every": 2}
    base.update(kw)
    return TrainSettings(**base)


def test_causal_lm_run_reports_perplexities_and_exports_a_transformers_folder(tiny_llama, text_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    lines: list[str] = []
    summary = run_training(_task_settings(tiny_llama, text_folder, out, eps=0.5, target="all-linear"),
                           print_fn=lines.append)
    written = json.loads((out / "summary.json").read_text())
    assert written["task"] == "causal-lm"
    for key in ("dense_perplexity", "converted_perplexity", "test_perplexity", "test_loss", "best_val_perplexity"):
        assert math.isfinite(written[key]) and written[key] > 1, key
    assert "test_accuracy" not in written
    assert written["converted_perplexity"] != written["dense_perplexity"]  # eps 0.5 changes the weights
    assert math.isclose(written["test_perplexity"], math.exp(written["test_loss"]), rel_tol=1e-9)
    assert written["generation_sample"]["prompt"] and any(line.startswith("sample: ") for line in lines)
    assert (out / "model" / "wasi_config.json").is_file()  # the low-rank form
    # the transformers folder is the trained model: same held-out perplexity when reloaded
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "transformers"))
    tokenizer = build_model(str(out / "transformers"), num_classes=1).tokenizer
    assert type(reloaded).__name__ == "LlamaForCausalLM" and not any("left" in n for n, _ in reloaded.named_parameters())
    documents = split_documents(load_text_folder(text_folder), seed=0)[2]
    test = make_lm_split([d.text for d in documents], tokenizer, 32, "test")
    _, perplexity = lm_evaluate(reloaded, test, tokenizer.pad_token_id, torch.device("cpu"))
    assert math.isclose(perplexity, summary["test_perplexity"], rel_tol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_causal_lm_training_lowers_the_held_out_perplexity(tiny_llama, text_folder, tmp_path, precision):
    summary = run_training(_task_settings(tiny_llama, text_folder, tmp_path / "v", method="vanilla", steps=30,
                                     lr=1e-2, precision=precision), print_fn=lambda _m: None)
    assert summary["precision"] == precision
    assert summary["converted_perplexity"] == summary["dense_perplexity"]  # vanilla converts nothing
    assert summary["test_perplexity"] < 0.5 * summary["dense_perplexity"]


def test_lora_gets_ten_times_the_learning_rate_unless_told(tiny_llama, text_folder, tmp_path):
    pytest.importorskip("peft")
    summary = run_training(_task_settings(tiny_llama, text_folder, tmp_path / "l", method="lora", steps=1, lr=1e-4),
                           print_fn=lambda _m: None)
    assert summary["lr"] == pytest.approx(1e-3)
    told = _task_settings(tiny_llama, text_folder, tmp_path / "l2", method="lora", lr=1e-4, lora_lr=5e-4)
    assert told.learning_rate == 5e-4
    assert _task_settings(tiny_llama, text_folder, tmp_path / "w", lora_lr=5e-4).validate() == [
        "--lora-lr is the learning rate of --method lora, got --method wasi"]
    assert (tmp_path / "l" / "transformers" / "config.json").is_file()  # adapters merged into a plain folder


def test_classification_summary_records_the_settings_that_tell_runs_apart(tmp_path):
    out = tmp_path / "c"
    summary = run_training(_task_settings("vit-micro", "digits", out, steps=2, batch_size=16, max_train_samples=40,
                                     max_eval_samples=30, image_size=8, recompute=True, target="all-linear",
                                     max_length=64), print_fn=lambda _m: None)
    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    expected = {"task": "image-classification", "target": "all-linear", "recompute": True, "checkpointing": False,
                "max_length": 64, "max_train_samples": 40, "max_eval_samples": 30, "image_size": 8,
                "train_samples": 40}
    assert {k: written[k] for k in expected} == expected
    assert "dense_perplexity" not in written and 0 <= written["test_accuracy"] <= 1
    with pytest.raises(RunError, match="--image-size 16: model 'vit-micro' takes 8 px images only"):
        run_training(_task_settings("vit-micro", "digits", tmp_path / "d", steps=1, image_size=16), print_fn=print)


def test_a_causal_lm_conversion_is_tightened_until_its_validation_perplexity_holds(tiny_llama, text_folder, tmp_path):
    out = tmp_path / "c"
    lines: list[str] = []
    summary = run_training(_task_settings(tiny_llama, text_folder, out, fidelity=0.9, target="all-linear",
                                          max_perplexity_increase=0.01, steps=1), print_fn=lines.append)
    check = summary["conversion_check"]
    assert check["max_perplexity_increase"] == 0.01 and check["met"]
    tries = check["tries"]
    assert len(tries) >= 2 and tries[0]["fidelity"] == 0.9
    assert tries[0]["val_perplexity"] > check["dense_val_perplexity"] * 1.0001  # the first conversion missed
    assert [t["fidelity"] for t in tries] == sorted({t["fidelity"] for t in tries})
    assert tries[-1]["val_perplexity"] <= check["dense_val_perplexity"] * 1.0001
    assert summary["fidelity"] == tries[-1]["fidelity"]  # the fidelity kept, not the one asked for
    saved = json.loads((out / "model" / "wasi_config.json").read_text())["layers"]
    assert len(saved) == tries[-1]["layers_factored"]  # the kept conversion is the one trained and saved
    assert sum(line.startswith("  fidelity ") for line in lines) == len(tries)
    assert json.loads((out / "summary.json").read_text())["conversion_check"] == check


def test_the_perplexity_check_is_refused_for_a_classifier(tmp_path):
    with pytest.raises(RunError, match="--max-perplexity-increase checks a causal LM's conversion"):
        run_training(_task_settings("vit-micro", "digits", tmp_path / "d", steps=1, batch_size=16,
                                    max_train_samples=40, max_eval_samples=30, max_perplexity_increase=1.0),
                     print_fn=lambda _m: None)
