"""A run's output folder (:mod:`wasi.training.outputs`): the curves."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: threads only contend


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
