"""Measured memory and time: process peak above a baseline, medians."""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of the process above a baseline, in MiB.

    On CUDA it uses ``torch.cuda.max_memory_allocated``; on CPU the kernel's resident-set
    high-water mark (``VmHWM``), which :meth:`reset` re-arms through ``/proc/self/clear_refs``
    so that a peak can be measured from a point on. Elsewhere (no ``/proc``) it falls back to
    ``resource.getrusage`` and cannot be reset.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.baseline_mb = 0.0

    def current_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        rss = status_kb("VmRSS")
        return rss / 1024 if rss is not None else 0.0

    def reset(self) -> None:
        """Set the baseline to the current memory and re-arm the peak."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                pass
        self.baseline_mb = self.current_mb()

    def peak_mb(self) -> float:
        """Peak since the last :meth:`reset`, above the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline_mb
        hwm = status_kb("VmHWM")
        if hwm is None:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024
        return max(0.0, hwm / 1024 - self.baseline_mb)


def process_peak_mb() -> float:
    """The process's peak resident memory since it started (or since a :meth:`PeakMemory.reset`), MiB."""
    hwm = status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's steady state after large frees on 64-bit: its dynamic mmap threshold stops at 32 MiB
# and the trim threshold follows at twice that
CACHING_MMAP_THRESHOLD = 32 * 2**20
STRICT_MMAP_THRESHOLD = 65536


def _mallopt(param: int, value: int) -> bool:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError, TypeError):
        return False


def set_cpu_allocator(mode: str) -> bool:
    """Switch glibc's allocator between measuring memory and measuring time.

    ``"strict"``: every block over 64 KiB is mapped on allocation and unmapped on free, so the
    resident set follows the live tensors (the CPU counterpart of CUDA's
    ``max_memory_allocated``) and its peak does not depend on the allocation history; each large
    tensor then costs fresh zeroed pages, which slows memory-bound kernels.
    ``"caching"``: blocks up to 32 MiB are reused from the heap, as glibc does by default once
    a program has freed large blocks: the setting to time steps under.

    Returns False where there is no glibc ``mallopt`` (then nothing changes). CUDA memory is
    unaffected.
    """
    if mode not in ("strict", "caching"):
        raise ValueError(f"allocator mode must be 'strict' or 'caching', got {mode!r}")
    threshold = STRICT_MMAP_THRESHOLD if mode == "strict" else CACHING_MMAP_THRESHOLD
    trim = STRICT_MMAP_THRESHOLD if mode == "strict" else 2 * CACHING_MMAP_THRESHOLD
    return _mallopt(_M_MMAP_THRESHOLD, threshold) and _mallopt(_M_TRIM_THRESHOLD, trim)
