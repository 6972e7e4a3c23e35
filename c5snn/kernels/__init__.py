"""c5snn's compiled kernels, behind one boundary: what the model calls, and the record of how.

    record.py     the backend record, decided once per process: compiled operators on or off
                  (and why), their instruction-set variant, the GEMM library (measured), fusion;
                  `route` (which path a block takes), `describe` (what trials keep)
    build.py      building and caching the CPU operators per machine and variant (C5SNN_ISA)
    functions.py  the CPU operators as autograd Functions
    gemm.py       the model's linear maps on the GEMM library the record chose
    cpu/          the CPU operators in C++: neuron.h (the LIF, once), common.h, lif.h,
                  attention.h, weight_grad.h, linear.h (oneDNN's GEMM, the fused linear maps),
                  ops.cpp (their registration)
    triton.py     the LIF recurrence as Triton kernels (CUDA; training.lif_kernel: triton)

On a CPU, after the GEMMs, a training step's time went to elementwise passes over memory (the
torch LIF recurrence, dropout's random numbers, spike attention's small GEMMs and copies): each
operator does its part in one pass, fused where one's output was read only by the next. How each
got fast, with the measurements, is in docs/benchmarks.md and the commits; docs/backends.md says
which path runs where and how it is tested.
"""

from c5snn.kernels.functions import (
    MAX_HEAD,
    MAX_QKV,
    draw_seed,
    keep_mask,
    keep_threshold,
    lif,
    lif_attention,
    lif_pair,
    linear_lif,
    linear_lif_attention,
    linear_lif_pair,
)
from c5snn.kernels.gemm import linear
from c5snn.kernels.record import Backend, backend, compiled_on, describe, differences, route

__all__ = ["MAX_HEAD", "MAX_QKV", "Backend", "backend", "compiled_on", "describe", "differences", "draw_seed",
           "keep_mask", "keep_threshold", "lif", "lif_attention", "lif_pair", "linear", "linear_lif",
           "linear_lif_attention", "linear_lif_pair", "route"]
