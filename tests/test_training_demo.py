"""The built-in demo's run (:mod:`wasi.training.demo`): what it trains, converts and returns."""

from __future__ import annotations

import pytest

from wasi.training.demo import DemoError, load_digits_tensors, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_demo_pretrains_converts_and_fine_tunes():
    lines: list[str] = []
    result = run_demo(pretrain_steps=4, steps=5, eps=0.8, seed=1, print_fn=lines.append)
    assert len(result["dense_losses"]) == 4 and len(result["losses"]) == 5
    for key in ("dense_accuracy", "converted_accuracy", "final_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["peak_mb"] > 0
    text = "\n".join(lines)
    assert "converted the MLP linears with" in text and "test accuracy: dense" in text
    assert "blocks.0.mlp.fc1" in str(result["summary"])  # the MLP linears became WASI layers


def test_the_digits_split_is_stratified_and_reproducible():
    x_train, y_train, x_test, y_test = load_digits_tensors(seed=0)
    assert x_train.shape[1:] == (1, 8, 8) and float(x_train.max()) <= 1.0
    assert len(x_test) == pytest.approx(0.2 * (len(x_train) + len(x_test)), abs=1)
    assert set(y_test.tolist()) == set(range(10))
    again = load_digits_tensors(seed=0)
    assert all((a == b).all() for a, b in zip((x_train, y_train, x_test, y_test), again))


def test_bad_values_are_refused_before_any_training(tmp_path):
    plot = tmp_path / "kept.png"
    plot.write_bytes(b"mine")
    with pytest.raises(DemoError, match=r"--steps -1: must be a non-negative integer.*already exists"):
        run_demo(steps=-1, plot=plot, print_fn=lambda _m: None)
    assert plot.read_bytes() == b"mine"
