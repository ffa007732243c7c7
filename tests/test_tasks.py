"""Tasks of `wasi train`: read from the model or given; the causal-LM task end to end on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import word_tokenizer
from wasi.cli import main
from wasi.data import DataError
from wasi.data.lmtext import Document, load_lm_documents, load_text_folder, split_documents
from wasi.training.causal_lm import lm_evaluate, make_lm_split, token_windows
from wasi.training.loop import RunError, TrainSettings, run_training
from wasi.training.models import ModelError, build_model, resolve_task


def _settings(model, data, out, **kw) -> TrainSettings:
    base = {"model": str(model), "data": str(data), "out": str(out), "method": "wasi", "steps": 4, "batch_size": 4,
            "max_length": 32, "eval_batch_size": 16, "lr": 3e-3, "checkpoint_every": 100, "log_every": 2}
    base.update(kw)
    return TrainSettings(**base)


def test_windows_cut_the_joined_documents_into_equal_pieces():
    tokenizer = word_tokenizer()
    windows = token_windows(["the cat sat", "on a mat while dogs"], tokenizer, 3)
    flat = [t for w in windows for t in w]
    eos = tokenizer.eos_token_id
    assert all(len(w) == 3 for w in windows) and len(windows) == 3  # 3 + 1 + 5 + 1 = 10 ids -> 3 full windows
    assert flat[3] == eos and flat[:3] == tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="fewer than 64 tokens"):
        make_lm_split(["the cat"], tokenizer, 64, "test")


def test_documents_split_whole_and_reproducibly(text_folder):
    docs = load_text_folder(text_folder)
    assert len(docs) == 12 and all(isinstance(d, Document) for d in docs)
    train, val, test = split_documents(docs, seed=3)
    names = [{d.name for d in part} for part in (train, val, test)]
    assert (len(train), len(val), len(test)) == (10, 1, 1)
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert [d.name for d in split_documents(docs, seed=3)[2]] == [d.name for d in test]
    with pytest.raises(DataError, match="at least 3 documents"):
        split_documents(docs[:2])
    with pytest.raises(DataError, match="is a file"):
        load_lm_documents(str(text_folder / "doc00.txt"))


def test_a_causal_lm_folder_is_a_causal_lm_unless_told(tiny_llama):
    assert resolve_task(str(tiny_llama)) == ("causal-lm", "LlamaForCausalLM")
    bundle = build_model(str(tiny_llama), num_classes=3)
    assert bundle.task == "causal-lm" and type(bundle.model).__name__ == "LlamaForCausalLM"
    assert bundle.head is None  # the pretrained LM head stays; no new head
    told = build_model(str(tiny_llama), num_classes=3, task="text-classification")
    assert type(told.model).__name__ == "LlamaForSequenceClassification" and told.head == "score"
    with pytest.raises(ModelError, match="cannot be trained for causal-lm"):
        resolve_task("vit-micro", "causal-lm")
    with pytest.raises(ModelError, match="choose one of"):
        resolve_task("vit-micro", "translation")


def test_labelled_data_for_a_causal_lm_is_refused_with_the_way_out(tiny_llama, tmp_path, capsys):
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f"the cat sat {i},{i % 2}\n" for i in range(12)))
    code = main(["train", "--model", str(tiny_llama), "--data", str(csv), "--out", str(tmp_path / "o"),
                 "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "causal LM" in err and "--task text-classification" in err


def test_causal_lm_run_reports_perplexities_and_exports_a_transformers_folder(tiny_llama, text_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    lines: list[str] = []
    summary = run_training(_settings(tiny_llama, text_folder, out, eps=0.5, target="all-linear"),
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


def test_causal_lm_training_lowers_the_held_out_perplexity(tiny_llama, text_folder, tmp_path):
    summary = run_training(_settings(tiny_llama, text_folder, tmp_path / "v", method="vanilla", steps=30,
                                     lr=1e-2), print_fn=lambda _m: None)
    assert summary["converted_perplexity"] == summary["dense_perplexity"]  # vanilla converts nothing
    assert summary["test_perplexity"] < 0.5 * summary["dense_perplexity"]


def test_lora_gets_ten_times_the_learning_rate_unless_told(tiny_llama, text_folder, tmp_path):
    pytest.importorskip("peft")
    summary = run_training(_settings(tiny_llama, text_folder, tmp_path / "l", method="lora", steps=1, lr=1e-4),
                           print_fn=lambda _m: None)
    assert summary["lr"] == pytest.approx(1e-3)
    told = _settings(tiny_llama, text_folder, tmp_path / "l2", method="lora", lr=1e-4, lora_lr=5e-4)
    assert told.learning_rate == 5e-4
    assert _settings(tiny_llama, text_folder, tmp_path / "w", lora_lr=5e-4).validate() == [
        "--lora-lr is the learning rate of --method lora, got --method wasi"]
    assert (tmp_path / "l" / "transformers" / "config.json").is_file()  # adapters merged into a plain folder


def test_task_mismatch_between_model_and_data_is_a_run_error(tiny_llama, tmp_path):
    with pytest.raises(RunError, match="image-classification"):
        run_training(_settings("vit-micro", "digits", tmp_path / "x", task="text-classification"),
                     print_fn=lambda _m: None)
    # a causal LM told to classify takes text: image data is the wrong kind
    with pytest.raises(RunError, match=r"takes text inputs but data 'digits' is image \(the model is for "
                                       r"text-classification: --task text-classification"):
        run_training(_settings(tiny_llama, "digits", tmp_path / "y", task="text-classification"),
                     print_fn=lambda _m: None)


def test_text_folders_a_causal_lm_cannot_read_are_one_line_errors(tiny_llama, tmp_path, capsys):
    blank, latin, two, short = (tmp_path / name for name in ("blank", "latin", "two", "short"))
    for folder in (blank, latin, two, short):
        folder.mkdir()
    (blank / "empty.txt").write_text("  \n")
    (latin / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    for i in range(2):
        (two / f"d{i}.txt").write_text("the cat sat on a mat " * 20)
    for i in range(12):
        (short / f"d{i:02d}.txt").write_text("the cat")
    for folder, message in (
        (blank, "holds no non-empty .txt file: a causal-LM run needs a folder of .txt documents"),
        (latin, "a.txt' is not UTF-8 text; convert it or remove it from the folder"),
        (two, "a causal-LM split needs at least 3 documents"),
        (short, "the training documents hold fewer than 32 tokens: add text or lower --max-length"),
    ):
        code = main(["train", "--model", str(tiny_llama), "--data", str(folder), "--out",
                     str(tmp_path / f"o-{folder.name}"), "--steps", "1", "--max-length", "32"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_calibrate_refuses_a_causal_lm(tiny_llama, tmp_path, capsys):
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f"the cat sat {i},{i % 2}\n" for i in range(12)))
    code = main(["calibrate", "--model", str(tiny_llama), "--data", str(csv), "--out", str(tmp_path / "p.json")])
    assert code == 2 and "is a causal LM" in capsys.readouterr().err


def test_classification_summary_records_the_settings_that_tell_runs_apart(tmp_path):
    out = tmp_path / "c"
    summary = run_training(_settings("vit-micro", "digits", out, steps=2, batch_size=16, max_train_samples=40,
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
        run_training(_settings("vit-micro", "digits", tmp_path / "d", steps=1, image_size=16), print_fn=print)
