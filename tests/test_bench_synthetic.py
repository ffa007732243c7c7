"""Synthetic inputs and pretrained-like spectra (:mod:`wasi.bench.synthetic`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wasi.bench.synthetic import decay_spectrum, spectrum_rank


def test_decay_spectrum_is_a_seeded_power_law_of_the_same_norm():
    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 32))

    a, b = model(), model()
    norms = [m.weight.norm().item() for m in a if isinstance(m, nn.Linear)]
    decay_spectrum(a, alpha=0.5, seed=3, skip=())
    decay_spectrum(b, alpha=0.5, seed=3, skip=())
    for i, layer in enumerate(m for m in a if isinstance(m, nn.Linear)):
        s = torch.linalg.svdvals(layer.weight.double())  # (m,)
        expected = torch.arange(1, len(s) + 1, dtype=torch.float64) ** -0.5
        assert torch.allclose(s / s[0], expected, atol=1e-4)
        assert layer.weight.norm().item() == pytest.approx(norms[i], rel=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert spectrum_rank(768, 0.5, 0.4) < spectrum_rank(768, 0.5, 0.8) < spectrum_rank(768, 0.5, 0.9) < 768
