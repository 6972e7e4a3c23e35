"""SpikingTransformer: a Spikformer-style spiking transformer ranking the 39 parts (DESIGN §2).

Layout is time-major: activations are `(T, B, W, d)`. Each block runs over all T steps at once:
linear maps and attention are batched over T, only the LIF membrane recurrence is stepped
(`c5snn.lif`, or `c5snn.lif_triton` on CUDA). The step-by-step snntorch version,
`c5snn.reference`, must agree; `build_model` builds either (`training.lif_kernel`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from c5snn import native
from c5snn.data import N_PARTS
from c5snn.lif import lif_torch
from c5snn.ops import (
    dropout_spikes,
    fuses_linear,
    linear,
    linear_lif,
    linear_lif_attention,
    linear_lif_pair,
    spike_attention,
)
from c5snn.reference import BlockWeights, ReferenceSpikingTransformer


def lif_function(kernel: str) -> Callable[..., torch.Tensor]:
    """The multi-step LIF of a `training.lif_kernel`: `fire(x, beta, residual=None, bias=None,
    dropout=0.0, bytes=False)` gives the spikes `(T, ...)` of neurons driven by currents `x`
    (+ `residual`, both `(T, ...)`, or + a linear layer's `bias` over the last dimension); with
    `bytes`, the pair (spikes, their uint8 copy or None) for `c5snn.ops.linear`.

    "torch" runs the compiled CPU operator (`c5snn.native`, bitwise the same spikes) on CPU
    tensors where it could be built, else the torch recurrence (`c5snn.lif`; also under
    torch.compile, which traces it). `dropout` > 0 drops the spikes out (0 or 1/(1-p)); the
    compiled operator adds the bias, drops out and writes the uint8 copy in its own pass.
    "triton" is one fused CUDA kernel each way (the optional `triton` package, imported only
    when chosen). Membranes are always fp32: under bf16 autocast
    the input current is upcast first, since a bf16 membrane (8-bit mantissa) would move spikes
    across the threshold.
    """
    if kernel == "triton":
        from c5snn.lif_triton import lif_triton as recurrence
    else:
        recurrence = lif_torch

    def fire(x: torch.Tensor, beta: float, residual: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, dropout: float = 0.0, bytes: bool = False):
        x = x if x.dtype == torch.float32 else x.float()
        if residual is not None and residual.dtype != torch.float32:
            residual = residual.float()
        if kernel == "torch" and native.serves(x.device):  # bias, dropout, bytes in its pass
            return native.lif(x, beta, residual, dropout, bias, bytes)
        current = x if residual is None else x + residual
        spikes = recurrence(current if bias is None else current + bias, beta)
        spikes = dropout_spikes(spikes, dropout, training=True)
        return (spikes, None) if bytes else spikes  # ops.linear converts it itself

    return fire


def linear_lif_function(kernel: str) -> Callable[..., tuple]:
    """`fire_linear(x, weight, beta, bias, x8=None, value=1.0, spikes=False, dropout=0.0)`:
    (spikes, their uint8 copy or None) of `LIF(x @ weightᵀ + bias)`, dropped out with
    probability `dropout`, as `c5snn.ops.linear` and `lif_function(kernel)` would give them; the
    linear map summed inside the LIF's pass where `c5snn.ops.fuses_linear`
    (`c5snn.ops.LinearLIF`)."""
    fire = lif_function(kernel)

    def fire_linear(x: torch.Tensor, weight: torch.Tensor, beta: float, bias: torch.Tensor,
                    x8: torch.Tensor | None = None, value: float = 1.0, spikes: bool = False,
                    dropout: float = 0.0):
        if kernel == "torch" and fuses_linear(x, weight) and (x8 is not None or not spikes):
            return linear_lif(x, weight, beta, bias, x8, value, dropout, True)
        return fire(linear(x, weight, x8, value, spikes), beta, bias=bias, dropout=dropout,
                    bytes=True)

    return fire_linear


def linear_lif_pair_function(kernel: str) -> Callable[..., tuple]:
    """`fire_pair(x, weight, beta, bias, residual, x8=None, value=1.0, spikes=False,
    residual8=None)`: (spikes, their uint8 copy or None) of `LIF(residual + LIF(x @ weightᵀ +
    bias))`, the block's two residual sums, as `c5snn.ops.linear` and two `lif_function(kernel)`
    calls would give them (`x8`, `value`, `spikes`: the linear map's spike input, as `linear`
    takes it). "torch" on the CPU runs both LIFs in one compiled pass each way
    (`c5snn.native.lif_pair`: the inner spikes never go to memory), with the linear map summed
    inside that pass where `c5snn.ops.fuses_linear` (`c5snn.ops.LinearLIFPair`: nor do the
    currents), and spike residuals read from their uint8 copy `residual8`; the rest makes the
    separate calls."""
    fire = lif_function(kernel)

    def fire_pair(x: torch.Tensor, weight: torch.Tensor, beta: float, bias: torch.Tensor,
                  residual: torch.Tensor, x8: torch.Tensor | None = None, value: float = 1.0,
                  spikes: bool = False, residual8: torch.Tensor | None = None):
        pair = (kernel == "torch" and native.serves(x.device) and x.dtype == torch.float32
                and residual.dtype == torch.float32)
        if pair and fuses_linear(x, weight) and (x8 is not None or not spikes):
            return linear_lif_pair(x, weight, beta, bias, residual, x8, value, residual8, True)
        currents = linear(x, weight, x8, value, spikes)  # bf16 under autocast
        if pair and currents.dtype == torch.float32:
            return native.lif_pair(currents, beta, bias, residual, True, residual8)
        return fire(residual, beta, residual=fire(currents, beta, bias=bias), bytes=True)

    return fire_pair


def linear_lif_attention_function(kernel: str) -> Callable[..., torch.Tensor]:
    """`fire_attention(x, weight, x8, beta, bias, n_heads, scale, p, training)`: spike attention
    (`c5snn.ops.spike_attention`) of the spikes of `LIF(x @ weightᵀ + bias)`, the fused Q/K/V
    projection (`_project`: `x` may be constant over T, `x8` its uint8 copy). "torch" on the CPU
    runs the LIF and the attention in one compiled operator (`c5snn.native.lif_attention`: the
    spikes go from the LIF to the attention as bits, not as an fp32 tensor), with the projection
    summed inside it where `c5snn.ops.fuses_linear` and the input is spikes with a uint8 copy
    (`c5snn.ops.LinearLIFAttention`: nor do the currents go to memory); the rest makes the
    separate calls."""
    fire = lif_function(kernel)

    def fire_attention(x: torch.Tensor, weight: torch.Tensor, x8: torch.Tensor | None,
                       beta: float, bias: torch.Tensor, n_heads: int, scale: float, p: float,
                       training: bool) -> torch.Tensor:
        native_path = (kernel == "torch" and x.dtype == torch.float32 and native.serves(x.device)
                       and not torch.is_autocast_enabled(x.device.type)
                       and weight.shape[0] // 3 // n_heads <= native.MAX_HEAD)
        if native_path and x8 is not None and fuses_linear(x, weight):
            return linear_lif_attention(x, weight, beta, bias, n_heads, scale, p, training, x8)
        currents = _project(x, weight, x8)
        if native_path and currents.shape[-1] <= native.MAX_QKV:
            return native.lif_attention(currents, beta, bias, n_heads, scale, p, training)
        return spike_attention(fire(currents, beta, bias=bias), n_heads, scale, p, training)

    return fire_attention


def _project(x: torch.Tensor, weight: torch.Tensor, x8: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weightᵀ` for `(T, ...)` input (`c5snn.ops.linear`, on this CPU's faster GEMM), the
    bias left to the LIF that reads it (added in its pass, its gradient summed in its backward's;
    addmm adds it after the same sum too, so the currents are the layer's on the same GEMM
    library); input constant over T (stride 0) is projected once and the result repeated (again
    stride 0). `x8`: spike input's uint8 copy, kept for backward instead of `x`."""
    if x.shape[0] > 1 and x.stride(0) == 0:
        out = linear(x[0], weight)
        return out.unsqueeze(0).expand(x.shape[0], *out.shape)
    return linear(x, weight, x8)


class SpikingBlock(BlockWeights):
    """Spike-form self-attention (no softmax) and a spiking FFN, each LIF with its own membrane."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, beta: float, dropout: float,
                 lif_kernel: str = "torch"):
        super().__init__(d_model, d_ffn)
        self._linear_lif = linear_lif_function(lif_kernel)  # chosen once, not every step
        self._linear_lif_pair = linear_lif_pair_function(lif_kernel)
        self._linear_lif_attention = linear_lif_attention_function(lif_kernel)
        self.n_heads = n_heads
        self.beta = beta
        self.dropout = dropout
        self.scale = (d_model // n_heads) ** -0.5

    def forward(self, x: torch.Tensor, x8: torch.Tensor | None = None):
        """Spikes `(T, B, W, d)` and their uint8 copy (None on the torch paths) from the block
        input `x` `(T, B, W, d)`: the first block's currents (maybe constant over T: stride 0)
        or the previous block's spikes, with their uint8 copy `x8`, which the Q/K/V projection
        keeps for backward and the first residual sum reads, instead of `x` (a quarter of the
        bytes)."""
        # Q, K and V as one GEMM (d -> 3d, K = d) and one LIF: fewer, larger kernels; the
        # weights stay three nn.Linear (the reference's state-dict keys) and are joined here.
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        mixed = self._linear_lif_attention(  # attention of the spikes LIF(q | k | v): (T, B, W, d)
            x, weight, x8, self.beta, bias, self.n_heads, self.scale, self.dropout, self.training)
        r1, r1_bytes = self._linear_lif_pair(  # LIF(x + o), o = LIF(o_proj(mixed)): (T, B, W, d)
            mixed, self.o_proj.weight, self.beta, self.o_proj.bias, x, residual8=x8)
        dropping = self.training and self.dropout > 0
        hidden, hidden_bytes = self._linear_lif(  # (T, B, W, d_ffn): 0 or 1/(1-p)
            r1, self.ffn1.weight, self.beta, self.ffn1.bias, r1_bytes, spikes=True,
            dropout=self.dropout if dropping else 0.0)
        # LIF(r1 + f), f = LIF(ffn2(hidden)): (T, B, W, d) spikes and their uint8 copy
        return self._linear_lif_pair(hidden, self.ffn2.weight, self.beta, self.ffn2.bias, r1,
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
