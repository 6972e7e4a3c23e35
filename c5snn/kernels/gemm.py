"""The model's linear maps on the GEMM library the backend chose (`c5snn.kernels.record`):
oneDNN (`c5snn::gemm`, with c5snn's own dL/dW kernel) or torch's mm (MKL on x86) for fp32 CPU
tensors, torch's elsewhere (CUDA, autocast).

A linear map on spike input (entries 0 or a dropped-out spike's value) keeps for backward their
uint8 copy, a quarter of the fp32 tensor: the copy the LIF that made them wrote in its own pass
where it did (`x8`), else converted here.
"""

from __future__ import annotations

import torch

from c5snn.kernels import record


def _onednn(t: torch.Tensor) -> bool:
    """Whether a GEMM on `t` runs on oneDNN: fp32 CPU tensors where the backend chose it."""
    return (t.dtype == torch.float32 and record.compiled_on(t.device)
            and not torch.is_autocast_enabled("cpu") and record.backend().gemm == "onednn")


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D `a` and `b` (either may be a transposed view): the model's GEMMs, on the
    library the backend chose for fp32 CPU tensors (`c5snn.kernels.record`), else torch's."""
    if _onednn(a) and b.dtype == torch.float32:
        return torch.ops.c5snn.gemm(a, b)
    return a @ b


def weight_grad(grad: torch.Tensor, x: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """dL/dW of a linear layer, `gradᵀ @ x * value`, for `grad` `(rows, out)` and its input `x`
    `(rows, in)`, float or a uint8 copy of spikes (1 where the spike, of `value`, fired): on
    c5snn's own kernel where oneDNN runs the GEMMs (it converts uint8 input in cache), else on
    `matmul`."""
    if _onednn(grad):
        return torch.ops.c5snn.weight_grad(grad, x, value)
    grad_w = matmul(grad.t(), x.to(grad.dtype))
    return grad_w.mul_(value) if value != 1.0 else grad_w


class Linear(torch.autograd.Function):
    """`x @ Wᵀ` on `matmul`, without bias (the LIF that reads it adds it in its pass), keeping
    for backward `x` itself or, for spike input (entries 0 or `value`), a uint8 copy (1 where
    nonzero): `x8` where the LIF that made `x` wrote it, else converted here with `spikes`.
    Backward runs the two GEMMs autograd's linear would, on `matmul` and `weight_grad`.
    """

    @staticmethod
    def forward(ctx, x, x8, weight, value: float, spikes: bool):
        kept = x8 if x8 is not None else x.to(torch.uint8) if spikes else x
        ctx.save_for_backward(kept, weight)
        ctx.value, ctx.spikes = value, x8 is not None or spikes
        out = matmul(x.reshape(-1, x.shape[-1]), weight.t())  # (rows, out)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        kept, weight = ctx.saved_tensors
        grad_x, grad_w = linear_grads(grad_out, kept, weight, ctx.value if ctx.spikes else 1.0,
                                      ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return grad_x, None, grad_w, None, None


def linear_grads(grad_out, kept, weight, value: float, need_x: bool, need_w: bool):
    """(dL/dx, dL/dW) of `x @ weightᵀ` from dL/dout `(..., out)` and what the layer kept of its
    input `x` `(..., in)`: x itself or its uint8 copy (1 where x is `value`); None where not
    needed. The two GEMMs autograd's linear would run, on `matmul` and `weight_grad`."""
    dtype = grad_out.dtype  # bf16 under autocast; autograd casts the grads back to fp32
    flat = grad_out.reshape(-1, grad_out.shape[-1])  # (rows, out)
    grad_x = grad_w = None
    if need_x:
        grad_x = matmul(flat, weight.to(dtype)).view(*grad_out.shape[:-1], weight.shape[1])
    if need_w:
        x = kept.reshape(-1, kept.shape[-1])  # (rows, in): 0/1 for a uint8 copy
        grad_w = weight_grad(flat, x, value)
    return grad_x, grad_w


def linear(x, weight, x8=None, value: float = 1.0, spikes: bool = False):
    """`x @ weightᵀ` (see `Linear`). For spike input `x` (0 or `value`), pass its uint8 copy `x8`
    or `spikes=True` to keep a quarter of the bytes for backward; else `x` is kept."""
    return Linear.apply(x, x8, weight, value, spikes)


