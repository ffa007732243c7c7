"""ONNX export and prediction: the low-rank graph, the round trip at dynamic batch and sequence, the
int8 variant, and `wasi export` / `wasi predict` from tiny runs of every task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import wasi
from wasi.cli import main
from wasi.export.onnx import (
    ExportError,
    export_onnx,
    matmul_weights,
    max_abs_difference,
    run_session,
    session,
)
from wasi.export.predict import PredictError, load_onnx, load_run, score
from wasi.export.quantize import quantize_int8
from wasi.training.loop import TrainSettings, run_training

FIXTURES = Path(__file__).parent / "fixtures" / "data"
WORDS = ["great", "movie", "loved", "it", "terrible", "plot", "what", "a", "fun", "ride", "boring", "and", "slow",
         "the", "cat", "sat", "on", "mat", "while", "dogs", "ran", "far", "away", "birds", "sang", "in", "trees"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "<eos>": 4,
             **{w: i + 5 for i, w in enumerate(dict.fromkeys(WORDS))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT classifier folder with a word-level tokenizer that adds [CLS] and [SEP]."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama (LlamaForCausalLM) and a folder of 12 documents for it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    texts = tmp_path_factory.mktemp("texts")
    for i in range(12):
        words = WORDS[i:] + WORDS * 3
        (texts / f"doc{i:02d}.txt").write_text(" ".join(words))
    return folder, texts


def _run(tmp_path_factory, name: str, **kw) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    base = {"out": str(out), "method": "wasi", "steps": 2, "batch_size": 8, "eval_batch_size": 16, "lr": 1e-3,
            "checkpoint_every": 100, "log_every": 1, "init_samples": 0, "eps": 0.5}
    run_training(TrainSettings(**{**base, **kw}), print_fn=lambda _line: None)
    return out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    return _run(tmp_path_factory, "image", model="vit-micro", data="digits", max_train_samples=48,
                max_eval_samples=40)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_bert):
    return _run(tmp_path_factory, "text", model=str(tiny_bert), data=str(FIXTURES / "reviews.csv"),
                max_length=16, target="all-linear")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_llama):
    folder, texts = tiny_llama
    return _run(tmp_path_factory, "lm", model=str(folder), data=str(texts), max_length=16, target="all-linear",
                batch_size=4)


# ---------------------------------------------------------------------------- the graph
def _converted_vit(rank: int = 4):
    from wasi.training.models import build_model

    torch.manual_seed(0)
    model = build_model("vit-micro", num_classes=10).model
    return wasi.convert(model, wasi.WASIConfig(rank=rank)).eval()


def test_each_wasi_layer_is_two_thin_matmuls_and_the_dense_export_one(one_thread):
    model = _converted_vit(rank=4)
    layers = wasi.wasi_layers(model)
    x = torch.rand(2, 1, 8, 8)
    thin = matmul_weights(export_onnx(model, x))
    merged = matmul_weights(export_onnx(model, x, dense=True))
    for _, layer in layers:
        pair = [("MatMul", (layer.in_features, 4)), ("MatMul", (4, layer.out_features))]
        assert sum(w == pair[0] for w in thin) >= 1 and sum(w == pair[1] for w in thin) >= 1
    thin_count = sum(1 for _, shape in thin if 4 in shape)
    assert thin_count == 2 * len(layers)
    assert not any(4 in shape for _, shape in merged)
    assert len(merged) == len(thin) - len(layers)  # one matmul instead of two per converted layer
    # the dense export holds each converted layer's merged (O, I) weight (stored (O, I) or (I, O))
    for _, layer in layers:
        o, i = layer.out_features, layer.in_features
        assert any(shape in ((o, i), (i, o)) for _, shape in merged)


def test_round_trip_at_two_batch_sizes_on_an_image_model(one_thread):
    model = _converted_vit()
    data = export_onnx(model, torch.rand(2, 1, 8, 8))
    sess = session(data)
    for batch in (1, 5):
        x = torch.rand(batch, 1, 8, 8)
        got = run_session(sess, {"pixel_values": x})
        with torch.no_grad():
            expected = model(x)
        assert got.shape == (batch, 10)
        assert torch.allclose(got, expected, atol=1e-5)
    assert model.training is False and wasi.wasi_layers(model)  # the model itself is not changed


def test_fused_activations_follow_the_two_matmuls(one_thread):
    from wasi.training.models import build_model

    torch.manual_seed(0)
    model = wasi.convert(build_model("vit-micro", num_classes=10).model,
                         wasi.WASIConfig(rank=4, target="all-linear", fuse_activation=True)).eval()
    fused = [name for name, layer in wasi.wasi_layers(model) if layer.fused_activation is not None]
    assert fused  # fc1's GELU and the attention core after qkv
    x = torch.rand(3, 1, 8, 8)
    data = export_onnx(model, x)
    assert max_abs_difference(data, model, x) < 1e-5
    got = run_session(session(data), {"pixel_values": torch.rand(6, 1, 8, 8)})
    assert got.shape == (6, 10)


def test_the_export_leaves_the_model_and_an_existing_file_alone(tmp_path, one_thread):
    model = _converted_vit().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = tmp_path / "m.onnx"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        export_onnx(model, torch.rand(2, 1, 8, 8), target)
    assert target.read_text() == "mine"
    export_onnx(model, torch.rand(2, 1, 8, 8), tmp_path / "new.onnx")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ExportError, match="example"):
        export_onnx(model, [1, 2])


def test_reference_mode_layers_serve_their_dense_weight(one_thread):
    from wasi.training.models import build_model

    torch.manual_seed(0)
    model = wasi.convert(build_model("vit-micro", num_classes=10).model,
                         wasi.WASIConfig(rank=4, mode="reference")).eval()
    x = torch.rand(3, 1, 8, 8)
    data = export_onnx(model, x)
    assert not any(4 in shape for _, shape in matmul_weights(data))
    assert max_abs_difference(data, model, x) < 1e-5


def test_export_onnx_is_a_lazy_name_of_the_package():
    assert wasi.export_onnx is export_onnx
    code = ("import sys, wasi\n"
            "print(sorted(m for m in ('wasi.export', 'wasi.data', 'wasi.models', 'wasi.training', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_onnxruntime_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'wasi\[serve\]'"):
        session(b"")


# ---------------------------------------------------------------------------- every task, from a run
def _ids_batch(feeder, rows):
    return feeder.text_batch(rows)


def test_text_run_round_trip_at_two_batch_sizes_and_two_lengths(text_run, tmp_path, capsys, one_thread):
    out = tmp_path / "text.onnx"
    assert main(["export", str(text_run), "--out", str(out), "--check-samples", "4"]) == 0
    assert "max |ONNX Runtime - PyTorch|" in capsys.readouterr().out
    scorer, onnx_scorer = load_run(text_run), load_onnx(out)
    feeder = scorer.feeder
    texts = ["great movie", "boring and slow the cat sat on the mat while dogs ran far away"]
    # the export's own tokenizer gives the ids the run's does (training's call, with its special tokens)
    from transformers import AutoTokenizer

    trained = AutoTokenizer.from_pretrained(str(json.loads((text_run / "summary.json").read_text())["model"]))
    assert onnx_scorer.feeder.encode(texts) == trained(texts, truncation=True, max_length=16)["input_ids"]
    for rows in ([[2, 7, 3]], [[2, 7, 8, 9, 3], [2, 5, 3, 0, 0]], [[2] + [6] * 14 + [3]] * 3):
        batch = _ids_batch(feeder, rows)
        got, expected = onnx_scorer.logits(batch), scorer.logits(batch)
        assert got.shape == (len(rows), len(feeder.classes))
        assert torch.allclose(got, expected, atol=1e-5)


def test_causal_lm_run_round_trip_at_two_batch_sizes_and_two_lengths(lm_run, tmp_path, capsys, one_thread):
    out = tmp_path / "lm.onnx"
    assert main(["export", str(lm_run), "--out", str(out), "--check-samples", "3"]) == 0
    scorer, onnx_scorer = load_run(lm_run), load_onnx(out)
    weights = matmul_weights(out)
    layers = wasi.wasi_layers(scorer.model)
    assert layers and sum(1 for _, s in weights if any(s == (lay.in_features, lay.rank) for _, lay in layers)) \
        >= len(layers) // 2  # the thin R^T factors are in the graph
    for batch, length in ((1, 5), (3, 12)):
        ids = torch.randint(3, 20, (batch, length))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        got, expected = onnx_scorer.logits(inputs), scorer.logits(inputs)
        assert got.shape == (batch, length, expected.shape[-1])
        assert torch.allclose(got, expected, atol=1e-4)


def test_predict_reproduces_the_runs_test_accuracy_from_the_folder_and_from_onnx(image_run, tmp_path, capsys):
    summary = json.loads((image_run / "summary.json").read_text())
    out = tmp_path / "img.onnx"
    assert main(["export", str(image_run), "--out", str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and (tmp_path / "img.int8.onnx").is_file()
    for target in (image_run, out):
        assert main(["predict", str(target), "--data", "digits", "--max-samples", "40"]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith(f"accuracy {summary['test_accuracy']:.4f} on 40 samples (test split of digits")


def test_int8_variant_quantizes_the_thin_factors_and_stays_close(tmp_path, one_thread):
    model = _converted_vit(rank=8)
    x = torch.rand(6, 1, 8, 8)
    fp32 = export_onnx(model, x, tmp_path / "m.onnx")
    int8 = quantize_int8(fp32, tmp_path / "m8.onnx")
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    got = run_session(session(int8), {"pixel_values": x})
    with torch.no_grad():
        expected = model(x)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    with pytest.raises(FileExistsError):
        quantize_int8(fp32, int8)


def test_predict_writes_csv_and_jsonl_predictions_of_files(image_run, text_run, tmp_path, capsys):
    from PIL import Image

    files = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy()).save(path)
        files.append(str(path))
    csv_out = tmp_path / "p.csv"
    assert main(["predict", str(image_run), "--data", *files, "--out", str(csv_out)]) == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "source,prediction,class_id,probability" and len(lines) == 4
    assert all(line.split(",")[1] in [str(c) for c in range(10)] for line in lines[1:])
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    docs[0].write_text("great movie loved it")
    docs[1].write_text("terrible plot")
    jsonl = tmp_path / "p.jsonl"
    assert main(["predict", str(text_run), "--data", *map(str, docs), "--out", str(jsonl)]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["source"] for r in rows] == list(map(str, docs)) and {r["prediction"] for r in rows} <= set(load_run(text_run).feeder.classes)
    # an existing file is never replaced
    before = jsonl.read_text()
    assert main(["predict", str(text_run), "--data", *map(str, docs), "--out", str(jsonl)]) == 2
    assert "already exists" in capsys.readouterr().err and jsonl.read_text() == before


def test_predict_on_a_labelled_file_maps_its_classes_by_name(text_run, tmp_path, capsys):
    rows = [("great movie loved it", "pos"), ("terrible plot", "neg"), ("what a fun ride", "pos")]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))  # classes neg, pos only
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(text_run), "--data", str(data), "--out", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in got] == ["pos", "neg", "pos"]  # the run's class names, not the file's ids
    accuracy = sum(r["prediction"] == r["label"] for r in got) / 3
    assert capsys.readouterr().out.startswith(f"accuracy {accuracy:.4f} on 3 samples")
    assert main(["predict", str(text_run), "--data", str(FIXTURES / "reviews.jsonl")]) == 2  # labels 0, 1, 2
    assert "classes the model does not know: ['0', '1', '2']" in capsys.readouterr().err


def test_causal_lm_predict_reports_the_runs_test_perplexity(lm_run, tiny_llama, tmp_path, capsys):
    summary = json.loads((lm_run / "summary.json").read_text())
    scorer = load_run(lm_run)
    scored = score(scorer, [summary["data"]])
    assert scored.metric == "perplexity"
    assert scored.value == pytest.approx(summary["test_perplexity"], rel=1e-4)
    out = tmp_path / "w.jsonl"
    assert main(["predict", str(lm_run), "--data", summary["data"], "--max-samples", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["tokens"] == 16 and r["loss"] > 0 for r in rows)


def test_bad_inputs_are_one_line_errors(image_run, tmp_path, capsys):
    target = tmp_path / "m.onnx"
    target.write_text("mine")
    cases = [
        (["export", str(image_run), "--out", str(target)], "already exists"),
        (["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")], "no summary.json"),
        (["export", str(image_run), "--out", str(tmp_path / "x.onnx"), "--format", "executorch"], "XNNPACK"),
        (["export", str(image_run), "--out", str(tmp_path / "x.pt")], "give a .onnx file"),
        (["export", str(image_run), "--out", str(tmp_path / "y.onnx"), "--check-samples", "0"], "positive"),
        (["predict", str(target), "--data", "digits"], "cannot read"),
        (["predict", str(image_run), "--data", str(FIXTURES / "reviews.csv")], "text data; the model takes image"),
        (["predict", str(image_run), "--data", "digits", "--split", "dev"], "--split 'dev'"),
    ]
    lora = tmp_path / "lora-run"
    lora.mkdir()
    (lora / "summary.json").write_text(json.dumps({"method": "lora", "model": "vit-micro", "data": "digits",
                                                   "task": "image-classification"}))
    cases.append((["predict", str(lora), "--data", "digits"], "merge_and_unload"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
    assert target.read_text() == "mine" and not (tmp_path / "x.onnx").exists()
    with pytest.raises(PredictError, match="no preprocessing"):
        load_onnx(export_onnx(_converted_vit(), torch.rand(1, 1, 8, 8), tmp_path / "bare.onnx"))
