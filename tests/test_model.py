import pytest
import torch
from helpers import make_it_fire

from c5snn import native
from c5snn.config import ModelParams
from c5snn.model import SpikingTransformer, build_model, count_parameters
from c5snn.ops import linear
from c5snn.reference import ReferenceSpikingTransformer


def _pair(encoding, n_layers, d_model=64, n_heads=2):
    kw = dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ffn=2 * d_model, beta=0.8,
              encoding=encoding, timesteps=4, dropout=0.0)
    torch.manual_seed(0)
    fast = make_it_fire(SpikingTransformer(**kw))
    oracle = ReferenceSpikingTransformer(**kw)
    oracle.load_state_dict(fast.state_dict())  # the same state-dict keys, loaded strictly
    return fast.train(), oracle.train()


@pytest.mark.parametrize("kernels", ["native", "native-onednn", "torch"])
@pytest.mark.parametrize("encoding", ["direct", "rate_coded"])
@pytest.mark.parametrize("n_layers", [2, 6])
def test_fast_model_matches_snntorch_oracle(encoding, n_layers, kernels, monkeypatch):
    """Every CPU path of the fast model against the oracle on the same GEMM library: the
    compiled operators with torch's mm (MKL; the choice on Intel CPUs) or with oneDNN (the
    choice elsewhere; the oracle's nn.Linear layers then run on oneDNN too, since two libraries
    may round a sum differently and a spike at the threshold would flip), and the torch
    fallback."""
    if kernels != "torch" and not native.available():
        pytest.skip("no C++ compiler on this machine")
    if kernels == "native-onednn" and not torch.ops.c5snn.onednn_available():
        pytest.skip("this build of torch carries no oneDNN")
    if kernels == "torch":
        monkeypatch.setattr(native, "available", lambda: False)
    onednn = kernels == "native-onednn"
    monkeypatch.setattr(native, "gemm_library", lambda: "onednn" if onednn else "torch")
    calls = []
    monkeypatch.setattr(native, "gemm", lambda a, b: calls.append(1) or torch.ops.c5snn.gemm(a, b))
    monkeypatch.setattr(native, "weight_grad",
                        lambda g, x, s=1.0: calls.append(2) or torch.ops.c5snn.weight_grad(g, x, s))
    for name in ("linear_lif_forward", "linear_lif_pair_forward",  # the fused linear maps
                 "linear_lif_attention_forward"):
        op = getattr(torch.ops.c5snn, name)
        monkeypatch.setattr(native, name, lambda *a, op=op: calls.append(3) or op(*a))
    if onednn:  # the oracle's layers: the GEMM on oneDNN, then the bias (as addmm adds it)
        monkeypatch.setattr(torch.nn.functional, "linear",
                            lambda x, w, b=None: linear(x, w) if b is None else linear(x, w) + b)
    fast, oracle = _pair(encoding, n_layers)
    x = (torch.rand(6, 20, 39, generator=torch.Generator().manual_seed(1)) < 5 / 39).float()
    out_fast, rates = fast(x, return_spike_rates=True)
    out_oracle = oracle(x)
    assert (rates > 0).all(), f"some block never fired: {rates}"
    # bitwise on the machines measured; 1e-6 leaves BLAS its choice of summation order
    assert (out_fast - out_oracle).norm() / out_oracle.norm() <= 1e-6
    out_fast.square().sum().backward()
    out_oracle.square().sum().backward()
    oracle_params = dict(oracle.named_parameters())
    for name, p in fast.named_parameters():
        ref = oracle_params[name].grad
        assert ref.norm() > 0, name
        assert (p.grad - ref).norm() / ref.norm() <= 1e-4, name  # relative error, L2
    # oneDNN when chosen, with c5snn's dL/dW: at least every block's four linear maps each way
    # (forward, dL/dx, dL/dW); the oracle's layers add theirs. A block's four forward maps are
    # summed inside their LIF's operator, but for the first block's Q/K/V (input constant over
    # T, projected once).
    assert len(calls) >= 12 * n_layers if onednn else not calls
    assert calls.count(2) >= 4 * n_layers if onednn else not calls
    assert calls.count(3) == (4 * n_layers - 1 if onednn and native.fused_linear() else 0)


def test_fused_linear_maps_count_the_flops_of_the_gemms_they_replace(monkeypatch):
    """The efficiency benchmarks divide the FLOPs `torch.utils.flop_counter` counts in a fast
    training step by its time: summing a linear map inside its LIF's operator must count the
    product it replaces, so a step counts the same with or without the fused operators."""
    from torch.utils.flop_counter import FlopCounterMode

    if not (native.available() and torch.ops.c5snn.onednn_available() and native.fused_linear()):
        pytest.skip("no compiled operators, oneDNN or FMA here")
    monkeypatch.setattr(native, "gemm_library", lambda: "onednn")
    fast, _ = _pair("rate_coded", 2)
    x = (torch.rand(3, 20, 39, generator=torch.Generator().manual_seed(1)) < 5 / 39).float()
    counted, fused = [], []
    for fuse in (True, False):
        monkeypatch.setattr(native, "fused_linear", lambda fuse=fuse: fuse)
        monkeypatch.setattr(native, "linear_lif_pair_forward",
                            lambda *a: fused.append(1) or torch.ops.c5snn.linear_lif_pair_forward(*a))
        with FlopCounterMode(display=False) as counter:
            fast(x).square().sum().backward()
        counted.append(counter.get_total_flops())
    assert len(fused) == 2 * 2  # both pairs of both blocks, in the first pass only
    assert counted[0] == counted[1] > 0


def test_parameter_count_fingerprint():
    model = SpikingTransformer(d_model=128, n_heads=4, n_layers=2, d_ffn=256, beta=0.5,
                               encoding="direct")
    assert count_parameters(model) == 286_887


def test_rate_coding_bernoulli_path_equals_repeat_on_binary_input():
    torch.manual_seed(0)
    kw = dict(d_model=64, n_heads=2, n_layers=2, d_ffn=128, beta=0.8, encoding="rate_coded",
              timesteps=5, dropout=0.0)
    fast = SpikingTransformer(**kw).eval()
    sampled = SpikingTransformer(**kw, binary_input=False).eval()
    sampled.load_state_dict(fast.state_dict())
    x = (torch.rand(4, 15, 39) < 0.2).float()
    assert torch.equal(fast(x), sampled(x))
    # on non-binary input the Bernoulli path really samples: two calls differ
    soft = torch.rand(4, 15, 39)
    assert not torch.equal(sampled(soft), sampled(soft))


def test_invariants_fail_with_messages():
    with pytest.raises(ValueError, match="divide"):
        SpikingTransformer(d_model=64, n_heads=3, n_layers=1, d_ffn=128, beta=0.5,
                           encoding="direct")
    model = SpikingTransformer(d_model=8, n_heads=2, n_layers=1, d_ffn=16, beta=0.5,
                               encoding="direct", max_window_size=10)
    with pytest.raises(ValueError, match="max_window_size"):
        model(torch.zeros(1, 11, 39))


def test_snntorch_backend_is_the_reference_with_the_fast_paths_weights():
    """`training.lif_kernel: snntorch` builds the step-by-step model; its checkpoints load into
    the fast path and back, and on the same weights the two give the same logits and rates."""
    params = ModelParams(d_model=64, n_heads=4, n_layers=2, d_ffn=128, beta=0.95,
                         encoding="rate_coded", timesteps=5, dropout=0.1, max_window_size=100)
    torch.manual_seed(0)
    reference = build_model(params, lif_kernel="snntorch")
    assert isinstance(reference, ReferenceSpikingTransformer)
    make_it_fire(reference)
    fast = build_model(params)
    assert isinstance(fast, SpikingTransformer)
    assert set(fast.state_dict()) == set(reference.state_dict())
    fast.load_state_dict(reference.state_dict())
    x = (torch.rand(4, 30, 39, generator=torch.Generator().manual_seed(2)) < 5 / 39).float()
    with torch.no_grad():
        ref_logits, ref_rates = reference.eval()(x, return_spike_rates=True)
        logits, rates = fast.eval()(x, return_spike_rates=True)
    assert (ref_rates > 0).all()
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-5)
    assert torch.allclose(rates, ref_rates, atol=1e-6)
