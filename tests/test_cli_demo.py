"""``wasi demo`` (:mod:`wasi.cli.demo`, :mod:`wasi.training.demo`)."""

from __future__ import annotations

import pytest

from conftest import error_line
from wasi.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: threads only contend



def test_the_demo_shows_its_peak_memory_and_draws_its_plot(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    assert main(["demo", "--pretrain-steps", "3", "--steps", "3", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "peak memory of this process" in out and f"loss curves drawn to {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = plot.read_bytes()
    line = error_line(capsys, "demo", "--steps", "1", "--plot", str(plot))
    assert "already exists; it is kept" in line and plot.read_bytes() == before
    line = error_line(capsys, "demo", "--eps", "2", "--seed", "4294967296", "--steps", "-1")
    assert "--steps -1: must be a non-negative integer" in line and "--seed 4294967296" in line
    assert "--eps 2.0: WASIConfig.eps must be a number in (0, 1]" in line
