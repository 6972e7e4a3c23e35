"""Test helpers shared by tests and benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
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


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block, the previous one restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_backend(monkeypatch, **changes) -> None:
    """For one test, this process's backend record (`c5snn.kernels.backend`) with `changes`
    (`compiled`, `gemm`, `fused_linear`): the model's routes and the GEMMs read it."""
    import dataclasses

    from c5snn import kernels
    from c5snn.kernels import record

    fake = dataclasses.replace(kernels.backend(), **changes)
    for module in (kernels, record):
        monkeypatch.setattr(module, "backend", lambda: fake)
