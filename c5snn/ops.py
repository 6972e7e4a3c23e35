"""Spike-form ops in torch as small autograd Functions: dropout and spike attention on the torch
route (CUDA, torch.compile, the compiled operators off), and the dropout keep mask every route
draws with one rule.

Each keeps for backward what a spike allows: masks, spikes and attention counts as uint8, a
quarter of the float tensors autograd would keep. The compiled operators' Functions are in
`c5snn.kernels.functions`, the model's linear maps in `c5snn.kernels.gemm`.
"""

from __future__ import annotations

import torch

from c5snn import kernels

MAX_COUNT = 255  # attention counts are kept as uint8


def keep_mask(shape, p: float, device: torch.device) -> torch.Tensor:
    """uint8 mask, 1 where an element is kept, with P(drop) = round(p * 2^16) / 2^16.

    Drawn as 16-bit integers carved from 64-bit random words (a quarter of the generator calls
    of `torch.rand`; the drop rate is within 2^-17 of `p`), kept as uint8, whose multiply into
    fp32 is the cheapest masking on a CPU (benchmarks/bench_masks.py). Under torch.compile
    (which cannot trace in-place `random_`) the 16-bit integers are drawn directly: same
    distribution, another random stream. On the CPU the compiled operator draws them from a
    counter-based generator (`c5snn.kernels.keep_mask`): same rule, another stream.
    """
    threshold = kernels.keep_threshold(p)
    if kernels.compiled_on(torch.device(device)):
        return kernels.keep_mask(shape, threshold)
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
    (the compiled routes compute it inside `c5snn.kernels.lif_attention`).

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


def spike_attention(qkv, n_heads: int, scale: float, p: float, training: bool):
    """See `SpikeAttention`; `qkv` is `(..., W, 3d)` and the result `(..., W, d)`."""
    lead = qkv.shape[:-2]
    w, d3 = qkv.shape[-2:]
    out = SpikeAttention.apply(qkv.reshape(-1, w, d3), n_heads, scale, p, training)
    return out.view(*lead, w, d3 // 3)
