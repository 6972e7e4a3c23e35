import pytest
import torch
from helpers import make_it_fire, use_backend

from c5snn import kernels, ops
from c5snn.config import ModelParams
from c5snn.kernels import functions
from c5snn.model import SpikingTransformer, build_model, count_parameters
from c5snn.reference import ReferenceSpikingTransformer

# The CPU paths of the fast model, as the backend record sets them: the compiled operators with
# each linear map summed inside its LIF operator (oneDNN's order), the compiled operators with
# the GEMMs apart on oneDNN or on torch's mm (MKL), and the torch ops alone.
PATHS = {"fused": dict(gemm="onednn", fused_linear=True),
         "compiled-onednn": dict(gemm="onednn", fused_linear=False),
         "compiled-mkl": dict(gemm="torch", fused_linear=False),
         "torch": dict(compiled=False, gemm="torch", fused_linear=False)}
MODELS = [  # d_model, n_heads, n_layers, encoding, dropout
    (64, 2, 2, "direct", 0.0), (64, 2, 6, "rate_coded", 0.0), (128, 4, 2, "rate_coded", 0.0),
    (64, 2, 2, "rate_coded", 0.1), (128, 4, 6, "rate_coded", 0.1)]


def _pair(d_model, n_heads, n_layers, encoding, dropout):
    kw = dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ffn=2 * d_model, beta=0.8,
              encoding=encoding, timesteps=4, dropout=dropout)
    torch.manual_seed(0)
    fast = make_it_fire(SpikingTransformer(**kw))
    oracle = ReferenceSpikingTransformer(**kw)
    oracle.load_state_dict(fast.state_dict())  # the same state-dict keys, loaded strictly
    return fast.train(), oracle.train()


class _DropScores(torch.autograd.Function):
    """Attention scores `x` = counts * scale dropped as the fast path drops them: counts
    (recovered exactly) times the mask times `alpha` = scale / (1 - p), rounded once; backward
    as dropout's, keep * alpha / scale."""

    @staticmethod
    def forward(ctx, x, keep, scale: float, alpha: float):
        ctx.save_for_backward(keep)
        ctx.factor = alpha / scale
        return (torch.round(x / scale) * keep) * alpha

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.factor, None, None, None


class Replay(torch.nn.Module):
    """A reference block's dropout with the fast path's masks: its calls alternate attention
    scores (B, h, W, W) and FFN hidden spikes (B, W, d_ffn), one pair per time step; `masks`
    holds the block's two whole masks, (h, T * B, W, W) and (T, B, W, d_ffn). The scores are
    dropped as the fast path drops them: counts (q @ kᵀ, recovered exactly from the scaled
    scores) times the mask times scale / (1 - p), rounded once (`_DropScores`)."""

    def __init__(self, masks, batch: int, scale: float, p: float):
        super().__init__()
        self.masks, self.batch, self.scale, self.p, self.calls = masks, batch, scale, p, 0

    def forward(self, x):
        t, kind = divmod(self.calls, 2)
        self.calls += 1
        if kind == 0:
            keep = self.masks[0][:, t * self.batch:(t + 1) * self.batch].transpose(0, 1)
            return _DropScores.apply(x, keep.float(), self.scale, self.scale / (1 - self.p))
        return self.masks[1][t].float() * (1 / (1 - self.p)) * x


def _masks(draws, shapes, threshold):
    """The fast path's dropout masks, block by block (attention's, the FFN's): the masks the
    torch route drew, or those the compiled operators drew from the seeds they were given."""
    return [d if isinstance(d, torch.Tensor) else torch.ops.c5snn.keep_mask(list(s), d, threshold)
            for d, s in zip(draws, shapes, strict=True)]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("model", MODELS, ids=lambda m: "d{}_h{}_l{}_{}_p{}".format(*m))
def test_fast_model_matches_snntorch_oracle(model, path, monkeypatch):
    """Every CPU path of the fast model against the oracle on the same weights and the same
    GEMM library (the oracle's nn.Linear layers run on oneDNN where the path's GEMMs do: two
    libraries may round a sum differently and a spike at the threshold would flip), with
    dropout off and on (the oracle then replays the fast path's masks): logits bitwise on the
    machines measured, gradients to rounding."""
    if path != "torch" and not kernels.backend().compiled:
        pytest.skip("no C++ compiler on this machine")
    if PATHS[path].get("gemm") == "onednn" and not torch.ops.c5snn.onednn_available():
        pytest.skip("this build of torch carries no oneDNN")
    if path == "fused" and not torch.ops.c5snn.fused_linear_available():
        pytest.skip("no FMA in this build: the fused operators are not used")
    use_backend(monkeypatch, **PATHS[path])
    d_model, n_heads, n_layers, encoding, dropout = model
    calls = []
    for name in ("gemm", "weight_grad", "linear_lif_forward", "linear_lif_pair_forward",
                 "linear_lif_attention_forward"):
        op = getattr(torch.ops.c5snn, name)
        monkeypatch.setattr(torch.ops.c5snn, name, lambda *a, op=op, name=name:
                            calls.append(name) or op(*a))
    draws = []  # the dropout masks (torch route) or seeds (compiled operators), in order
    monkeypatch.setattr(functions, "draw_seed", lambda real=functions.draw_seed:
                        draws.append(real()) or draws[-1])
    monkeypatch.setattr(ops, "keep_mask", lambda *a, real=ops.keep_mask:
                        draws.append(real(*a)) or draws[-1])
    if PATHS[path]["gemm"] == "onednn":  # the oracle's layers: the GEMM on oneDNN, then the bias
        monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None:
                            kernels.linear(x, w) if b is None else kernels.linear(x, w) + b)
    fast, oracle = _pair(*model)
    x = (torch.rand(6, 20, 39, generator=torch.Generator().manual_seed(1)) < 5 / 39).float()
    out_fast, rates = fast(x, return_spike_rates=True)
    if dropout:
        t, w = fast.timesteps, x.shape[1]
        shapes = [s for _ in range(n_layers) for s in ((n_heads, t * 6, w, w),
                                                       (t, 6, w, 2 * d_model))]
        masks = _masks(draws, shapes, functions.keep_threshold(dropout))
        assert all(0 < m.float().mean() < 1 for m in masks)
        for i, block in enumerate(oracle.blocks):
            block.drop = Replay(masks[2 * i:2 * i + 2], 6, (d_model // n_heads) ** -0.5, dropout)
    out_oracle = oracle(x)
    assert (rates > 0).all(), f"some block never fired: {rates}"
    assert (out_fast - out_oracle).norm() / out_oracle.norm() <= 1e-6
    out_fast.square().sum().backward()
    out_oracle.square().sum().backward()
    oracle_params = dict(oracle.named_parameters())
    for name, p in fast.named_parameters():
        ref = oracle_params[name].grad
        assert ref.norm() > 0, name
        assert (p.grad - ref).norm() / ref.norm() <= 1e-4, name  # relative error, L2
    # oneDNN where chosen, with c5snn's dL/dW; a block's four forward maps summed inside their
    # LIF's operator on the fused path, but for the first block's Q/K/V (input constant over T)
    fused = sum(c.startswith("linear_lif") for c in calls)
    assert fused == (4 * n_layers - 1 if path == "fused" else 0)
    assert ("weight_grad" in calls) == (PATHS[path]["gemm"] == "onednn")
    assert ("gemm" in calls) == (PATHS[path]["gemm"] == "onednn")


def test_fused_linear_maps_count_the_flops_of_the_gemms_they_replace(monkeypatch):
    """The efficiency benchmarks divide the FLOPs `torch.utils.flop_counter` counts in a fast
    training step by its time: summing a linear map inside its LIF's operator must count the
    product it replaces, so a step counts the same with or without the fused operators."""
    from torch.utils.flop_counter import FlopCounterMode

    if not (kernels.backend().compiled and torch.ops.c5snn.onednn_available()
            and torch.ops.c5snn.fused_linear_available()):
        pytest.skip("no compiled operators, oneDNN or FMA here")
    fast, _ = _pair(64, 2, 2, "rate_coded", 0.0)
    x = (torch.rand(3, 20, 39, generator=torch.Generator().manual_seed(1)) < 5 / 39).float()
    counted, fused = [], []
    monkeypatch.setattr(kernels, "linear_lif_pair", lambda *a, real=kernels.linear_lif_pair, **k:
                        fused.append(1) or real(*a, **k))
    for fuse in (True, False):
        use_backend(monkeypatch, gemm="onednn", fused_linear=fuse)
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
    fast = make_it_fire(SpikingTransformer(**kw)).eval()  # a silent net outputs its bias alone
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
