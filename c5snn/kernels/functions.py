"""The compiled operators as autograd Functions: what the model calls on its "fused" and
"compiled" routes (`c5snn.kernels.route`). Each keeps for backward what its backward operator
reads (membranes, spike bits, a uint8 copy of spike input, a dropout seed), and only where
autograd records the call (`recorded`).

    LIF(x + residual | + bias), dropout, uint8 copy     lif
    LIF2(r + LIF1(x + bias))                             lif_pair
    attention of LIF(x + bias), x the Q/K/V currents     lif_attention
    the same three with x = input @ weightᵀ summed       linear_lif, linear_lif_pair,
      inside the operator, each way                      linear_lif_attention

Dropout masks come from a counter-based stream seeded from torch's generator (`draw_seed`), so
`torch.manual_seed` makes them reproducible; the torch paths draw another stream with the same
rule (`c5snn.ops.keep_mask`).
"""

from __future__ import annotations

import math

import torch

from c5snn.kernels.gemm import linear_grads

MAX_HEAD = 64  # attention.h's kMaxHead: q @ kᵀ as popcounts of one 64-bit word per row
MAX_QKV = 1024  # common.h's kChunk: lif_attention's blocks hold whole rows of 3d neurons


def draw_seed() -> int:
    """A seed for the counter-based dropout stream, from torch's default generator."""
    return int(torch.empty((), dtype=torch.int64).random_())


def keep_threshold(p: float) -> int:
    """The int16 threshold of drop probability `p`: an element whose 16-bit draw, read as int16,
    is >= it is kept, so P(drop) = round(p * 2^16) / 2^16."""
    return int(round(p * 65536)) - 32768


def keep_mask(shape, threshold: int) -> torch.Tensor:
    """uint8 dropout keep mask (1: kept) on the CPU, from the counter-based stream."""
    return torch.ops.c5snn.keep_mask(list(shape), draw_seed(), threshold)


def _dropout(p: float) -> tuple:
    """(dropping, seed, threshold, factor): a dropout's arguments to the operators."""
    return p > 0.0, draw_seed() if p > 0.0 else 0, keep_threshold(p), 1.0 / (1.0 - p)


def recorded(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operator on `tensors`, so that it must keep state for
    backward (inside a Function's forward, `ctx.needs_input_grad` says True under no_grad too)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _outputs(ctx, spikes: torch.Tensor, spikes8: torch.Tensor | None):
    """A LIF Function's outputs: the spikes, or (spikes, their uint8 copy), the copy marked as
    taking no gradient (nor a zero-filled one)."""
    if spikes8 is None:
        return spikes
    ctx.mark_non_differentiable(spikes8)
    ctx.set_materialize_grads(False)
    return spikes, spikes8


def _kept(x, x8, value: float):
    """What a linear map keeps of its input, and its value: the uint8 copy `x8` of spikes of
    `value` where given, else x itself (value 1)."""
    return (x8, value) if x8 is not None else (x, 1.0)


def _one_pass(need, kept) -> bool:
    """Whether a fused backward runs as one operator: both dL/dx and dL/dW wanted, and the
    input's width a multiple of 16 (its tiles); else the LIF's backward, then two GEMMs."""
    return need[0] and need[2] and kept.shape[-1] % 16 == 0


def _linear_grads(grad_currents, kept, weight, value: float, need):
    return linear_grads(grad_currents, kept, weight, value, need[0], need[2])


class LIF(torch.autograd.Function):
    """Spikes `(T, ...)` of LIF neurons driven by fp32 `x` (+ `residual`, or + `bias` over the
    last dimension), dropped out with probability `p` in the same pass, with their uint8 copy
    where `bytes`. dL/dx goes to x and the residual alike, and is summed into dL/dbias."""

    @staticmethod
    def forward(ctx, x, residual, bias, beta: float, p: float, bytes: bool, keep: bool):
        ctx.dropout = _dropout(p)
        spikes, mem, spikes8 = torch.ops.c5snn.lif_forward(x, residual, bias, beta, keep,
                                                           *ctx.dropout, bytes)
        if keep:
            ctx.save_for_backward(mem)
        ctx.beta = beta
        return _outputs(ctx, spikes, spikes8 if bytes else None)

    @staticmethod
    def backward(ctx, grad, *unused):  # only the spikes carry a gradient
        (mem,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_bias = torch.ops.c5snn.lif_backward(grad, mem, ctx.beta, *ctx.dropout,
                                                         mem.shape[-1] if need[2] else 0)
        return (grad_x if need[0] else None, grad_x if need[1] else None,
                grad_bias if need[2] else None, None, None, None, None)


def lif(x, beta: float, residual=None, dropout: float = 0.0, bias=None, bytes: bool = False):
    """See `LIF`; with `bytes`, the pair (spikes, their uint8 copy)."""
    return LIF.apply(x, residual, bias, beta, dropout, bytes, recorded(x, residual, bias))


class LIFPair(torch.autograd.Function):
    """`LIF2(residual + LIF1(x + bias))` in one pass each way (fp32; a spike residual read from
    its uint8 copy `residual8`); spikes bitwise two `LIF` calls', gradients to rounding."""

    @staticmethod
    def forward(ctx, x, bias, residual, beta: float, bytes: bool, keep: bool, residual8):
        spikes, spikes8, mem1, mem2 = torch.ops.c5snn.lif_pair_forward(x, bias, residual, beta,
                                                                       keep, bytes, residual8)
        if keep:
            ctx.save_for_backward(mem1, mem2)
        ctx.beta = beta
        return _outputs(ctx, spikes, spikes8 if bytes else None)

    @staticmethod
    def backward(ctx, grad, *unused):
        mem1, mem2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_sum, grad_x, grad_bias = torch.ops.c5snn.lif_pair_backward(
            grad, mem1, mem2, ctx.beta, mem1.shape[-1] if need[1] else 0)
        return (grad_x if need[0] else None, grad_bias if need[1] else None,
                grad_sum if need[2] else None, None, None, None, None)


def lif_pair(x, beta: float, bias, residual, bytes: bool = False, residual8=None):
    """See `LIFPair`; with `bytes`, the pair (spikes, their uint8 copy)."""
    return LIFPair.apply(x, bias, residual, beta, bytes, recorded(x, bias, residual), residual8)


def _attention_args(scale: float, p: float, training: bool) -> tuple:
    """(alpha, seed, threshold, dropping) of the attention's dropout: scores are counts * alpha."""
    dropping = training and p > 0.0
    return (scale / (1.0 - p) if dropping else scale, draw_seed() if dropping else 0,
            keep_threshold(p), dropping)


class LIFAttention(torch.autograd.Function):
    """`dropout(q @ kᵀ * scale) @ v` per head, q, k, v the column thirds of the spikes of
    `LIF(x + bias)`, `x` the Q/K/V currents `(T, B, W, 3d)` (fp32; may be constant over T): the
    spikes go from the LIF to the attention as bits. Outputs `(T, B, W, d)`."""

    @staticmethod
    def forward(ctx, x, bias, beta: float, n_heads: int, scale: float, p: float,
                training: bool, keep: bool):
        alpha, seed, threshold, dropping = _attention_args(scale, p, training)
        out, mem, bits, kept_mask = torch.ops.c5snn.lif_attention_forward(
            x, bias, beta, keep, n_heads, alpha, seed, threshold, dropping)
        if keep:
            ctx.save_for_backward(mem, bits, kept_mask)
        ctx.beta, ctx.n_heads, ctx.alpha = beta, n_heads, alpha
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mem, bits, kept_mask = ctx.saved_tensors
        t, b, w, d3 = mem.shape
        grad_x, grad_bias = torch.ops.c5snn.lif_attention_backward(
            grad_out.reshape(t * b, w, d3 // 3), mem, bits, kept_mask, ctx.n_heads, ctx.alpha,
            ctx.beta, ctx.needs_input_grad[1])
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_bias if ctx.needs_input_grad[1] else None, None, None, None, None, None, None)


def lif_attention(x, beta: float, bias, n_heads: int, scale: float, p: float, training: bool):
    """See `LIFAttention`."""
    return LIFAttention.apply(x, bias, beta, n_heads, scale, p, training, recorded(x, bias))


class LinearLIF(torch.autograd.Function):
    """`LIF` of the currents `x @ weightᵀ + bias`, summed a few rows at a time in cache by
    fused multiply-adds in oneDNN's order (bitwise its currents), so they never go to memory;
    x may come as its uint8 copy `x8` of spikes of `value`. Backward takes dL/dx and dL/dW from
    dL/dcurrents in cache."""

    @staticmethod
    def forward(ctx, x, x8, weight, value: float, bias, beta: float, p: float, bytes: bool,
                keep: bool):
        ctx.dropout = _dropout(p)
        spikes, mem, spikes8 = torch.ops.c5snn.linear_lif_forward(
            x, x8, value, weight, bias, beta, keep, *ctx.dropout, bytes)
        kept, ctx.value = _kept(x, x8, value)
        if keep:
            ctx.save_for_backward(kept, weight, mem)
        ctx.beta = beta
        return _outputs(ctx, spikes, spikes8 if bytes else None)

    @staticmethod
    def backward(ctx, grad, *unused):
        kept, weight, mem = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _one_pass(need, kept):
            grad_x, grad_w, grad_bias = torch.ops.c5snn.linear_lif_backward(
                grad, mem, kept, ctx.value, weight, ctx.beta, *ctx.dropout, need[4])
        else:
            grad_currents, grad_bias = torch.ops.c5snn.lif_backward(
                grad, mem, ctx.beta, *ctx.dropout, mem.shape[-1] if need[4] else 0)
            grad_x, grad_w = _linear_grads(grad_currents, kept, weight, ctx.value, need)
        return (grad_x, None, grad_w, None, grad_bias if need[4] else None, None, None, None,
                None)


def linear_lif(x, weight, beta: float, bias, x8=None, value: float = 1.0, dropout: float = 0.0,
               bytes: bool = False):
    """See `LinearLIF`; with `bytes`, the pair (spikes, their uint8 copy)."""
    return LinearLIF.apply(x, x8, weight, value, bias, beta, dropout, bytes,
                           recorded(x, weight, bias))


class LinearLIFPair(torch.autograd.Function):
    """`LIFPair` of the currents `x @ weightᵀ`, summed in cache as `LinearLIF`'s."""

    @staticmethod
    def forward(ctx, x, x8, weight, value: float, bias, residual, residual8, beta: float,
                bytes: bool, keep: bool):
        spikes, spikes8, mem1, mem2 = torch.ops.c5snn.linear_lif_pair_forward(
            x, x8, value, weight, bias, residual, residual8, beta, keep, bytes)
        kept, ctx.value = _kept(x, x8, value)
        if keep:
            ctx.save_for_backward(kept, weight, mem1, mem2)
        ctx.beta = beta
        return _outputs(ctx, spikes, spikes8 if bytes else None)

    @staticmethod
    def backward(ctx, grad, *unused):
        kept, weight, mem1, mem2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _one_pass(need, kept):
            grad_sum, grad_x, grad_w, grad_bias = torch.ops.c5snn.linear_lif_pair_backward(
                grad, mem1, mem2, kept, ctx.value, weight, ctx.beta, need[4])
        else:
            grad_sum, grad_currents, grad_bias = torch.ops.c5snn.lif_pair_backward(
                grad, mem1, mem2, ctx.beta, mem1.shape[-1] if need[4] else 0)
            grad_x, grad_w = _linear_grads(grad_currents, kept, weight, ctx.value, need)
        return (grad_x, None, grad_w, None, grad_bias if need[4] else None,
                grad_sum if need[5] else None, None, None, None, None)


def linear_lif_pair(x, weight, beta: float, bias, residual, x8=None, value: float = 1.0,
                    residual8=None, bytes: bool = False):
    """See `LinearLIFPair`; with `bytes`, the pair (spikes, their uint8 copy)."""
    return LinearLIFPair.apply(x, x8, weight, value, bias, residual, residual8, beta, bytes,
                               recorded(x, weight, bias, residual))


class LinearLIFAttention(torch.autograd.Function):
    """`LIFAttention` of the Q/K/V currents `x @ weightᵀ`, summed in cache as `LinearLIF`'s;
    x `(T, B, W, d)` may come as its uint8 copy `x8` (the previous block's spikes)."""

    @staticmethod
    def forward(ctx, x, x8, weight, value: float, bias, beta: float, n_heads: int, scale: float,
                p: float, training: bool, keep: bool):
        alpha, seed, threshold, dropping = _attention_args(scale, p, training)
        out, mem, bits, kept_mask = torch.ops.c5snn.linear_lif_attention_forward(
            x, x8, value, weight, bias, beta, keep, n_heads, alpha, seed, threshold, dropping)
        kept, ctx.value = _kept(x, x8, value)
        if keep:
            ctx.save_for_backward(kept, weight, mem, bits, kept_mask)
        ctx.beta, ctx.n_heads, ctx.alpha = beta, n_heads, alpha
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept, weight, mem, bits, kept_mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        t, b, w, d3 = mem.shape
        grad = grad_out.reshape(t * b, w, d3 // 3)
        if _one_pass(need, kept):
            grad_x, grad_w, grad_bias = torch.ops.c5snn.linear_lif_attention_backward(
                grad, mem, bits, kept_mask, ctx.n_heads, ctx.alpha, ctx.beta, need[4], kept,
                ctx.value, weight)
        else:
            grad_currents, grad_bias = torch.ops.c5snn.lif_attention_backward(
                grad, mem, bits, kept_mask, ctx.n_heads, ctx.alpha, ctx.beta, need[4])
            grad_x, grad_w = _linear_grads(grad_currents, kept, weight, ctx.value, need)
        return (grad_x, None, grad_w, None, grad_bias if need[4] else None, None, None, None,
                None, None, None)


def linear_lif_attention(x, weight, beta: float, bias, n_heads: int, scale: float, p: float,
                         training: bool, x8=None, value: float = 1.0):
    """See `LinearLIFAttention`: `(T, B, W, d)`."""
    return LinearLIFAttention.apply(x, x8, weight, value, bias, beta, n_heads, scale, p,
                                    training, recorded(x, weight, bias))


def register_flop_formulas() -> None:
    """Count the operators' products in `torch.utils.flop_counter` as the torch path's are
    counted (2 per product): the attention's four bmm's each way (q @ kᵀ is popcounts, but the
    same product), the linear maps summed inside the LIF operators, oneDNN's GEMM, dL/dW.
    One registration per operator: stacked decorators would wrap a formula twice."""
    from torch.utils.flop_counter import register_flop_formula

    ops = torch.ops.c5snn

    def attention(t_b_w_d3) -> int:  # q @ kᵀ and scores @ v
        return 2 * 2 * math.prod(t_b_w_d3[:-1]) * t_b_w_d3[-2] * (t_b_w_d3[-1] // 3)

    def linear(x_shape, n) -> int:  # x @ weightᵀ, weight (n, K)
        return 2 * math.prod(x_shape) * n

    formulas = {
        ops.gemm: lambda a, b, *_, **__: 2 * a[0] * a[1] * b[1],
        ops.weight_grad: lambda g, x, *_, **__: 2 * g[0] * g[1] * x[1],
        ops.lif_attention_forward: lambda x, *_, **__: attention(x),
        ops.linear_lif_forward: lambda x, x8, v, w, *_, **__: linear(x, w[0]),
        ops.linear_lif_pair_forward: lambda x, x8, v, w, *_, **__: linear(x, w[0]),
        ops.linear_lif_attention_forward: lambda x, x8, v, w, *_, **__: (
            linear(x, w[0]) + attention((*x[:-1], w[0]))),
        ops.lif_attention_backward: lambda g, *_, **__: 4 * 2 * math.prod(g) * g[1],
        ops.linear_lif_backward: lambda g, m, x, *_, **__: 2 * linear(x, g[-1]),
        ops.linear_lif_pair_backward: lambda g, m1, m2, x, *_, **__: 2 * linear(x, g[-1]),
        ops.linear_lif_attention_backward: lambda g, m, b, k, h, a, beta, bg, x, *_, **__: (
            4 * 2 * math.prod(g) * g[1] + 2 * linear(x, m[-1])),
    }
    for op, formula in formulas.items():
        register_flop_formula(op)(formula)
