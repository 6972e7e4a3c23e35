"""The reference SpikingTransformer: step by step in time, one `snntorch.Leaky` per LIF.

`training.lif_kernel: snntorch` trains this model. It is the straightforward reading of DESIGN §2
in snntorch (a Python loop over T, every LIF its own `Leaky` with its own membrane), several
times slower than the fast path (`c5snn.model`, layer by layer over all T) but the semantics'
source of truth: the tests check the fast path's outputs and gradients against it, and a user
can re-run a result with it. Parameter names and state-dict keys equal the fast path's, so the
same weights load into either.

Dropout is `nn.Dropout` (another random stream than the fast path's uint8 masks), and rate
coding draws real Bernoulli samples each step, so training runs of the two backends differ in
their random draws; with dropout off (eval) the same weights give the same logits.
"""

from __future__ import annotations

import snntorch as snn
import torch
from snntorch import surrogate
from torch import nn

from c5snn.data import N_PARTS
from c5snn.neuron import NEURON

LIF_NAMES = ("q", "k", "v", "o", "r1", "f1", "f2", "y")


def _leaky(beta: float) -> snn.Leaky:
    """snntorch's Leaky as `c5snn.neuron.NEURON` defines it, with its constant buffers kept out
    of the state dict, so checkpoints match the fast path's keys."""
    neuron = snn.Leaky(beta=beta, threshold=NEURON.threshold, reset_mechanism=NEURON.reset,
                       spike_grad=getattr(surrogate, NEURON.surrogate)(slope=NEURON.slope))
    for name, buffer in list(neuron.named_buffers(recurse=False)):
        neuron.register_buffer(name, buffer, persistent=False)
    return neuron


class BlockWeights(nn.Module):
    """The learned maps of one block, declared once for both implementations (their state-dict
    keys must be equal): q, k, v, o projections d -> d and the FFN d -> d_ffn -> d."""

    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.ffn1 = nn.Linear(d_model, d_ffn)
        self.ffn2 = nn.Linear(d_ffn, d_model)


class ReferenceBlock(BlockWeights):
    def __init__(self, d_model: int, n_heads: int, d_ffn: int, beta: float, dropout: float):
        super().__init__(d_model, d_ffn)
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.lifs = nn.ModuleDict({n: _leaky(beta) for n in LIF_NAMES})
        self.drop = nn.Dropout(dropout)

    def init_state(self) -> dict[str, torch.Tensor]:
        """Every LIF's membrane, zero at the start of each forward."""
        return {n: lif.reset_mem() for n, lif in self.lifs.items()}

    def step(self, x: torch.Tensor, mem: dict[str, torch.Tensor]) -> torch.Tensor:
        """One time step on `(B, W, d)`; `mem` maps LIF name -> membrane, updated in place."""
        b, w, d = x.shape

        def fire(name, current):
            spk, mem[name] = self.lifs[name](current, mem[name])
            return spk

        def heads(t):  # (B, W, d) -> (B, h, W, d/h)
            return t.view(b, w, self.n_heads, self.head_dim).transpose(1, 2)

        q = heads(fire("q", self.q_proj(x)))
        k = heads(fire("k", self.k_proj(x)))
        v = heads(fire("v", self.v_proj(x)))
        attn = self.drop((q @ k.transpose(-2, -1)) * self.head_dim**-0.5)  # (B, h, W, W), no softmax
        mixed = (attn @ v).transpose(1, 2).reshape(b, w, d)
        o = fire("o", self.o_proj(mixed))
        r1 = fire("r1", x + o)
        f = fire("f2", self.ffn2(self.drop(fire("f1", self.ffn1(r1)))))
        return fire("y", r1 + f)  # (B, W, d) spikes


class ReferenceSpikingTransformer(nn.Module):
    """Multi-hot windows `(B, W, 39)` -> part logits `(B, 39)`, one time step at a time."""

    def __init__(self, *, d_model: int, n_heads: int, n_layers: int, d_ffn: int, beta: float,
                 encoding: str, timesteps: int = 10, dropout: float = 0.1,
                 max_window_size: int = 100):
        super().__init__()
        self.encoding = encoding
        self.timesteps = 1 if encoding == "direct" else timesteps
        self.max_window_size = max_window_size
        self.input_proj = nn.Linear(N_PARTS, d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, max_window_size, d_model))
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            ReferenceBlock(d_model, n_heads, d_ffn, beta, dropout) for _ in range(n_layers)
        )
        self.readout = nn.Linear(d_model, N_PARTS)

    def forward(self, x: torch.Tensor, return_spike_rates: bool = False):
        """Logits `(B, 39)`; with `return_spike_rates`, also each block's mean firing rate `(L,)`."""
        if x.shape[1] > self.max_window_size:
            raise ValueError(f"window {x.shape[1]} exceeds max_window_size {self.max_window_size}")
        w = x.shape[1]
        mems = [block.init_state() for block in self.blocks]
        fired = [x.new_zeros(()) for _ in self.blocks]  # spikes per block, summed over steps
        outputs = []
        for _ in range(self.timesteps):
            inp = x if self.encoding == "direct" else torch.bernoulli(x)
            h = self.input_proj(inp) + self.pos_embedding[:, :w]  # (B, W, d)
            for i, (block, mem) in enumerate(zip(self.blocks, mems, strict=True)):
                h = block.step(h, mem)
                if return_spike_rates:  # only when asked: it is not free at every step
                    fired[i] = fired[i] + h.detach().mean()
            outputs.append(h)
        logits = self.readout(torch.stack(outputs).mean(0).mean(1))  # mean over T, then W
        if return_spike_rates:
            return logits, torch.stack(fired) / self.timesteps if fired else torch.zeros(0)
        return logits
