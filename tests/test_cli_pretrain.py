"""``wasi pretrain`` (:mod:`wasi.cli.pretrain`): a dense ViT trained from scratch, saved for ``wasi train``."""

from __future__ import annotations

import json

import pytest

from wasi.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pretrain_writes_a_folder_train_loads_and_takes_no_method(tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(["pretrain", "--model", "vit-micro", "--data", "digits", "--steps", "2", "--batch-size", "16",
                 "--max-train-samples", "48", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "vanilla"
    assert (out / "model.safetensors").is_file() and (out / "wasi_pretrained.json").is_file()
    assert main(["train", "--model", str(out), "--data", "digits", "--steps", "1", "--batch-size", "16",
                 "--max-train-samples", "48", "--method", "vanilla", "--out", str(tmp_path / "ft")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--model", "vit-micro", "--data", "digits", "--method", "wasi", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "unrecognized arguments: --method wasi" in capsys.readouterr().err
