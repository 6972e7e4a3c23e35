"""c5snn's compiled CPU operators (`native.cpp`), built on first use and cached.

On a CPU, after the GEMMs, a training step's time went to elementwise passes over memory: the
pure-torch LIF recurrence (`c5snn.lif.LIFMultiStep`, ~4 ops per time step), dropout's random
numbers (`torch.Tensor.random_`, a Mersenne Twister), and spike attention's small batched GEMMs
with their head-slice, uint8 and mask copies. `native.cpp` does each in one pass: the LIF walks
all T steps per block of neurons each way (and takes a residual, `LIF(a + b)`, so the block's
sums are not materialised); dropout masks come from a counter-based generator seeded from
torch's; attention runs one task per (head, sequence) in cache, q @ kᵀ as popcounts, its mask
drawn inline from the same generator (`Attention`). Where one operator's output was only ever
read by the next, the two are fused so that it never goes to memory: the block's residual LIF
chains `LIF(r + LIF(x + b))` (`LIFPair`), and the Q/K/V LIF with the attention that reads its
spikes, as bits, both ways (`LIFAttention`). A linear layer's dL/dW has its own kernel
(`weight_grad`: oneDNN's weakest product), where oneDNN runs the GEMMs; there, too, the linear
maps are summed inside the LIF operators that read them (`linear_lif_*`, the autograd Functions
in `c5snn.ops`): a few rows' currents at a time, in cache, by fused multiply-adds in oneDNN's
order (bitwise its currents), and backward the LIF's dL/dcurrents turned into dL/dx and dL/dW
in cache, so currents and their gradients never go to memory. LIF spikes and membranes,
and attention outputs, equal the torch path's (tests/test_native.py); the dropout stream differs
from the torch path's, with the same drop probability. (A one-pass masked scale was measured no
faster than torch's three passes in a training step, and dropped.) The operators run on torch's
OpenMP threads (`torch.set_num_threads`).

Build: `torch.utils.cpp_extension` compiles it with the machine's C++ compiler (g++, ninja from
the `ninja` package) the first time a process needs it, into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`); later processes load the cached
library. The library's name hashes the source, flags, torch version and this CPU's instruction
set, so a cache shared between machines never hands one machine another's build. A build lock
left by a build killed midway is cleared after 5 minutes (torch would wait for it forever), and
a cached library that fails to load is rebuilt once. Where it cannot be built (no compiler), or
with `C5SNN_NATIVE=0`, c5snn logs one line and uses the torch paths.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from c5snn.errors import first_line
from c5snn.files import atomic_path

SOURCE = Path(__file__).with_name("native.cpp")
# -ffp-contract=off: no fused multiply-add, so the arithmetic rounds as the torch path's does.
# -fopenmp: ATen's parallel_for is inline and runs serially unless the extension is compiled and
# linked with OpenMP; linked, it shares torch's libgomp (same soname) and its thread count.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
ENV_SWITCH = "C5SNN_NATIVE"
GEMM_SWITCH = "C5SNN_GEMM"  # "onednn" or "torch": which library runs the model's CPU GEMMs
MAX_HEAD = 64  # native.cpp's kMaxHead: q @ kᵀ as popcounts of one 64-bit word per row
MAX_QKV = 1024  # native.cpp's kChunk: lif_attention's blocks hold whole rows of 3d neurons
STALE_LOCK_S = 300.0


def _cpuinfo(field: str) -> str | None:
    """The first line of /proc/cpuinfo that starts with `field`, or None (no such file or line)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line
    except OSError:
        pass
    return None


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (the build uses -march=native)."""
    line = _cpuinfo("flags")
    if line is not None:
        return line
    import platform

    return platform.processor() or platform.machine()


def _cpu_vendor() -> str:
    """"GenuineIntel", "AuthenticAMD", ...; "" where /proc/cpuinfo does not say."""
    line = _cpuinfo("vendor_id")
    return line.split(":", 1)[1].strip() if line else ""


def library_name() -> str:
    """The extension's name: one per (source, flags, torch version, instruction set)."""
    digest = hashlib.sha256()
    flags = " ".join(CFLAGS + LDFLAGS)
    for part in (SOURCE.read_bytes(), flags.encode(), torch.__version__.encode(),
                 _cpu_flags().encode()):
        digest.update(part)
    return f"c5snn_native_{digest.hexdigest()[:16]}"


@functools.cache
def available() -> bool:
    """True once the operators are loaded into this process (building them if needed)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        _build()
    except Exception as exc:  # no compiler, a failed build: the torch path still works
        print(f"c5snn: compiled CPU kernels unavailable ({first_line(exc) or type(exc).__name__});"
              " using the torch paths", file=sys.stderr, flush=True)
        return False
    _register_flop_formulas()
    return True


def _register_flop_formulas() -> None:
    """Count the attention operators' matmuls in `torch.utils.flop_counter` as the torch path's
    bmm's are counted (2 per output element and summand): forward q @ kᵀ and scores @ v, backward
    four products. q @ kᵀ is computed as popcounts, but it is the same product."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.c5snn.attention_forward)
    def _forward(qkv_shape, *args, **kwargs) -> int:
        n, w, d3 = qkv_shape
        return 2 * (2 * n * w * w * (d3 // 3))

    @register_flop_formula(torch.ops.c5snn.lif_attention_forward)
    def _lif_attention(x_shape, *args, **kwargs) -> int:
        t, b, w, d3 = x_shape
        return 2 * (2 * t * b * w * w * (d3 // 3))

    @register_flop_formula(torch.ops.c5snn.gemm)
    def _gemm(a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def _linear_lif(x_shape, x8_shape, value, w_shape, *args, **kwargs) -> int:
        return 2 * math.prod(x_shape) * w_shape[0]  # the currents x @ weightᵀ, summed inside

    def _linear_lif_attention(x_shape, x8_shape, value, w_shape, *args, **kwargs) -> int:
        t, b, w, _ = x_shape  # the Q/K/V product, then the attention's two
        return _linear_lif(x_shape, x8_shape, value, w_shape) + 2 * (2 * t * b * w * w *
                                                                     (w_shape[0] // 3))

    for op in (torch.ops.c5snn.linear_lif_forward, torch.ops.c5snn.linear_lif_pair_forward):
        register_flop_formula(op)(_linear_lif)  # (stacked, the decorators would wrap twice)
    register_flop_formula(torch.ops.c5snn.linear_lif_attention_forward)(_linear_lif_attention)

    def _linear_grads(x_shape, n) -> int:  # dL/dx and dL/dW of x @ weightᵀ, weight (n, K)
        return 2 * 2 * math.prod(x_shape) * n

    @register_flop_formula(torch.ops.c5snn.linear_lif_pair_backward)
    def _linear_lif_pair_backward(grad_shape, m1_shape, m2_shape, x_shape, *args, **kwargs) -> int:
        return _linear_grads(x_shape, grad_shape[-1])

    @register_flop_formula(torch.ops.c5snn.linear_lif_attention_backward)
    def _linear_lif_attention_backward(grad_shape, mem_shape, bits_shape, keep_shape, heads,
                                       alpha, beta, bias_grad, x_shape, *args, **kwargs) -> int:
        return _backward(grad_shape) + _linear_grads(x_shape, mem_shape[-1])

    @register_flop_formula(torch.ops.c5snn.linear_lif_backward)
    def _linear_lif_backward(grad_shape, mem_shape, x_shape, *args, **kwargs) -> int:
        return _linear_grads(x_shape, grad_shape[-1])

    @register_flop_formula(torch.ops.c5snn.weight_grad)
    def _weight_grad(g_shape, x_shape, *args, **kwargs) -> int:
        return 2 * g_shape[0] * g_shape[1] * x_shape[1]

    def _backward(grad_shape, *args, **kwargs) -> int:
        n, w, d = grad_shape
        return 4 * (2 * n * w * w * d)

    # one registration per operator: stacked, the decorators wrap the formula twice, and the
    # outer wrapper's call then passes out_shape twice (counting attention_backward raised)
    for op in (torch.ops.c5snn.attention_backward, torch.ops.c5snn.lif_attention_backward):
        register_flop_formula(op)(_backward)


def serves(device: torch.device) -> bool:
    """Whether the compiled operators run on `device` here: CPU tensors, outside torch.compile
    (which traces the torch paths instead), and built or loadable on this machine."""
    return device.type == "cpu" and not torch.compiler.is_compiling() and available()


@functools.cache
def gemm_library() -> str:
    """Which library runs the model's fp32 CPU GEMMs (`c5snn.ops.matmul`): "onednn" or "torch".

    torch's mm calls MKL, which runs its AVX2 code on CPUs not made by Intel: on an AMD EPYC with
    AVX-512 a 2048 x 2048 GEMM ran at 203-233 GFLOP/s on MKL and 434-483 on oneDNN (also inside
    torch), and the model's GEMMs 1.4-2.9x faster on oneDNN (docs/benchmarks.md). So oneDNN runs
    them on CPUs whose vendor is not Intel, where torch carries it; on Intel CPUs MKL is at home
    and stays (oneDNN was not measured there).
    `C5SNN_GEMM=onednn|torch` overrides the choice (another value is reported in one line and
    ignored: a typo in the environment must not cost a sweep's points).
    """
    choice = os.environ.get(GEMM_SWITCH, "").strip().lower()
    if choice not in ("", "onednn", "torch"):
        print(f"c5snn: ignoring {GEMM_SWITCH}={choice!r} (expected 'onednn' or 'torch')",
              file=sys.stderr, flush=True)
        choice = ""
    if not available() or not torch.ops.c5snn.onednn_available():
        return "torch"
    if choice:
        return choice
    return "torch" if _cpu_vendor() == "GenuineIntel" else "onednn"


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D fp32 CPU tensors (either may be a transposed view) on oneDNN."""
    return torch.ops.c5snn.gemm(a, b)


def linear_lif_pair_forward(x, x8, value, weight, bias, residual, residual8, beta, keep, bytes):
    """(spikes, their uint8 copy, membranes of both LIFs) of `LIF(residual + LIF(x @ weightᵀ +
    bias))` (`c5snn.ops.LinearLIFPair`): the currents summed in cache, never in memory."""
    return torch.ops.c5snn.linear_lif_pair_forward(x, x8, value, weight, bias, residual,
                                                   residual8, beta, keep, bytes)


def linear_lif_forward(x, x8, value, weight, bias, beta, keep, dropping, seed, threshold, factor,
                       bytes):
    """(spikes, membranes, their uint8 copy) of `LIF(x @ weightᵀ + bias)`, dropped out
    (`c5snn.ops.LinearLIF`): the currents summed in cache, never in memory."""
    return torch.ops.c5snn.linear_lif_forward(x, x8, value, weight, bias, beta, keep, dropping,
                                              seed, threshold, factor, bytes)


def linear_lif_backward(grad, mem, x, value, weight, beta, dropping, seed, threshold, factor,
                        bias_grad):
    """(dL/dx, dL/dW, dL/dbias) of `linear_lif_forward` in one pass from dL/dspikes, the
    membranes, the dropout's seed and the layer's kept input `x` (fp32, or its uint8 copy of
    value `value`): dL/dcurrents stays in cache (`c5snn.ops.LinearLIF`)."""
    return torch.ops.c5snn.linear_lif_backward(grad, mem, x, value, weight, beta, dropping, seed,
                                               threshold, factor, bias_grad)


def linear_lif_attention_backward(grad, mem, bits, keep, heads, alpha, beta, bias_grad, x, value,
                                  weight):
    """(dL/dx, dL/dW, dL/dbias) of `linear_lif_attention_forward` in one pass: the attention's
    and the LIF's backward (`lif_attention_backward`), each sequence's dL/dcurrents turned into
    dL/dx and dL/dW while in cache (`c5snn.ops.LinearLIFAttention`)."""
    return torch.ops.c5snn.linear_lif_attention_backward(grad, mem, bits, keep, heads, alpha,
                                                         beta, bias_grad, x, value, weight)


def linear_lif_pair_backward(grad, mem1, mem2, x, value, weight, beta, bias_grad):
    """(dL/dresidual, dL/dx, dL/dW, dL/dbias) of `linear_lif_pair_forward` in one pass from dL/dy,
    both membranes and the layer's kept input `x` (fp32, or its uint8 copy of value `value`):
    dL/dcurrents stays in cache (`c5snn.ops.LinearLIFPair`)."""
    return torch.ops.c5snn.linear_lif_pair_backward(grad, mem1, mem2, x, value, weight, beta,
                                                    bias_grad)


def linear_lif_attention_forward(x, x8, value, weight, bias, beta, keep, heads, alpha, seed,
                                 threshold, dropping):
    """(out, membranes, bits, keep mask) of the attention of the spikes of `LIF(x @ weightᵀ +
    bias)` (`c5snn.ops.LinearLIFAttention`): the currents summed in cache, never in memory."""
    return torch.ops.c5snn.linear_lif_attention_forward(x, x8, value, weight, bias, beta, keep,
                                                        heads, alpha, seed, threshold, dropping)


@functools.cache
def fused_linear() -> bool:
    """Whether this build sums the linear_lif operators' products with fused multiply-adds (FMA
    in the instruction set), as oneDNN's kernels do: without, their currents would round
    differently from oneDNN's, and the model uses the separate GEMM."""
    return available() and torch.ops.c5snn.fused_linear_available()


def weight_grad(grad: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`gradᵀ @ x * scale` for fp32 `grad` `(rows, M)` and fp32 or uint8 `x` `(rows, N)` on the
    CPU: a linear layer's dL/dW, its sum over all rows split between torch's threads."""
    return torch.ops.c5snn.weight_grad(grad, x, scale)


def build_directory() -> Path:
    """Where this machine's build of the operators lives (torch's extension cache)."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(cache) / library_name()


def _build() -> None:
    """Load the cached build, or build it; a damaged cached build is rebuilt once."""
    if shutil.which("ninja") is None:  # the venv's ninja, when the venv is not activated
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    root = build_directory()
    cached = (root / f"{root.name}.so").exists()
    if not cached:
        print(f"c5snn: building the compiled CPU kernels into {root} (once per machine) ...",
              file=sys.stderr, flush=True)
    try:
        _load(root)
    except Exception:
        if not cached:
            raise
        # A cached library that does not load (damaged on disk): rebuild it from scratch. torch
        # builds an extension at most once per process, so a fresh process builds it.
        print(f"c5snn: the cached build in {root} does not load; rebuilding it ...",
              file=sys.stderr, flush=True)
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-c", "from c5snn import native; native._build()"],
                       check=True, capture_output=True)
        torch.ops.load_library(str(root / f"{root.name}.so"))


def _load(root: Path) -> None:
    from torch.utils import cpp_extension

    root.mkdir(parents=True, exist_ok=True)
    # torch's build lock is a file that a build killed midway leaves behind, and torch would
    # wait for it forever; a build takes seconds, so a lock this old has no owner.
    lock = root / "lock"
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    # Compile a copy kept beside the build: every checkout with this source (the name hashes
    # it) then shares one build, where the checkout's own path would make ninja rebuild.
    source = root / SOURCE.name
    if not source.exists() or source.read_bytes() != SOURCE.read_bytes():
        with atomic_path(source) as tmp:
            tmp.write_bytes(SOURCE.read_bytes())
    # copies: torch appends to the flag lists it is given, and library_name() hashes ours
    cpp_extension.load(name=root.name, sources=[str(source)], extra_cflags=list(CFLAGS),
                       extra_ldflags=list(LDFLAGS), build_directory=str(root),
                       is_python_module=False, verbose=False)


def spike_outputs(ctx, spikes: torch.Tensor, spikes8: torch.Tensor | None):
    """A LIF Function's outputs: the spikes, or the pair (spikes, their uint8 copy), the copy
    marked as taking no gradient."""
    if spikes8 is None:
        return spikes
    ctx.mark_non_differentiable(spikes8)
    ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" for the bytes
    return spikes, spikes8


class LIF(torch.autograd.Function):
    """Spikes `(T, ...)` of LIF neurons driven by `x` (+ `residual`, or + `bias` over the last
    dimension), fp32; with `p` > 0, dropped out in the same pass (0 or 1/(1-p), `keep_mask`'s
    rule and stream); with `bytes`, also their uint8 copy (1 where nonzero), written in the same
    pass, for a layer that keeps its input for backward (`c5snn.ops.Linear`).

    Backward keeps the membranes (fp32, one `(T, ...)` tensor; none where autograd does not
    record the call, `recorded`) and the dropout seed (the mask is drawn again), returns the
    same dL/dX to `x` and `residual`, and sums it into dL/dbias in the same pass (the sum a
    linear layer's backward would otherwise make over dL/dX).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor | None, bias: torch.Tensor | None,
                beta: float, p: float, bytes: bool, keep: bool):
        ctx.dropout = (p > 0.0, draw_seed() if p > 0.0 else 0, keep_threshold(p),
                       1.0 / (1.0 - p))
        spikes, mem, spikes8 = torch.ops.c5snn.lif_forward(x, residual, bias, beta, keep,
                                                           *ctx.dropout, bytes)
        if keep:
            ctx.save_for_backward(mem)
        ctx.beta = beta
        return spike_outputs(ctx, spikes, spikes8 if bytes else None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *unused):  # only the spikes carry a gradient
        (mem,) = ctx.saved_tensors
        columns = mem.shape[-1] if ctx.needs_input_grad[2] else 0
        grad_x, grad_bias = torch.ops.c5snn.lif_backward(grad, mem, ctx.beta, *ctx.dropout,
                                                         columns)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_x if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None, None, None, None, None)


def recorded(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operator on `tensors`, so that it must keep state for
    backward. Inside an autograd Function's forward `ctx.needs_input_grad` cannot tell: it
    says True under `torch.no_grad()` too (a validation pass), so the wrappers decide."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lif(x: torch.Tensor, beta: float, residual: torch.Tensor | None = None,
        dropout: float = 0.0, bias: torch.Tensor | None = None, bytes: bool = False):
    """Spikes `(T, ...)` of LIF neurons driven by fp32 currents `x` (+ `residual`, or + `bias`
    `(C,)` over the last dimension) on the CPU, dropped out with probability `dropout` (no
    residual then); with `bytes`, the pair (spikes, their uint8 copy)."""
    return LIF.apply(x, residual, bias, beta, dropout, bytes, recorded(x, residual, bias))


class LIFPair(torch.autograd.Function):
    """`LIF2(residual + LIF1(x + bias))`, two LIF layers in one pass each way (`lif_pair_forward`
    in native.cpp): the spikes of LIF1 never go to memory, and backward walks time once for
    both. Spikes bitwise those of the two `LIF` calls; gradients to rounding. With `bytes`, also
    the spikes' uint8 copy. Where the residual is spikes with a uint8 copy `residual8`, the pass
    reads the copy (a quarter of the bytes). Backward keeps both layers' membranes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, beta: float,
                bytes: bool, keep: bool, residual8: torch.Tensor | None):
        spikes, spikes8, mem1, mem2 = torch.ops.c5snn.lif_pair_forward(x, bias, residual, beta,
                                                                       keep, bytes, residual8)
        if keep:
            ctx.save_for_backward(mem1, mem2)
        ctx.beta = beta
        return spike_outputs(ctx, spikes, spikes8 if bytes else None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *unused):
        mem1, mem2 = ctx.saved_tensors
        columns = mem1.shape[-1] if ctx.needs_input_grad[1] else 0
        grad_sum, grad_x, grad_bias = torch.ops.c5snn.lif_pair_backward(grad, mem1, mem2,
                                                                        ctx.beta, columns)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_bias if ctx.needs_input_grad[1] else None,
                grad_sum if ctx.needs_input_grad[2] else None, None, None, None, None)


def lif_pair(x: torch.Tensor, beta: float, bias: torch.Tensor, residual: torch.Tensor,
             bytes: bool = False, residual8: torch.Tensor | None = None):
    """Spikes `(T, ...)` of `LIF(residual + LIF(x + bias))` on the CPU (fp32; `bias` `(C,)` over
    the last dimension); with `bytes`, the pair (spikes, their uint8 copy). `residual8`: where
    the residual is spikes (0 or 1), their uint8 copy, read in its place."""
    return LIFPair.apply(x, bias, residual, beta, bytes, recorded(x, bias, residual), residual8)


def draw_seed() -> int:
    """A seed for the counter-based stream, drawn from torch's default generator (so
    `torch.manual_seed` makes the masks reproducible)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def keep_mask(shape, threshold: int) -> torch.Tensor:
    """uint8 dropout mask on the CPU, 1 where the element's int16 draw is >= `threshold` (see
    `c5snn.ops.keep_mask`), seeded from torch's default generator (so `torch.manual_seed` makes
    it reproducible)."""
    return torch.ops.c5snn.keep_mask(list(shape), draw_seed(), threshold)


def keep_threshold(p: float) -> int:
    """The int16 threshold of drop probability `p`: an element whose 16-bit draw, read as int16,
    is >= it is kept, so P(drop) = round(p * 2^16) / 2^16 (`c5snn.ops.keep_mask`)."""
    return int(round(p * 65536)) - 32768


class Attention(torch.autograd.Function):
    """`dropout(q @ kᵀ * scale) @ v` per head on the fused `(N, W, 3d)` fp32 spikes, on the CPU.

    One task per (head, sequence), in one pass each way (`attention_forward` and
    `attention_backward` in native.cpp): q @ kᵀ as popcounts of 64-bit spike words, the dropout
    mask drawn inline from `keep_mask`'s stream (the same seed draw, so the same mask as
    `c5snn.ops.SpikeAttention`'s), scores and outputs kept in cache. Backward keeps only bits:
    the spikes (1/32 of a float per element) and the dropout mask (1/32 of a float per score).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_heads: int, scale: float, p: float, training: bool):
        dropping = training and p > 0.0
        alpha = scale / (1.0 - p) if dropping else scale
        seed, threshold = draw_seed() if dropping else 0, keep_threshold(p)
        out, bits, keep = torch.ops.c5snn.attention_forward(qkv, n_heads, alpha, seed, threshold,
                                                            dropping)
        ctx.save_for_backward(bits, keep)
        ctx.n_heads, ctx.alpha = n_heads, alpha
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        bits, keep = ctx.saved_tensors
        grad = torch.ops.c5snn.attention_backward(grad_out, bits, keep, ctx.n_heads, ctx.alpha)
        return grad, None, None, None, None


class LIFAttention(torch.autograd.Function):
    """`Attention` of the spikes of `LIF(x + bias)`, for the fused Q/K/V currents `x`
    `(T, B, W, 3d)` (fp32; may be constant over T), in one operator (`lif_attention_forward`):
    the LIF writes its spikes as the bits the attention reads, not as a `(T, B, W, 3d)` fp32
    tensor written and read back only to be packed (44 MB each way per d64 layer). Outputs
    `(T, B, W, d)` and gradients as `Attention.apply(lif(x, bias=bias))` (spikes bitwise, the
    same dropout mask). Backward keeps the LIF's membranes and the attention's bits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, beta: float, n_heads: int,
                scale: float, p: float, training: bool, grads: bool):
        dropping = training and p > 0.0
        alpha = scale / (1.0 - p) if dropping else scale
        seed, threshold = draw_seed() if dropping else 0, keep_threshold(p)
        out, mem, bits, keep = torch.ops.c5snn.lif_attention_forward(
            x, bias, beta, grads, n_heads, alpha, seed, threshold, dropping)
        if grads:
            ctx.save_for_backward(mem, bits, keep)
        ctx.beta, ctx.n_heads, ctx.alpha = beta, n_heads, alpha
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        mem, bits, keep = ctx.saved_tensors
        t, b, w, d3 = mem.shape
        grad_x, grad_bias = torch.ops.c5snn.lif_attention_backward(
            grad_out.reshape(t * b, w, d3 // 3), mem, bits, keep, ctx.n_heads, ctx.alpha,
            ctx.beta, ctx.needs_input_grad[1])
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_bias if ctx.needs_input_grad[1] else None, None, None, None, None, None, None)


def lif_attention(x: torch.Tensor, beta: float, bias: torch.Tensor, n_heads: int, scale: float,
                  p: float, training: bool) -> torch.Tensor:
    """`dropout(q @ kᵀ * scale) @ v` per head, q, k, v the column thirds of the spikes of
    `LIF(x + bias)`, `x` `(T, B, W, 3d)` fp32 on the CPU; see `LIFAttention`."""
    return LIFAttention.apply(x, bias, beta, n_heads, scale, p, training, recorded(x, bias))
