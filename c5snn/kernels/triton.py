"""The multi-step LIF recurrence as one fused Triton kernel each way (`training.lif_kernel: triton`).

The torch path (`c5snn.lif.LIFMultiStep`) launches ~4 elementwise kernels per time step; on a
GPU, for these small models, launches rather than arithmetic bound the step. Here one program
owns a block of neurons and walks all T steps in registers: forward writes spikes and the
surrogate denominators, backward walks time in reverse. The neuron is `c5snn.neuron.NEURON`
(threshold, reset rule and surrogate slope passed in as compile-time constants).

The compiler may fuse `beta*U + X` into one FMA, so spikes may differ from the torch path where a
membrane lies within an ulp of the threshold; tests/test_triton.py bounds that. Imported
only when the option is set (triton is an optional dependency, CUDA only). Tests also run it on
the CPU through Triton's interpreter (TRITON_INTERPRET=1) when triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from c5snn.neuron import NEURON

BLOCK = 1024
SUBTRACT = NEURON.reset == "subtract"


@triton.jit
def _lif_forward(x_ptr, spikes_ptr, denom_ptr, n, steps, beta, threshold: tl.constexpr,
                 slope: tl.constexpr, SUBTRACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # neurons of this block
    inside = offs < n
    u = tl.zeros([BLOCK], dtype=tl.float32)  # membrane
    s = tl.zeros([BLOCK], dtype=tl.float32)  # previous spike
    for t in range(steps):
        at = t * n + offs  # (T, n) row-major
        x = tl.load(x_ptr + at, mask=inside, other=0.0)
        if SUBTRACT:
            u = u * beta
            u = u + x
            u = u - s * threshold
        else:
            u = u * (1.0 - s)
            u = u * beta + x
        s = (u > threshold).to(tl.float32)
        tl.store(spikes_ptr + at, s, mask=inside)
        d = tl.abs(u - threshold) * slope + 1.0
        tl.store(denom_ptr + at, d * d, mask=inside)


@triton.jit
def _lif_backward(grad_spikes_ptr, denom_ptr, spikes_ptr, grad_x_ptr, n, steps, beta,
                  SUBTRACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.zeros([BLOCK], dtype=tl.float32)  # dL/dU[t+1]
    for i in range(steps):
        at = (steps - 1 - i) * n + offs
        gs = tl.load(grad_spikes_ptr + at, mask=inside, other=0.0).to(tl.float32)
        d = tl.load(denom_ptr + at, mask=inside, other=1.0)
        if SUBTRACT:
            g = gs / d + g * beta
        else:  # carried back by beta * (1 - S[t])
            g = gs / d + g * beta * (1.0 - tl.load(spikes_ptr + at, mask=inside, other=0.0))
        tl.store(grad_x_ptr + at, g, mask=inside)


class LIFTriton(torch.autograd.Function):
    """`c5snn.lif.LIFMultiStep` with both directions as single Triton kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:
        x = x.contiguous()  # (T, ...) fp32
        steps, n = x.shape[0], x[0].numel()
        spikes = torch.empty_like(x)
        denom = torch.empty_like(x)
        grid = (triton.cdiv(n, BLOCK),)
        _lif_forward[grid](x, spikes, denom, n, steps, float(beta), threshold=NEURON.threshold,
                           slope=NEURON.slope, SUBTRACT=SUBTRACT, BLOCK=BLOCK)
        ctx.save_for_backward(denom, spikes)
        ctx.beta = float(beta)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        denom, spikes = ctx.saved_tensors
        grad_spikes = grad_spikes.contiguous()
        steps, n = denom.shape[0], denom[0].numel()
        grad_x = torch.empty_like(denom)
        _lif_backward[(triton.cdiv(n, BLOCK),)](grad_spikes, denom, spikes, grad_x, n, steps,
                                                ctx.beta, SUBTRACT=SUBTRACT, BLOCK=BLOCK)
        return grad_x, None


def lif_triton(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Spikes `(T, ...)` of LIF neurons driven by fp32 currents `x` `(T, ...)`."""
    return LIFTriton.apply(x, beta)
