import ctypes.util
import dataclasses
import subprocess
import sys

import pytest
import torch
from helpers import make_it_fire

from c5snn.config import TrainingParams
from c5snn.errors import DeviceError
from c5snn.model import SpikingTransformer
from c5snn.runtime import (
    JEMALLOC_CONF,
    allocator_environments,
    check_device,
    cpu_allocator_env,
    precision,
)

BASE = TrainingParams(epochs=1, learning_rate=1e-3, optimizer="adam", early_stopping_patience=1,
                      early_stopping_metric="val_recall_at_20", batch_size=8)


@pytest.mark.parametrize("option,value,needs", [("precision", "tf32", "tf32 needs a CUDA device"),
                                                ("lif_kernel", "triton", "triton needs a CUDA")])
def test_cuda_only_options_are_refused_on_cpu(option, value, needs):
    with pytest.raises(DeviceError, match=needs):
        check_device(dataclasses.replace(BASE, **{option: value}), "cpu")
    check_device(BASE, "cpu")  # the defaults run anywhere
    check_device(dataclasses.replace(BASE, precision="bf16", compile="default"), "cpu")


def _firing_model():
    torch.manual_seed(0)
    return make_it_fire(SpikingTransformer(d_model=32, n_heads=2, n_layers=2, d_ffn=64, beta=0.8,
                                           encoding="rate_coded", timesteps=3, dropout=0.0))


def test_bf16_runs_matmuls_in_bf16_and_stays_close_to_fp32():
    model = _firing_model()
    x = (torch.rand(6, 20, 39, generator=torch.Generator().manual_seed(1)) < 5 / 39).float()
    cpu = torch.device("cpu")
    with precision("fp32", cpu):
        ref, ref_rates = model(x, return_spike_rates=True)
    with precision("bf16", cpu):
        low, rates = model(x, return_spike_rates=True)
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16  # autocast was on
    assert (ref_rates > 0).all() and not torch.equal(low.float(), ref)
    # bf16 keeps 8 mantissa bits: the logits move by ~1e-2, spike rates by much less.
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.1
    assert (rates - ref_rates).abs().max().item() < 0.02
    low.float().square().sum().backward()  # backward through every custom Function in bf16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_cpu_allocator_env_preloads_jemalloc_once_and_can_be_declined():
    lib = ctypes.util.find_library("jemalloc")
    envs = allocator_environments({"LD_PRELOAD": "x.so", "MALLOC_CONF": "y", "PATH": "/bin"})
    assert envs["glibc"] == {"PATH": "/bin"} and ("jemalloc" in envs) == (lib is not None)
    env = cpu_allocator_env({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"})
    if lib is None:
        assert env is None  # nothing to preload: glibc with tune_cpu_allocator
        return
    assert env["LD_PRELOAD"] == f"{lib} libfoo.so" and env["MALLOC_CONF"] == JEMALLOC_CONF
    assert cpu_allocator_env(env) is None  # already preloaded: no second restart
    assert cpu_allocator_env({"C5SNN_MALLOC": "glibc"}) is None
    probe = "import c5snn.runtime as r; print(r.allocator())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "jemalloc"


def test_environment_faults_are_the_machines_and_the_rest_the_trials():
    import errno

    from c5snn.errors import DataError
    from c5snn.runtime import environment_fault

    machine = [OSError(errno.ENOSPC, "No space left on device"), PermissionError("denied"),
               DataError("x.csv: no such file"), DeviceError("--device cuda:0: no usable CUDA"),
               RuntimeError("CUDA error: an illegal memory access was encountered"),
               AssertionError("Torch not compiled with CUDA enabled")]
    trial = [RuntimeError("CUDA error: out of memory"), torch.cuda.OutOfMemoryError("oom"),
             ValueError("nan"), RuntimeError("mat1 and mat2 shapes cannot be multiplied")]
    assert all(environment_fault(e) for e in machine)
    assert not any(environment_fault(e) for e in trial)


DENORMALS = """
import torch
{setup}
x = torch.full((1 << 22,), 1e-39)  # denormal fp32; the multiply below runs on 2 threads
print(int((x * 1.5).count_nonzero()))
"""


@pytest.mark.parametrize("setup, nonzero", [
    ("from c5snn.runtime import configure_threads; configure_threads(2)", 0),
    ("torch.set_num_threads(2)", 1 << 22),  # what the check would see without it
])
def test_configure_threads_flushes_denormals_in_every_torch_thread(setup, nonzero):
    out = subprocess.run([sys.executable, "-c", DENORMALS.format(setup=setup)],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) == nonzero
