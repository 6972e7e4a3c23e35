"""Process-level runtime settings for training: seeding, the CPU allocator, precision, device.

The speed options of a study file (`training.precision`, `training.compile`,
`training.lif_kernel`) are checked against the device here, once, before a worker claims work.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import random
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from c5snn.errors import DataError, DeviceError, OptionError, first_line

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_allocator_tuned = False


def configure_threads(threads: int | None) -> None:
    """This process's CPU math: `threads` torch threads (default: torch's; workers sharing a CPU
    should use 1 each), and denormal floats flushed to zero.

    Flushing matters for speed, not results: this model's gradients shrink by up to ~1e4 per LIF
    (the surrogate's denominator) and reach the denormal range (< 1.2e-38) in the lower blocks,
    and an fp32 GEMM over denormals can be ~150x slower (benchmarks/bench_kernels.py on an
    Intel Xeon: a (57600, 64) @ (64, 64) GEMM, 1.7 ms normal, 262 ms denormal, 1.9 ms flushed).
    A flushed value differs from the unflushed
    one by < 1.2e-38. The setting is per thread and torch's worker threads copy it when they are
    created, so this runs before the first parallel op (commands call it first thing).
    """
    if threads is not None:
        if threads < 1:
            raise OptionError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


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


# jemalloc keeping freed pages (never purging them): a training step's tensors are reused from
# its size classes without page faults and with far less fragmentation than glibc's heap. And on
# transparent huge pages (jemalloc asks for them; kernels that leave THP to `madvise`, as the CI
# machines do, give none otherwise): the step's passes over memory are streams of tens of MB, and
# with 2 MB pages they cross few page boundaries (where the hardware prefetchers stop) and miss
# the TLB less. Measured on a d64 6-layer step (docs/benchmarks.md): 3-4% faster, 6% more peak RSS.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always"


def cpu_allocator_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` plus what runs a CPU training process on jemalloc, or None when it cannot or
    need not: no libjemalloc on this machine, already preloaded, or `C5SNN_MALLOC=glibc`.

    Measured on a d64 6-layer rate_coded step (docs/benchmarks.md): peak RSS 3.1 GB on glibc with
    `tune_cpu_allocator` against 2.1 GB on jemalloc, at the same speed.
    """
    if environ.get("C5SNN_MALLOC", "jemalloc") == "glibc" or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None
    lib = ctypes.util.find_library("jemalloc")
    if lib is None:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, environ.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def allocator_environments(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Environments that start a process on each allocator this machine has: 'glibc' always,
    'jemalloc' where installed (the benchmarks run the baseline on both)."""
    plain = {k: v for k, v in environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    jemalloc = cpu_allocator_env(plain)
    return {"glibc": plain, **({"jemalloc": jemalloc} if jemalloc else {})}


def reexec_with_jemalloc() -> None:
    """Restart this `c5snn` command under jemalloc (same PID and arguments) when possible.

    The allocator must be chosen before the process starts; CPU training commands call this
    first thing. Never loops: the restarted process sees jemalloc in LD_PRELOAD.
    """
    env = cpu_allocator_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "c5snn", *sys.argv[1:]], env)


def allocator() -> str:
    """Which allocator this process runs on, for logs: 'jemalloc' or 'glibc'."""
    try:
        with open("/proc/self/maps") as fh:
            return "jemalloc" if "jemalloc" in fh.read() else "glibc"
    except OSError:
        return "system"


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices): a run is reproducible from its seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_device(training, device: str | torch.device) -> None:
    """Raise `DeviceError` when `device` cannot run the study's speed options.

    `training` is a `c5snn.config.TrainingParams`. The device must exist and work here (a tiny
    op on it), so that a wrong `--device` stops a worker before it claims anything instead of
    failing every point. tf32 is a CUDA matmul mode and the Triton LIF a CUDA kernel: on the
    CPU they would silently mean nothing, so they are refused.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device}: c5snn trains on cpu or cuda, not {dev.type}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {device}: this machine has no usable CUDA device "
                              f"(torch {torch.__version__})")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {device}: this machine has {count} CUDA device(s)")
    try:
        torch.ones(8, device=dev).add_(1).sum().item()
    except RuntimeError as exc:
        raise DeviceError(f"--device {device} does not work: {first_line(exc)}") from None
    kind = dev.type
    if training.precision == "tf32" and kind != "cuda":
        raise DeviceError(f"training.precision: tf32 needs a CUDA device, got {device}")
    if training.lif_kernel == "triton":
        if kind != "cuda":
            raise DeviceError(f"training.lif_kernel: triton needs a CUDA device, got {device}")
        if importlib.util.find_spec("triton") is None:
            raise DeviceError("training.lif_kernel: triton needs the 'triton' package installed")


@contextlib.contextmanager
def precision(mode: str, device: torch.device) -> Iterator[None]:
    """Run forward passes (and the loss) at `mode`: fp32, tf32 or bf16.

    fp32 is exact IEEE single precision everywhere (tf32 matmuls explicitly off on CUDA). tf32
    lets CUDA matmuls round their inputs to 10-bit mantissas. bf16 is autocast: matmuls and
    attention in bfloat16, while LIF membranes, the loss and the optimizer stay fp32 (see
    `c5snn.lif`). The deviations from fp32 are measured in docs/benchmarks.md.
    """
    if mode == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def environment_fault(exc: BaseException) -> bool:
    """Whether an error in a trial is the machine's (disk full or unwritable, data unreadable,
    device gone), which would fail every point alike, rather than the trial's own (a NaN loss,
    a bug, CUDA running out of memory for this configuration)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc):
        return False  # this configuration's size: charging the point stops it hopping workers
    if isinstance(exc, (OSError, DataError, DeviceError)):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, AssertionError)) and any(
        marker in text for marker in ("CUDA error", "CUDA driver", "NVIDIA driver",
                                      "not compiled with CUDA", "no CUDA GPUs"))
