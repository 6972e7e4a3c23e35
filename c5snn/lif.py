"""The LIF neuron: its constants and the multi-step recurrence in torch (the default kernel).

One autograd Function per recurrence exists for speed (DESIGN §2): autograd through T separate
LIF steps records ~6 ops per step and keeps every intermediate; the Function keeps a single
`(T, ...)` tensor for backward. `c5snn.lif_triton` is the same recurrence as a fused CUDA kernel;
`c5snn.model.lif_function` chooses between them.

LIF update (snntorch `Leaky`, reset by subtraction, threshold 1, membrane zero at t=0):

    U[t] = beta * U[t-1] + X[t] - S[t-1]          S[t] = H(U[t] - 1)

with the fast-sigmoid surrogate dS/dU = 1 / (slope * |U - 1| + 1)^2. The reset term S[t-1] is
detached, as in snntorch, so dL/dU[t] = dL/dS[t] * dS/dU[t] + beta * dL/dU[t+1].
"""

from __future__ import annotations

import torch

THRESHOLD = 1.0
SLOPE = 25.0  # snntorch.surrogate.fast_sigmoid(slope=25)


class LIFMultiStep(torch.autograd.Function):
    """Spikes `(T, ...)` of a LIF neuron driven by input currents `x` `(T, ...)`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:
        steps = x.shape[0]
        mem = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (T, ...) membranes
        spikes = torch.empty_like(mem)
        mem[0] = x[0]  # U[0] = beta * 0 + X[0] - 0
        torch.gt(mem[0], THRESHOLD, out=spikes[0])
        for t in range(1, steps):
            u = mem[t]
            torch.mul(mem[t - 1], beta, out=u)
            u.add_(x[t]).sub_(spikes[t - 1])
            torch.gt(u, THRESHOLD, out=spikes[t])
        # Keep only the surrogate denominators (slope*|U-1|+1)^2, computed in place over mem.
        denom = mem.sub_(THRESHOLD).abs_().mul_(SLOPE).add_(1.0).square_()
        ctx.save_for_backward(denom)
        ctx.beta = beta
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        (denom,) = ctx.saved_tensors
        grad = grad_spikes / denom  # (T, ...) dL/dS * dS/dU, before the recurrence
        for t in range(grad.shape[0] - 2, -1, -1):
            grad[t].add_(grad[t + 1], alpha=ctx.beta)
        return grad, None


def lif_torch(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Spikes `(T, ...)` of LIF neurons driven by fp32 currents `x` `(T, ...)`."""
    return LIFMultiStep.apply(x, beta)
