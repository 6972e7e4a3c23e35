"""The straightforward step-by-step SpikingTransformer, built from `snntorch.Leaky`.

It is the reference the fast model (`c5snn.model`) is checked against, and the baseline the
benchmarks measure. Parameter names match `SpikingTransformer`, so state dicts load both ways.
"""

from __future__ import annotations

import snntorch as snn
import torch
from snntorch import surrogate
from torch import nn


@torch.no_grad()
def make_it_fire(model: nn.Module) -> nn.Module:
    """Double every weight and add 1 to every bias, so that every block of a freshly built net
    spikes: a silent net (spike rate 0, logits = readout bias) would make any comparison pass."""
    for name, p in model.named_parameters():
        p.mul_(2.0)
        if name.endswith("bias"):
            p.add_(1.0)
    return model


def _leaky(beta: float) -> snn.Leaky:
    return snn.Leaky(beta=beta, spike_grad=surrogate.fast_sigmoid(slope=25))


class OracleBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ffn, beta, dropout):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.ffn1 = nn.Linear(d_model, d_ffn)
        self.ffn2 = nn.Linear(d_ffn, d_model)
        self.lifs = nn.ModuleDict(
            {n: _leaky(beta) for n in ("q", "k", "v", "o", "r1", "f1", "f2", "y")}
        )
        self.drop = nn.Dropout(dropout)

    def init_state(self):
        return {n: lif.reset_mem() for n, lif in self.lifs.items()}

    def step(self, x, mem):
        """One time step on `(B, W, d)`; `mem` maps LIF name -> membrane, updated in place."""
        b, w, d = x.shape

        def fire(name, current):
            spk, mem[name] = self.lifs[name](current, mem[name])
            return spk

        def heads(t):
            return t.view(b, w, self.n_heads, self.head_dim).transpose(1, 2)

        q = heads(fire("q", self.q_proj(x)))
        k = heads(fire("k", self.k_proj(x)))
        v = heads(fire("v", self.v_proj(x)))
        attn = self.drop((q @ k.transpose(-2, -1)) * self.head_dim**-0.5)
        mixed = (attn @ v).transpose(1, 2).reshape(b, w, d)
        o = fire("o", self.o_proj(mixed))
        r1 = fire("r1", x + o)
        f = fire("f2", self.ffn2(self.drop(fire("f1", self.ffn1(r1)))))
        return fire("y", r1 + f)


class OracleSpikingTransformer(nn.Module):
    def __init__(self, *, d_model, n_heads, n_layers, d_ffn, beta, encoding, timesteps=10,
                 dropout=0.1, max_window_size=100):
        super().__init__()
        self.encoding = encoding
        self.timesteps = 1 if encoding == "direct" else timesteps
        self.input_proj = nn.Linear(39, d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, max_window_size, d_model))
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            OracleBlock(d_model, n_heads, d_ffn, beta, dropout) for _ in range(n_layers)
        )
        self.readout = nn.Linear(d_model, 39)

    def forward(self, x):
        w = x.shape[1]
        mems = [block.init_state() for block in self.blocks]
        outputs = []
        for _ in range(self.timesteps):
            inp = x if self.encoding == "direct" else torch.bernoulli(x)
            h = self.input_proj(inp) + self.pos_embedding[:, :w]
            for block, mem in zip(self.blocks, mems, strict=True):
                h = block.step(h, mem)
            outputs.append(h)
        return self.readout(torch.stack(outputs).mean(0).mean(1))
