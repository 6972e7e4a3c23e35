"""The multi-step LIF recurrence in torch ops: the path on GPUs (without Triton), under
torch.compile, and where the compiled CPU operators are off. The neuron is `c5snn.neuron.NEURON`.

One autograd Function per recurrence (DESIGN §2): autograd through T separate steps records ~6
ops per step and keeps every intermediate; the Function keeps one `(T, ...)` tensor of surrogate
denominators (and, with reset to zero, the spikes) for backward.
"""

from __future__ import annotations

import torch

from c5snn.neuron import NEURON


class LIFMultiStep(torch.autograd.Function):
    """Spikes `(T, ...)` of a LIF neuron driven by input currents `x` `(T, ...)`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:
        theta, subtract = NEURON.threshold, NEURON.reset == "subtract"
        mem = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (T, ...) membranes
        spikes = torch.empty_like(mem)
        mem[0] = x[0]  # U[0] = X[0]: the state starts at zero
        torch.gt(mem[0], theta, out=spikes[0])
        for t in range(1, x.shape[0]):
            u = mem[t]
            if subtract:  # U = beta * U[t-1] + X - S[t-1] * threshold
                torch.mul(mem[t - 1], beta, out=u)
                u.add_(x[t]).sub_(spikes[t - 1], alpha=theta)
            else:  # U = (U[t-1] * (1 - S[t-1])) * beta + X
                torch.mul(mem[t - 1], 1 - spikes[t - 1], out=u)
                u.mul_(beta).add_(x[t])
            torch.gt(u, theta, out=spikes[t])
        # The surrogate denominators (slope * |U - threshold| + 1)^2, computed in place over mem.
        denom = mem.sub_(theta).abs_().mul_(NEURON.slope).add_(1.0).square_()
        ctx.save_for_backward(denom, None if subtract else spikes)
        ctx.beta = beta
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        denom, spikes = ctx.saved_tensors
        grad = grad_spikes / denom  # (T, ...) dL/dS * dS/dU, before the recurrence
        for t in range(grad.shape[0] - 2, -1, -1):  # + dU[t+1]/dU[t] * dL/dU[t+1]
            carry = grad[t + 1] if spikes is None else grad[t + 1] * (1 - spikes[t])
            grad[t].add_(carry, alpha=ctx.beta)
        return grad, None


def lif_torch(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Spikes `(T, ...)` of LIF neurons driven by fp32 currents `x` `(T, ...)`."""
    return LIFMultiStep.apply(x, beta)
