"""Spike-form ops as small autograd Functions: dropout and spike attention (the torch paths), and
the dropout keep mask every path draws with one rule.

Each keeps for backward what a spike allows: masks, spikes and attention counts as uint8 (a
quarter of the float tensors autograd would keep). Dropout draws its uint8 keep mask in forward
and keeps it for backward (see `keep_mask` for how it is drawn cheaply). On the CPU the compiled
operators (`c5snn.native`) replace both: attention keeps bits, and the FFN's dropout runs inside
its LIF. The FFN's linear maps on spikes keep a uint8 copy of their input that the LIF wrote in
its own pass (`Linear`): converting it in a pass of its own cost 8-9% of a step, keeping the
fp32 input instead 14-18% more peak memory (docs/benchmarks.md). The model's GEMMs all go
through `matmul`, which picks the faster GEMM library for this CPU. Where that is oneDNN, a
linear map and the LIF operator that reads it run as one (`LinearLIF`, `LinearLIFPair`,
`LinearLIFAttention`: `fuses_linear`), so the currents and dL/dcurrents stay in cache.
"""

from __future__ import annotations

import torch

from c5snn import native

MAX_COUNT = 255  # attention counts are kept as uint8


def keep_mask(shape, p: float, device: torch.device) -> torch.Tensor:
    """uint8 mask, 1 where an element is kept, with P(drop) = round(p * 2^16) / 2^16.

    Drawn as 16-bit integers carved from 64-bit random words: a quarter of the generator calls
    of `torch.rand` (whose per-element cost was a quarter of a CPU training step); the drop
    rate is within 2^-17 of `p`. uint8 rather than bool because the uint8 -> fp32 multiply is
    1.3-2.2x faster on CPU than masked_fill/where with a bool mask or a mixed-dtype multiply
    (benchmarks/bench_masks.py).
    Under torch.compile (which cannot trace in-place `random_`) the 16-bit integers are drawn
    directly: same distribution, another random stream. On the CPU the compiled operator draws
    them from a counter-based generator (`c5snn.native.keep_mask`): same rule, another stream.
    """
    threshold = native.keep_threshold(p)
    if native.serves(device):
        return native.keep_mask(shape, threshold)
    if torch.compiler.is_compiling():
        bits = torch.randint(-32768, 32768, tuple(shape), dtype=torch.int16, device=device)
        return (bits >= threshold).view(torch.uint8)
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    bits = words.view(torch.int16)[:n].view(shape)
    return (bits >= threshold).view(torch.uint8)


def dropout_spikes(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; the uint8 mask (not a float copy) is what backward keeps."""
    if not training or p == 0.0:
        return x
    return _Dropout.apply(x, p)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.factor = 1.0 / (1.0 - p)
        return keep.to(x.dtype).mul_(ctx.factor).mul_(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return keep.to(grad.dtype).mul_(ctx.factor).mul_(grad), None


class SpikeAttention(torch.autograd.Function):
    """`dropout(q @ kᵀ * scale) @ v` per head, without softmax, on binary spikes: the torch path
    (CUDA, bf16 autocast, no compiler); fp32 CPU spikes use `c5snn.native.Attention`.

    Input: `qkv` `(N, W, 3d)`, the spikes of the fused Q/K/V projection (q, k, v are its column
    thirds; `N` is T*B folded). Heads are strided column slices, so no head transpose is copied,
    and the gradient comes back in the same `(N, W, 3d)` layout, written head by head into one
    tensor (no concatenation). Because q and k are 0/1, `q @ kᵀ` is a small integer count:
    backward keeps the counts (with dropped entries zeroed), qkv and the keep mask as uint8, a
    quarter of the float tensors autograd would keep, and folds the scale into its GEMMs' alpha.
    """

    @staticmethod
    def forward(ctx, qkv, n_heads: int, scale: float, p: float, training: bool):
        # Under autocast the GEMMs run in its dtype: counts <= d/h are exact in bf16 too.
        kind = qkv.device.type
        if torch.is_autocast_enabled(kind):
            qkv = qkv.to(torch.get_autocast_dtype(kind))
        n, w, d3 = qkv.shape
        d = d3 // 3
        dh = d // n_heads
        if dh > MAX_COUNT:
            raise ValueError(f"head size {dh} too large for uint8 attention counts")
        dropping = training and p > 0.0
        alpha = scale / (1.0 - p) if dropping else scale
        scores = torch.empty(n_heads, n, w, w, dtype=qkv.dtype, device=qkv.device)  # (h, N, W, W)
        for i in range(n_heads):
            q, k, _ = _head(qkv, i, d, dh)
            torch.bmm(q, k.transpose(1, 2), out=scores[i])  # exact counts
        counts = scores.to(torch.uint8)
        keep = None
        if dropping:  # drop on the 1-byte counts, not the 4-byte scores
            keep = keep_mask(scores.shape, p, qkv.device)
            counts.mul_(keep)
        scores.copy_(counts).mul_(alpha)  # one rounding of an exact integer, as (q@kᵀ)*scale
        out = torch.empty(n, w, d, dtype=qkv.dtype, device=qkv.device)  # (N, W, d)
        for i in range(n_heads):
            _, _, v = _head(qkv, i, d, dh)
            out[..., i * dh:(i + 1) * dh] = torch.bmm(scores[i], v)
        ctx.save_for_backward(qkv.to(torch.uint8), counts, keep)
        ctx.n_heads, ctx.alpha = n_heads, alpha
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv8, counts, keep = ctx.saved_tensors
        dtype = grad_out.dtype
        qkv = qkv8.to(dtype)  # (N, W, 3d) spikes again
        n, w, d3 = qkv.shape
        d = d3 // 3
        dh = d // ctx.n_heads
        grad = torch.empty_like(qkv)  # (N, W, 3d): gq | gk | gv
        tmp = torch.empty(n, w, dh, dtype=dtype, device=qkv.device)
        for i in range(ctx.n_heads):
            q, k, v = _head(qkv, i, d, dh)
            gq, gk, gv = _head(grad, i, d, dh)
            dropped_counts = counts[i].to(dtype)  # (N, W, W); scores = alpha * this
            g = grad_out[..., i * dh:(i + 1) * dh]  # (N, W, dh)
            torch.baddbmm(tmp, dropped_counts.transpose(1, 2), g, beta=0.0, alpha=ctx.alpha, out=tmp)
            gv.copy_(tmp)
            g_scores = torch.bmm(g, v.transpose(1, 2))  # (N, W, W)
            if keep is not None:
                g_scores.mul_(keep[i].to(dtype))
            torch.baddbmm(tmp, g_scores, k, beta=0.0, alpha=ctx.alpha, out=tmp)
            gq.copy_(tmp)
            torch.baddbmm(tmp, g_scores.transpose(1, 2), q, beta=0.0, alpha=ctx.alpha, out=tmp)
            gk.copy_(tmp)
        return grad, None, None, None, None


def _head(qkv: torch.Tensor, i: int, d: int, dh: int):
    """Head i's q, k, v `(N, W, dh)`: strided column slices of `qkv` `(N, W, 3d)`."""
    return (qkv[..., i * dh:(i + 1) * dh], qkv[..., d + i * dh:d + (i + 1) * dh],
            qkv[..., 2 * d + i * dh:2 * d + (i + 1) * dh])


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D `a` and `b` (either may be a transposed view): the model's GEMMs. fp32 CPU
    tensors go to the library `c5snn.native.gemm_library()` chose for this machine (oneDNN
    where MKL would run its AVX2 code, docs/benchmarks.md); the rest (CUDA, autocast) to torch."""
    if (a.dtype == torch.float32 and b.dtype == torch.float32 and native.serves(a.device)
            and not torch.is_autocast_enabled(a.device.type)
            and native.gemm_library() == "onednn"):
        return native.gemm(a, b)
    return a @ b


def weight_grad(grad: torch.Tensor, x: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """dL/dW of a linear layer, `gradᵀ @ x * value`, for `grad` `(rows, out)` and its input `x`
    `(rows, in)`, float or a uint8 copy of spikes (1 where the spike, of `value`, fired).

    Where `matmul` chose oneDNN (CPUs not made by Intel), fp32 CPU gradients go to c5snn's own
    kernel (`c5snn.native.weight_grad`): on the AMD machine measured it summed these products
    (rows = all of a batch's T * B * W, in and out = the layer's widths) 1.1-1.5x faster than
    oneDNN on the model's inputs, converting uint8 input in cache (docs/benchmarks.md). The rest
    go to `matmul`."""
    if (grad.dtype == torch.float32 and native.serves(grad.device)
            and not torch.is_autocast_enabled(grad.device.type)
            and native.gemm_library() == "onednn"):
        return native.weight_grad(grad, x, value)
    grad_w = matmul(grad.t(), x.to(grad.dtype))
    return grad_w.mul_(value) if value != 1.0 else grad_w


class Linear(torch.autograd.Function):
    """`x @ Wᵀ` on `matmul`, without bias (the LIF that reads it adds it in its pass), keeping
    for backward `x` itself or, for spike input (entries 0 or `value`: spikes or dropped-out
    spikes), a uint8 copy (1 where nonzero): a quarter of the fp32 tensor.

    The uint8 copy is `x8` where the LIF that made `x` wrote it in its own pass
    (`c5snn.native.lif(bytes=True)`); with `spikes` and no `x8` (the torch paths) it is
    converted here. Backward runs the two GEMMs autograd's linear would, on `matmul`.
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


def fuses_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weightᵀ` may be summed inside the LIF operator that reads it
    (`c5snn.native`'s linear_lif operators): fp32 CPU tensors where the operators serve and
    oneDNN runs the model's GEMMs (their sums are oneDNN's, bitwise, so the fused and the plain
    path, and the oracle on oneDNN, give the same currents), outputs a multiple of 16 wide."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32
            and native.serves(x.device) and not torch.is_autocast_enabled(x.device.type)
            and native.gemm_library() == "onednn" and native.fused_linear()
            and weight.shape[0] % 16 == 0)


def _kept_input(x, x8, value: float):
    """What a fused linear + LIF Function keeps of the linear map's input, and its value: the
    uint8 copy `x8` of spikes of `value` where given, else x itself (value 1)."""
    return (x8, value) if x8 is not None else (x, 1.0)


def _one_pass_backward(need, kept) -> bool:
    """Whether a fused Function's backward runs as one operator (the LIF's backward with dL/dx
    and dL/dW from dL/dcurrents in cache): in training, when both are needed and the input's
    width K suits its tiles (a multiple of 16); else the LIF's backward, then `linear_grads`."""
    return need[0] and need[2] and kept.shape[-1] % 16 == 0


class LinearLIFPair(torch.autograd.Function):
    """`native.LIFPair` of the currents `x @ weightᵀ` in one operator
    (`native.linear_lif_pair_forward`): the currents are summed a few rows at a time in cache
    and read there by the LIF pair, never written to memory (for d64's output projection and
    second FFN layer, 14.7 MB each way per block). x may come as its uint8 copy `x8` (spike
    input of value `value`), read instead of x. Backward: the pair's backward, then `Linear`'s
    two GEMMs; it keeps `Linear`'s input (x8 where given) and the pair's membranes."""

    @staticmethod
    def forward(ctx, x, x8, weight, value: float, bias, residual, residual8, beta: float,
                bytes: bool, keep: bool):
        spikes, spikes8, mem1, mem2 = native.linear_lif_pair_forward(
            x, x8, value, weight, bias, residual, residual8, beta, keep, bytes)
        kept, ctx.value = _kept_input(x, x8, value)
        if keep:
            ctx.save_for_backward(kept, weight, mem1, mem2)
        ctx.beta = beta
        return native.spike_outputs(ctx, spikes, spikes8 if bytes else None)

    @staticmethod
    def backward(ctx, grad, *unused):  # only the spikes carry a gradient
        kept, weight, mem1, mem2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _one_pass_backward(need, kept):
            grad_sum, grad_x, grad_w, grad_bias = native.linear_lif_pair_backward(
                grad, mem1, mem2, kept, ctx.value, weight, ctx.beta, need[4])
        else:
            grad_sum, grad_currents, grad_bias = torch.ops.c5snn.lif_pair_backward(
                grad, mem1, mem2, ctx.beta, mem1.shape[-1] if need[4] else 0)
            grad_x, grad_w = linear_grads(grad_currents, kept, weight, ctx.value, need[0],
                                          need[2])
        return (grad_x, None, grad_w, None, grad_bias if need[4] else None,
                grad_sum if need[5] else None, None, None, None, None)


class LinearLIF(torch.autograd.Function):
    """`native.LIF` of the currents `x @ weightᵀ + bias` in one operator
    (`native.linear_lif_forward`; the FFN's first layer: 29.4 MB of currents each way per d64
    block), dropped out with probability `p` in the same pass (`native.LIF`'s rule and
    stream), with the spikes' uint8 copy where `bytes`. Input and backward as `LinearLIFPair`'s:
    the LIF's backward (the mask drawn again from its seed), then `Linear`'s two GEMMs."""

    @staticmethod
    def forward(ctx, x, x8, weight, value: float, bias, beta: float, p: float, bytes: bool,
                keep: bool):
        ctx.dropout = (p > 0.0, native.draw_seed() if p > 0.0 else 0,
                       native.keep_threshold(p), 1.0 / (1.0 - p))
        spikes, mem, spikes8 = native.linear_lif_forward(x, x8, value, weight, bias, beta, keep,
                                                         *ctx.dropout, bytes)
        kept, ctx.value = _kept_input(x, x8, value)
        if keep:
            ctx.save_for_backward(kept, weight, mem)
        ctx.beta = beta
        return native.spike_outputs(ctx, spikes, spikes8 if bytes else None)

    @staticmethod
    def backward(ctx, grad, *unused):  # only the spikes carry a gradient
        kept, weight, mem = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _one_pass_backward(need, kept):
            grad_x, grad_w, grad_bias = native.linear_lif_backward(
                grad, mem, kept, ctx.value, weight, ctx.beta, *ctx.dropout, need[4])
        else:
            grad_currents, grad_bias = torch.ops.c5snn.lif_backward(
                grad, mem, ctx.beta, *ctx.dropout, mem.shape[-1] if need[4] else 0)
            grad_x, grad_w = linear_grads(grad_currents, kept, weight, ctx.value, need[0],
                                          need[2])
        return (grad_x, None, grad_w, None, grad_bias if need[4] else None, None, None, None,
                None)


def linear_lif(x, weight, beta: float, bias, x8=None, value: float = 1.0, dropout: float = 0.0,
               bytes: bool = False):
    """Spikes of `LIF(x @ weightᵀ + bias)`, dropped out with probability `dropout`, in one CPU
    operator (see `LinearLIF`; callers check `fuses_linear`); with `bytes`, the pair (spikes,
    their uint8 copy)."""
    keep = native.recorded(x, weight, bias)
    return LinearLIF.apply(x, x8, weight, value, bias, beta, dropout, bytes, keep)


class LinearLIFAttention(torch.autograd.Function):
    """`native.LIFAttention` of the fused Q/K/V currents `x @ weightᵀ` in one operator
    (`native.linear_lif_attention_forward`: 44 MB of currents each way per d64 block never go to
    memory); x `(T, B, W, d)` may come as its uint8 copy `x8` (the previous block's spikes),
    read instead of x. Backward: the LIF and attention's backward, then `Linear`'s two GEMMs."""

    @staticmethod
    def forward(ctx, x, x8, weight, value: float, bias, beta: float, n_heads: int, scale: float,
                p: float, training: bool, keep: bool):
        dropping = training and p > 0.0
        alpha = scale / (1.0 - p) if dropping else scale
        seed, threshold = native.draw_seed() if dropping else 0, native.keep_threshold(p)
        out, mem, bits, kept_mask = native.linear_lif_attention_forward(
            x, x8, value, weight, bias, beta, keep, n_heads, alpha, seed, threshold, dropping)
        kept, ctx.value = _kept_input(x, x8, value)
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
        if _one_pass_backward(need, kept):
            grad_x, grad_w, grad_bias = native.linear_lif_attention_backward(
                grad, mem, bits, kept_mask, ctx.n_heads, ctx.alpha, ctx.beta, need[4], kept,
                ctx.value, weight)
        else:
            grad_currents, grad_bias = torch.ops.c5snn.lif_attention_backward(
                grad, mem, bits, kept_mask, ctx.n_heads, ctx.alpha, ctx.beta, need[4])
            grad_x, grad_w = linear_grads(grad_currents, kept, weight, ctx.value, need[0],
                                          need[2])
        return (grad_x, None, grad_w, None, grad_bias if need[4] else None, None, None, None,
                None, None, None)


def linear_lif_attention(x, weight, beta: float, bias, n_heads: int, scale: float, p: float,
                         training: bool, x8=None, value: float = 1.0):
    """`dropout(q @ kᵀ * scale) @ v` per head, q, k, v the column thirds of the spikes of
    `LIF(x @ weightᵀ + bias)`, in one CPU operator (see `LinearLIFAttention`; callers check
    `fuses_linear`): `(T, B, W, d)`."""
    keep = native.recorded(x, weight, bias)
    return LinearLIFAttention.apply(x, x8, weight, value, bias, beta, n_heads, scale, p,
                                    training, keep)


def linear_lif_pair(x, weight, beta: float, bias, residual, x8=None, value: float = 1.0,
                    residual8=None, bytes: bool = False):
    """Spikes of `LIF(residual + LIF(x @ weightᵀ + bias))` in one CPU operator (see
    `LinearLIFPair`; callers check `fuses_linear`); with `bytes`, the pair (spikes, uint8 copy)."""
    keep = native.recorded(x, weight, bias, residual)
    return LinearLIFPair.apply(x, x8, weight, value, bias, residual, residual8, beta, bytes, keep)


def spike_attention(qkv, n_heads: int, scale: float, p: float, training: bool):
    """See `SpikeAttention`; `qkv` is `(..., W, 3d)` and the result `(..., W, d)`.

    fp32 CPU spikes go to the compiled operator (`c5snn.native.Attention`, same outputs and
    dropout mask) where it serves and a head fits its 64-bit words; the rest to `SpikeAttention`.
    """
    lead = qkv.shape[:-2]
    w, d3 = qkv.shape[-2:]
    flat = qkv.reshape(-1, w, d3)
    fast = (qkv.dtype == torch.float32 and d3 // 3 // n_heads <= native.MAX_HEAD
            and native.serves(qkv.device) and not torch.is_autocast_enabled(qkv.device.type))
    out = (native.Attention if fast else SpikeAttention).apply(flat, n_heads, scale, p, training)
    return out.view(*lead, w, d3 // 3)
