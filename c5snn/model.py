"""SpikingTransformer: a Spikformer-style spiking transformer ranking the 39 parts (DESIGN §2).

Layout is time-major: activations are `(T, B, W, d)`. Each block runs over all T steps at once:
linear maps and attention are batched over T, only the LIF membrane recurrence is stepped. A
block takes one of three routes (`c5snn.kernels.route`, read once per block call): "fused" (the
compiled CPU operators with each linear map summed inside the LIF operator that reads it),
"compiled" (the compiled LIF and attention operators, GEMMs apart: bf16 autocast, no oneDNN or
FMA) or "torch" (torch ops and `c5snn.lif`, or the Triton LIF: CUDA, torch.compile, the compiled
operators off). The step-by-step snntorch version, `c5snn.reference`, must agree; `build_model`
builds either (`training.lif_kernel`).
"""

from __future__ import annotations

import torch
from torch import nn

from c5snn import kernels
from c5snn.data import N_PARTS
from c5snn.lif import lif_torch
from c5snn.ops import dropout_spikes, spike_attention
from c5snn.reference import BlockWeights, ReferenceSpikingTransformer


def _project(x: torch.Tensor, weight: torch.Tensor, x8: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weightᵀ` for `(T, ...)` input (`c5snn.kernels.linear`), its bias left to the LIF that
    reads it; input constant over T (stride 0) is projected once and the result repeated."""
    if x.shape[0] > 1 and x.stride(0) == 0:
        out = kernels.linear(x[0], weight)
        return out.unsqueeze(0).expand(x.shape[0], *out.shape)
    return kernels.linear(x, weight, x8)


class SpikingBlock(BlockWeights):
    """Spike-form self-attention (no softmax) and a spiking FFN, each LIF with its own membrane."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, beta: float, dropout: float,
                 lif_kernel: str = "torch"):
        super().__init__(d_model, d_ffn)
        self.lif_kernel = lif_kernel  # torch or triton: the LIF of the torch route
        self.n_heads = n_heads
        self.beta = beta
        self.dropout = dropout
        self.scale = (d_model // n_heads) ** -0.5

    def _fire(self, route: str, x, residual=None, bias=None, dropout: float = 0.0,
              bytes: bool = True):
        """(spikes, their uint8 copy where `bytes` on a compiled route, else None) of
        LIF(x + residual | + bias), dropped out. Membranes are fp32 whatever autocast made the
        currents: a bf16 membrane (8-bit mantissa) would move spikes across the threshold."""
        x = x.float()
        residual = residual.float() if residual is not None else None
        if route != "torch":
            out = kernels.lif(x, self.beta, residual, dropout, bias, bytes=bytes)
            return out if bytes else (out, None)
        if self.lif_kernel == "triton":
            from c5snn.kernels.triton import lif_triton as recurrence
        else:
            recurrence = lif_torch
        current = x if residual is None else x + residual
        spikes = recurrence(current if bias is None else current + bias, self.beta)
        return dropout_spikes(spikes, dropout, training=True), None

    def _linear_lif(self, route: str, x, weight, bias, x8=None, value=1.0, spikes=False,
                    dropout=0.0):
        """(spikes, uint8 copy or None) of LIF(x @ weightᵀ + bias), dropped out; for spike input
        (0 or `value`) pass its uint8 copy `x8` or `spikes=True`."""
        if route == "fused" and weight.shape[0] % 16 == 0 and (x8 is not None or not spikes):
            return kernels.linear_lif(x, weight, self.beta, bias, x8, value, dropout, bytes=True)
        currents = kernels.linear(x, weight, x8, value, spikes)
        return self._fire(route, currents, bias=bias, dropout=dropout)

    def _linear_lif_pair(self, route: str, x, weight, bias, residual, x8=None, value=1.0,
                         spikes=False, residual8=None):
        """(spikes, uint8 copy or None) of LIF(residual + LIF(x @ weightᵀ + bias)): the block's
        two residual sums; a spike residual may come with its uint8 copy `residual8`."""
        if route == "fused" and weight.shape[0] % 16 == 0 and (x8 is not None or not spikes):
            return kernels.linear_lif_pair(x, weight, self.beta, bias, residual, x8, value,
                                           residual8, bytes=True)
        currents = kernels.linear(x, weight, x8, value, spikes)  # bf16 under autocast
        if route != "torch" and currents.dtype == residual.dtype == torch.float32:
            return kernels.lif_pair(currents, self.beta, bias, residual, True, residual8)
        inner, _ = self._fire(route, currents, bias=bias, bytes=False)
        return self._fire(route, residual, residual=inner)

    def _attention(self, route: str, x, weight, bias, x8=None):
        """Spike attention of the spikes of LIF(x @ weightᵀ + bias), the fused Q/K/V projection
        (`x` may be constant over T): `(T, B, W, d)`."""
        heads, p, training = self.n_heads, self.dropout, self.training
        compiled = (route != "torch" and x.dtype == torch.float32
                    and not torch.is_autocast_enabled("cpu")
                    and weight.shape[0] // 3 // heads <= kernels.MAX_HEAD)
        if compiled and route == "fused" and x8 is not None and weight.shape[0] % 16 == 0:
            return kernels.linear_lif_attention(x, weight, self.beta, bias, heads, self.scale, p,
                                                training, x8)
        currents = _project(x, weight, x8)
        if compiled and currents.shape[-1] <= kernels.MAX_QKV:
            return kernels.lif_attention(currents, self.beta, bias, heads, self.scale, p, training)
        spikes, _ = self._fire(route, currents, bias=bias, bytes=False)
        return spike_attention(spikes, heads, self.scale, p, training)

    def forward(self, x: torch.Tensor, x8: torch.Tensor | None = None):
        """Spikes `(T, B, W, d)` and their uint8 copy (None on the torch route) from the block
        input `x` `(T, B, W, d)`: the first block's currents (maybe constant over T: stride 0)
        or the previous block's spikes, with their uint8 copy `x8`, which the Q/K/V projection
        keeps for backward and the first residual sum reads instead of `x`."""
        route = kernels.route(x, self.lif_kernel)
        # Q, K and V as one GEMM (d -> 3d) and one LIF; the weights stay three nn.Linear (the
        # reference's state-dict keys) and are joined here.
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        mixed = self._attention(route, x, weight, bias, x8)  # (T, B, W, d)
        r1, r1_bytes = self._linear_lif_pair(  # LIF(x + o), o = LIF(o_proj(mixed))
            route, mixed, self.o_proj.weight, self.o_proj.bias, x, residual8=x8)
        dropping = self.training and self.dropout > 0
        hidden, hidden_bytes = self._linear_lif(  # (T, B, W, d_ffn): 0 or 1/(1-p)
            route, r1, self.ffn1.weight, self.ffn1.bias, r1_bytes, spikes=True,
            dropout=self.dropout if dropping else 0.0)
        # LIF(r1 + f), f = LIF(ffn2(hidden)): (T, B, W, d) spikes and their uint8 copy
        return self._linear_lif_pair(route, hidden, self.ffn2.weight, self.ffn2.bias, r1,
                                     hidden_bytes, 1 / (1 - self.dropout) if dropping else 1.0,
                                     spikes=True, residual8=r1_bytes)


class SpikingTransformer(nn.Module):
    """Multi-hot windows `(B, W, 39)` -> part logits `(B, 39)`.

    `encoding="direct"` simulates T=1 step on the input; `"rate_coded"` simulates `timesteps`
    Bernoulli samples of it. Binary input is its own Bernoulli sample, so with
    `binary_input=True` (the trainer's case: CA5 windows are validated multi-hot) the input is
    projected once and repeated over T without drawing random numbers. With `binary_input=False`
    a real Bernoulli sample is drawn per step.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ffn: int,
        beta: float,
        encoding: str,
        timesteps: int = 10,
        dropout: float = 0.1,
        max_window_size: int = 100,
        binary_input: bool = True,
        lif_kernel: str = "torch",
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        if encoding not in ("direct", "rate_coded"):
            raise ValueError(f"encoding must be 'direct' or 'rate_coded', got {encoding!r}")
        self.encoding = encoding
        self.timesteps = 1 if encoding == "direct" else timesteps
        self.max_window_size = max_window_size
        self.binary_input = binary_input
        self.input_proj = nn.Linear(N_PARTS, d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, max_window_size, d_model))
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            SpikingBlock(d_model, n_heads, d_ffn, beta, dropout, lif_kernel) for _ in range(n_layers)
        )
        self.readout = nn.Linear(d_model, N_PARTS)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input currents of the first block: `(T, B, W, d)`."""
        b, w, _ = x.shape
        pos = self.pos_embedding[:, :w]  # (1, W, d)
        if self.timesteps == 1 or self.binary_input:
            h = self.input_proj(x) + pos  # (B, W, d)
            return h.unsqueeze(0).expand(self.timesteps, b, w, h.shape[-1])
        samples = torch.bernoulli(x.unsqueeze(0).expand(self.timesteps, b, w, N_PARTS))
        return self.input_proj(samples) + pos  # (T, B, W, d)

    def forward(
        self, x: torch.Tensor, return_spike_rates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `(B, 39)`; with `return_spike_rates`, also each block's mean firing rate `(L,)`."""
        if x.shape[1] > self.max_window_size:
            raise ValueError(f"window {x.shape[1]} exceeds max_window_size {self.max_window_size}")
        h, h8 = self._encode(x), None
        rates = []
        for block in self.blocks:
            h, h8 = block(h, h8)
            if return_spike_rates:
                rates.append(h.detach().mean())
        logits = self.readout(h.mean(dim=0).mean(dim=1))  # mean over T, then W: (B, d) -> (B, 39)
        if return_spike_rates:
            return logits, torch.stack(rates) if rates else torch.zeros(0)
        return logits


def build_model(params, binary_input: bool = True, lif_kernel: str = "torch") -> nn.Module:
    """A model from `c5snn.config.ModelParams` for a `training.lif_kernel`: the fast
    `SpikingTransformer` ("torch", "triton") or the step-by-step `ReferenceSpikingTransformer`
    ("snntorch"). Both have the same parameters and state-dict keys."""
    kwargs = dict(d_model=params.d_model, n_heads=params.n_heads, n_layers=params.n_layers,
                  d_ffn=params.d_ffn, beta=params.beta, encoding=params.encoding,
                  timesteps=params.timesteps, dropout=params.dropout,
                  max_window_size=params.max_window_size)
    if lif_kernel == "snntorch":
        return ReferenceSpikingTransformer(**kwargs)
    return SpikingTransformer(**kwargs, binary_input=binary_input, lif_kernel=lif_kernel)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["SpikingTransformer", "SpikingBlock", "build_model", "count_parameters"]
