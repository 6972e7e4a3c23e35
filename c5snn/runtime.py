"""Process-level runtime settings for training: seeding, threads and the CPU allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import random
import sys

import numpy as np
import torch

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in glibc's heap instead of returning it to the OS.

    A training step allocates and frees the same few dozen 5-40 MB tensors every batch. With
    glibc's defaults each is a fresh mmap whose pages fault in on first touch: about a fifth of a
    CPU step on the benchmark machine. Raising the mmap and trim thresholds (as
    `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` would) lets them be reused. A no-op off
    glibc. Returns whether it applied.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    ok &= libc.mallopt(_M_TOP_PAD, 64 * 1024 * 1024)
    _allocator_tuned = bool(ok)
    return _allocator_tuned


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices): a run is reproducible from its seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
