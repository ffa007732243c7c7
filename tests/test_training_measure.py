"""Measured memory and time (:mod:`wasi.training.measure`)."""

from __future__ import annotations

import pytest


def test_cpu_allocator_modes():
    from wasi.training.measure import set_cpu_allocator

    with pytest.raises(ValueError, match="'strict' or 'caching'"):
        set_cpu_allocator("fast")
    # glibc (Linux): both settings are accepted; caching last, glibc's steady state
    assert set_cpu_allocator("strict") is True
    assert set_cpu_allocator("caching") is True
