"""The backend record: how this process computes a CPU training step, decided once.

`backend()` loads (or builds) the compiled operators, and picks the library of the model's fp32
CPU GEMMs by timing the model's own GEMMs on both (oneDNN, and torch's mm, which is MKL on x86)
the first time a build meets a thread count; the choice is kept beside the build, so every
process of a machine makes the same one. `C5SNN_GEMM=onednn|torch` overrides it and
`C5SNN_NATIVE=0` turns the compiled operators off. The model reads the record (`route`), and
every trial and checkpoint keeps it (`describe`): results computed on another GEMM library,
another thread count or without the compiled operators may differ in their last bits.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from c5snn.errors import first_line
from c5snn.kernels import build

NATIVE_SWITCH = "C5SNN_NATIVE"  # "0": the torch paths only
GEMM_SWITCH = "C5SNN_GEMM"  # "onednn" or "torch": overrides the measured choice
GEMM_LIBRARIES = ("onednn", "torch")
# (K, N) of the linear maps of a d64 and a d128 block: Q/K/V, output, FFN in and out
GEMM_SHAPES = ((64, 192), (64, 64), (64, 128), (128, 64), (128, 384), (128, 128), (128, 256),
               (256, 128))
GEMM_ROWS = 5760  # a tenth of a batch's T * B * W rows


@dataclass(frozen=True)
class Backend:
    compiled: bool  # c5snn's compiled CPU operators are loaded
    why: str  # why not, where not
    variant: str  # the instruction-set variant built (C5SNN_ISA)
    isa: str  # what that build was compiled for
    gemm: str  # the model's fp32 CPU GEMMs: "onednn" or "torch" (torch's mm, MKL on x86)
    gemm_choice: str  # how: measured (with the times), C5SNN_GEMM, or the only one there
    fused_linear: bool  # linear maps summed inside the LIF operators: needs oneDNN and FMA


@functools.cache
def backend() -> Backend:
    """This process's backend (the first call builds or loads the operators, ~20 s once per
    machine, and measures the GEMMs, ~1 s once per build and thread count)."""
    if os.environ.get(NATIVE_SWITCH, "1") == "0":
        return Backend(False, f"{NATIVE_SWITCH}=0", "", "", "torch", NATIVE_SWITCH, False)
    try:
        variant = build.isa_variant()
        root = build.load(variant)
    except build.BuildError as exc:  # no compiler, a failed build: the torch paths still work
        print(f"c5snn: compiled CPU kernels unavailable ({first_line(exc)}); using the torch "
              "paths", file=sys.stderr, flush=True)
        return Backend(False, first_line(exc), "", "", "torch", "no compiled operators", False)
    from c5snn.kernels.functions import register_flop_formulas

    register_flop_formulas()
    gemm, choice = _gemm_library(root)
    fused = gemm == "onednn" and torch.ops.c5snn.fused_linear_available()
    return Backend(True, "", variant, torch.ops.c5snn.isa(), gemm, choice, fused)


def _gemm_library(root: Path) -> tuple[str, str]:
    """(library, how it was chosen): C5SNN_GEMM where set (another value is reported in one line
    and ignored: a typo must not cost a sweep), oneDNN's absence, else the measurement kept in
    `root` for this thread count (made now if none is there)."""
    choice = os.environ.get(GEMM_SWITCH, "").strip().lower()
    if choice and choice not in GEMM_LIBRARIES:
        print(f"c5snn: ignoring {GEMM_SWITCH}={choice!r} (expected 'onednn' or 'torch')",
              file=sys.stderr, flush=True)
        choice = ""
    if not torch.ops.c5snn.onednn_available():
        return "torch", "this torch carries no oneDNN"
    if choice:
        return choice, GEMM_SWITCH
    path = root / f"gemm-{torch.get_num_threads()}-threads.json"
    if not path.exists():
        _keep_first(path, json.dumps(measure_gemms()))
    seconds = json.loads(path.read_text())
    fastest = min(GEMM_LIBRARIES, key=seconds.get)
    return fastest, "measured: " + ", ".join(f"{lib} {seconds[lib] * 1e3:.1f} ms"
                                             for lib in GEMM_LIBRARIES)


def measure_gemms(repeats: int = 3) -> dict[str, float]:
    """Seconds each library takes for the model's GEMMs (each linear map's forward, dL/dx and
    dL/dW at GEMM_SHAPES, GEMM_ROWS rows: dL/dW on c5snn's kernel beside oneDNN, as the model
    runs them), best of `repeats`."""
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randn(GEMM_ROWS, k, generator=gen), torch.randn(n, k, generator=gen),
              torch.randn(GEMM_ROWS, n, generator=gen)) for k, n in GEMM_SHAPES]
    runs = {
        "onednn": lambda x, w, g: (torch.ops.c5snn.gemm(x, w.t()), torch.ops.c5snn.gemm(g, w),
                                   torch.ops.c5snn.weight_grad(g, x, 1.0)),
        "torch": lambda x, w, g: (x @ w.t(), g @ w, g.t() @ x),
    }
    seconds = {}
    for lib, run in runs.items():
        best = float("inf")
        for _ in range(repeats + 1):  # the first round warms up
            start = time.perf_counter()
            for case in cases:
                run(*case)
            best = min(best, time.perf_counter() - start)
        seconds[lib] = best
    return seconds


def _keep_first(path: Path, text: str) -> None:
    """Write `path` unless another process wrote it first (then its content stands)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)  # refuses to replace
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def compiled_on(device: torch.device) -> bool:
    """Whether the compiled operators run on `device` here: the CPU, outside torch.compile
    (which traces the torch paths instead), where they were built or loaded."""
    return device.type == "cpu" and not torch.compiler.is_compiling() and backend().compiled


def route(x: torch.Tensor, lif_kernel: str = "torch") -> str:
    """Which path computes a block on tensors like `x`: "fused" (compiled operators with the
    linear maps summed inside: fp32 CPU tensors where the backend fuses), "compiled" (compiled
    LIF and attention operators, GEMMs apart: other CPU tensors), or "torch" (torch ops: CUDA,
    torch.compile, the Triton LIF, or the compiled operators off)."""
    if lif_kernel != "torch" or not compiled_on(x.device):
        return "torch"
    if (backend().fused_linear and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")):
        return "fused"
    return "compiled"


def describe(device: str | torch.device, lif_kernel: str = "torch") -> dict:
    """The record a trial, a run directory and a checkpoint keep of how they were computed."""
    device = torch.device(device)
    record = {"device": str(device), "torch": str(torch.__version__), "lif_kernel": lif_kernel,
              "threads": torch.get_num_threads()}
    if device.type == "cuda":
        return {**record, "gpu": torch.cuda.get_device_name(device)}
    record["cpu"] = _cpu_model()
    if lif_kernel != "torch":
        return {**record, "gemm": "torch"}
    return {**record, **{k: v for k, v in asdict(backend()).items() if v != ""}}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def differences(before: dict, now: dict) -> list[str]:
    """'key: before -> now' for what changed between two records that can change results (not
    the CPU's name, nor how the GEMM library was chosen)."""
    ignored = {"cpu", "gpu", "gemm_choice", "why"}
    return [f"{key}: {before.get(key)} -> {now.get(key)}" for key in sorted(set(before) | set(now))
            if key not in ignored and before.get(key) != now.get(key)]
