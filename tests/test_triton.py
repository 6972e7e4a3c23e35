"""The fused Triton LIF (`training.lif_kernel: triton`) against the torch LIF.

On CUDA the check runs on the GPU. Without CUDA it runs the same kernels on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are defined, hence a
subprocess) when the optional `triton` package is installed; otherwise it is skipped: CI
installs no triton (a CUDA-only dependency), and benchmarks/gpu_check.sh runs it on the GPU.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_it_fire

from c5snn.lif import lif_torch as lif
from c5snn.model import SpikingTransformer


def check(device: str) -> None:
    from c5snn.kernels.triton import lif_triton

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(10, 4, 90, 32, generator=gen) * 0.8 + 0.6).to(device).requires_grad_()
    weights = torch.randn(x.shape, generator=gen).to(device)
    ref = lif(x, 0.8)
    (ref * weights).sum().backward()
    ref_grad, x.grad = x.grad, None
    fused = lif_triton(x, 0.8)
    (fused * weights).sum().backward()
    # The GPU compiler may fuse beta*U + X into one FMA: a membrane within an ulp of the
    # threshold may then spike differently, so allow a handful of flips among 1.2M neurons.
    assert 0.2 < ref.mean().item() < 0.8, "the currents must make some, not all, neurons fire"
    assert (fused != ref).float().mean().item() <= 1e-4
    assert ((x.grad - ref_grad).norm() / ref_grad.norm()).item() <= 1e-3

    torch.manual_seed(0)
    kw = dict(d_model=32, n_heads=2, n_layers=2, d_ffn=64, beta=0.8, encoding="rate_coded",
              timesteps=3, dropout=0.0)
    model = make_it_fire(SpikingTransformer(**kw).to(device))
    inp = (torch.rand(4, 20, 39, generator=gen) < 5 / 39).float().to(device)
    out = model(inp)
    fused = SpikingTransformer(**kw, lif_kernel="triton").to(device)
    fused.load_state_dict(model.state_dict())
    out_fused = fused(inp)
    assert ((out_fused - out).norm() / out.norm()).item() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_lif_matches_torch_on_gpu():
    check("cuda")


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="runs on CUDA above; the interpreter needs the triton package")
def test_triton_lif_matches_torch_in_interpreter():
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    done = subprocess.run([sys.executable, "-c", "import test_triton as t; t.check('cpu')"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
