"""The compiled CPU operators (c5snn/kernels) against the torch paths they replace, the neuron
they share with Python, the backend record, and the fallback when they cannot be built."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torch_threads, use_backend

from c5snn import kernels
from c5snn.kernels import build, linear, linear_lif, linear_lif_attention, linear_lif_pair
from c5snn.lif import lif_torch
from c5snn.ops import SpikeAttention, dropout_spikes, keep_mask

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not kernels.backend().compiled,
                                reason="no C++ compiler on this machine")


def _currents(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 1.5 + 0.3  # (T, ...), many spikes and many not


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(10, 4, 9, 16), (1, 3, 700), (7, 1001)])
def test_lif_spikes_are_bitwise_the_torch_recurrence_and_gradients_agree(shape, residual):
    x = _currents(*shape).requires_grad_()
    r = _currents(*shape, seed=1).requires_grad_() if residual else None
    x_ref = x.detach().clone().requires_grad_()
    r_ref = r.detach().clone().requires_grad_() if residual else None
    spikes = kernels.lif(x, 0.8, r)
    expected = lif_torch(x_ref + r_ref if residual else x_ref, 0.8)
    assert 0 < spikes.mean() < 1
    assert torch.equal(spikes, expected)
    w = _currents(*shape, seed=2)
    (spikes * w).sum().backward()
    (expected * w).sum().backward()
    for got, ref in [(x, x_ref)] + ([(r, r_ref)] if residual else []):
        assert (got.grad - ref.grad).norm() <= 1e-6 * ref.grad.norm()


def test_lif_reads_time_constant_and_strided_input_as_the_torch_path_does():
    base = _currents(1, 5, 8, 6)
    constant = base.expand(10, 5, 8, 6)  # T-stride 0: the first block's input
    assert torch.equal(kernels.lif(constant, 0.5), lif_torch(constant.contiguous(), 0.5))
    strided = _currents(10, 5, 8, 12)[..., ::2]  # neurons not contiguous: copied first
    assert torch.equal(kernels.lif(strided, 0.5), lif_torch(strided.contiguous(), 0.5))
    assert kernels.lif(torch.empty(0, 3), 0.5).shape == (0, 3)


def test_lif_without_grad_keeps_no_membranes():
    x = _currents(6, 50)
    no_dropout = (False, 0, 0, 1.0)
    spikes, mem, bytes_ = torch.ops.c5snn.lif_forward(x, None, None, 0.9, False, *no_dropout,
                                                      False)
    assert torch.equal(spikes, lif_torch(x, 0.9)) and mem is None and bytes_ is None
    _, mem, _ = torch.ops.c5snn.lif_forward(x, None, None, 0.9, True, *no_dropout, False)
    assert mem.shape == x.shape


def test_operators_keep_state_only_where_autograd_records_them(monkeypatch):
    """A validation pass (`torch.no_grad()` on parameters that require grad) keeps no
    membranes: inside an autograd Function, `ctx.needs_input_grad` would still say True."""
    calls = []
    position = {"lif_forward": 4, "lif_pair_forward": 4, "lif_attention_forward": 3,
                "linear_lif_forward": 6, "linear_lif_pair_forward": 8,
                "linear_lif_attention_forward": 6}  # of `keep`
    for name in position:
        op = getattr(torch.ops.c5snn, name)
        monkeypatch.setattr(torch.ops.c5snn, name,
                            lambda *a, op=op, name=name: calls.append((name, a)) or op(*a))
    x = _currents(3, 2, 10, 24).requires_grad_()
    bias = _currents(24, seed=1).requires_grad_()
    weight = _currents(32, 24, seed=2).requires_grad_()
    for grad in (True, False):
        calls.clear()
        with torch.set_grad_enabled(grad):
            kernels.lif(x, 0.8, bias=bias)
            kernels.lif_pair(x, 0.8, bias, x.detach())
            kernels.lif_attention(x, 0.8, bias, 2, 0.5, 0.0, False)
            linear_lif(x, weight, 0.8, bias[:16].repeat(2))
            linear_lif_pair(x, weight, 0.8, bias[:16].repeat(2), x.detach()[..., :16].repeat(
                1, 1, 1, 2))
            linear_lif_attention(x, torch.cat([weight, weight[:16]]), 0.8, bias.repeat(2), 2,
                                 0.5, 0.0, False)  # d = 16
        keeps = [a[position[n]] for n, a in calls]  # each operator's `keep` argument
        assert keeps == [grad] * 6, calls


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lif_writes_the_uint8_copy_a_linear_layer_keeps_in_the_same_pass(dropout):
    x = _currents(6, 7, 130).requires_grad_()
    torch.manual_seed(1)
    spikes, spikes8 = kernels.lif(x, 0.8, dropout=dropout, bytes=True)
    torch.manual_seed(1)
    assert torch.equal(spikes, kernels.lif(x, 0.8, dropout=dropout))
    assert spikes8.dtype == torch.uint8 and torch.equal(spikes8, (spikes != 0).to(torch.uint8))
    assert not spikes8.requires_grad and 0 < spikes8.float().mean() < 1
    spikes.sum().backward()  # the uint8 copy takes no gradient
    assert x.grad is not None


@pytest.mark.parametrize("constant", [False, True])
@pytest.mark.parametrize("shape", [(10, 4, 9, 16), (3, 5, 90, 192), (7, 3, 1001)])
def test_lif_adds_a_bias_in_its_pass_and_sums_its_gradient(shape, constant):
    """A linear layer's bias, added by the LIF that reads the layer (its columns repeat across
    chunks of 256 neurons that do not align with them), and dL/dbias summed in its backward."""
    x = _currents(1 if constant else shape[0], *shape[1:])
    x = (x.expand(*shape) if constant else x).requires_grad_()  # T-stride 0: the first block
    bias = _currents(shape[-1], seed=5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    spikes = kernels.lif(x, 0.8, bias=bias)
    expected = lif_torch(x_ref + bias_ref, 0.8)
    assert torch.equal(spikes, expected) and 0 < spikes.mean() < 1
    w = _currents(*shape, seed=2)
    (spikes * w).sum().backward()
    (expected * w).sum().backward()
    assert (x.grad - x_ref.grad).norm() <= 1e-6 * x_ref.grad.norm()
    assert (bias.grad - bias_ref.grad).norm() <= 1e-5 * bias_ref.grad.norm()


@pytest.mark.parametrize("constant", [False, True])
@pytest.mark.parametrize("shape", [(10, 4, 9, 16), (3, 5, 90, 64), (7, 3, 1001), (1, 2, 30)])
def test_lif_pair_is_the_two_lifs_it_fuses(shape, constant):
    """`LIF(r + LIF(x + bias))` in one pass each way: the spikes and their uint8 copy bitwise
    the two LIF calls', the gradients to x, bias and r the same to rounding; r may be constant
    over T (the first block's input)."""
    x = _currents(*shape).requires_grad_()
    bias = _currents(shape[-1], seed=5).requires_grad_()
    r = _currents(1 if constant else shape[0], *shape[1:], seed=6)
    r = (r.expand(*shape) if constant else r).requires_grad_()
    refs = [t.detach().clone().requires_grad_() for t in (x, bias, r)]
    spikes, spikes8 = kernels.lif_pair(x, 0.8, bias, r, bytes=True)
    inner = kernels.lif(refs[0], 0.8, bias=refs[1])
    expected = kernels.lif(refs[2], 0.8, residual=inner)
    assert torch.equal(spikes, expected) and 0 < spikes.mean() < 1 and 0 < inner.mean() < 1
    assert torch.equal(spikes8, (expected != 0).to(torch.uint8))
    w = _currents(*shape, seed=2)
    (spikes * w).sum().backward()
    (expected * w).sum().backward()
    for got, ref in zip((x, bias, r), refs, strict=True):
        assert ref.grad.norm() > 0
        assert (got.grad - ref.grad).norm() <= 1e-6 * ref.grad.norm()
    assert torch.equal(kernels.lif_pair(x.detach(), 0.8, bias.detach(), r.detach()), spikes)


@pytest.mark.parametrize("constant", [False, True])
def test_lif_pair_reads_a_spike_residual_from_its_uint8_copy(constant):
    """A residual of spikes (a block's input, r1) may come as its uint8 copy, read in its place:
    the same spikes, bytes and membranes bitwise, and the residual's gradient still reaches it."""
    shape = (6, 3, 90, 64)
    x = _currents(*shape)
    bias = _currents(shape[-1], seed=5)
    r = (_currents(1 if constant else shape[0], *shape[1:], seed=6) > 0.5).float()
    r8 = r.to(torch.uint8).expand(*shape)  # constant over T: stride 0, as the first block's
    r = r.expand(*shape)
    plain = torch.ops.c5snn.lif_pair_forward(x, bias, r, 0.8, True, True, None)
    # given the copy, the fp32 residual is not read: zeros in its place change nothing
    read8 = torch.ops.c5snn.lif_pair_forward(x, bias, torch.zeros(shape), 0.8, True, True, r8)
    assert 0 < plain[0].mean() < 1 and r8.sum() > 0
    for got, expected in zip(read8, plain, strict=True):
        assert torch.equal(got, expected)
    residual = r.clone().requires_grad_()
    spikes, _ = kernels.lif_pair(x, 0.8, bias, residual, bytes=True, residual8=r8)
    assert torch.equal(spikes, plain[0])
    spikes.sum().backward()
    assert residual.grad.norm() > 0


@pytest.mark.parametrize("shape", [(10, 4, 9, 16), (7, 1001), (3, 5, 90, 128)])
def test_lif_with_dropout_in_its_pass_is_dropout_of_the_lif_with_the_same_mask(shape):
    """The FFN's hidden spikes: LIF and dropout in one pass must equal LIF, then dropout with
    keep_mask's mask at the same seed (element numbering across chunks, steps and words), and
    give the same gradient."""
    x = _currents(*shape).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    bias = _currents(shape[-1], seed=5)  # and the layer's bias, as the FFN has
    torch.manual_seed(4)
    dropped = kernels.lif(x, 0.8, dropout=0.3, bias=bias)
    torch.manual_seed(4)
    expected = dropout_spikes(lif_torch(x_ref + bias, 0.8), 0.3, training=True)
    assert torch.equal(dropped, expected)
    assert dropped.unique().tolist() == [0.0, torch.tensor(1 / 0.7).item()]  # fp32 1/(1-p)
    w = _currents(*shape, seed=2)
    (dropped * w).sum().backward()
    (expected * w).sum().backward()
    assert (x.grad - x_ref.grad).norm() <= 1e-6 * x_ref.grad.norm()


def test_keep_mask_rate_and_reproducibility_independent_of_threads():
    masks = []
    for n in (1, 2):
        with torch_threads(n):
            torch.manual_seed(11)
            masks.append(keep_mask((300, 1001), 0.25, torch.device("cpu")))
    assert torch.equal(masks[0], masks[1])
    mask = masks[0]
    assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) == {0, 1}
    assert abs(1 - mask.float().mean().item() - 0.25) < 0.004
    assert not torch.equal(mask, keep_mask((300, 1001), 0.25, torch.device("cpu")))  # moves on
    # neighbouring elements are independent: P(both dropped) = p^2
    both = ((mask[:, :-1] == 0) & (mask[:, 1:] == 0)).float().mean().item()
    assert abs(both - 0.25**2) < 0.004


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape, heads, constant", [
    ((3, 4, 90, 64), 2, False),    # the grid: heads of 32 (d64 h2)
    ((2, 3, 90, 64), 4, True),     # heads of 16 (d64 h4), constant over T: the first block
    ((2, 2, 70, 128), 2, False),   # heads of 64 (d128 h2), W > 64
    ((1, 3, 13, 96), 2, False),    # heads of 48, T = 1
    ((2, 2, 10, 24), 2, False),    # heads of 12: the plain loops
    ((2, 2, 11, 40), 2, False),    # heads of 20: 16 columns at once, then 4 one by one
])
def test_lif_attention_is_the_lif_then_the_torch_attention_with_the_same_mask(shape, heads,
                                                                              constant, training):
    """The Q/K/V LIF and the spike attention in one operator (the spikes passed as bits, q @ kᵀ
    as popcounts, the dropout mask drawn inline): the outputs of `lif` then the torch path's
    `SpikeAttention` with the same mask (counts times alpha, summed over keys: bitwise on the
    machines measured; a dropped entry would move an output by a whole term), gradients to the
    currents and the bias the same to rounding."""
    t, b, w, d = shape
    x = _currents(1 if constant else t, b, w, 3 * d, seed=7)
    x = (x.expand(t, b, w, 3 * d) if constant else x).requires_grad_()
    bias = _currents(3 * d, seed=8).requires_grad_()
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    scale = (d // heads) ** -0.5
    torch.manual_seed(5)
    out = kernels.lif_attention(x, 0.8, bias, heads, scale, 0.2, training)
    torch.manual_seed(5)
    spikes = kernels.lif(x_ref, 0.8, bias=bias_ref)
    expected = SpikeAttention.apply(spikes.reshape(t * b, w, 3 * d), heads, scale, 0.2,
                                    training).view(t, b, w, d)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert out.abs().sum() > 0 and 0 < spikes.mean() < 1
    g = _currents(t, b, w, d, seed=9)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    for got, ref in ((x, x_ref), (bias, bias_ref)):
        assert ref.grad.norm() > 0
        assert (got.grad - ref.grad).norm() <= 1e-6 * ref.grad.norm()
    with torch.no_grad():  # a validation pass: no membranes kept, the same outputs
        torch.manual_seed(5)
        assert torch.equal(kernels.lif_attention(x, 0.8, bias, heads, scale, 0.2, training), out)


def test_lif_attention_is_the_same_on_any_number_of_threads_and_keeps_only_bits():
    x = _currents(2, 20, 90, 192, seed=2).requires_grad_()
    bias = torch.zeros(192)
    results = []
    for n in (1, 2):
        with torch_threads(n):
            torch.manual_seed(9)
            out = kernels.lif_attention(x, 0.8, bias, 2, 0.2, 0.1, True)
            (grad,) = torch.autograd.grad(out.square().sum(), x, retain_graph=True)
            results.append((out.detach(), grad))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    mem, bits, keep = out.grad_fn.saved_tensors  # no (2, 40, 90, 90) counts or mask: bits
    assert mem.shape == x.shape and bits.shape == (3, 2, 40, 90) and bits.dtype == torch.int64
    assert keep.shape == (2, 40, 90, 2) and keep.dtype == torch.int64  # 90 columns: 2 words


needs_onednn = pytest.mark.skipif(
    not (kernels.backend().compiled and torch.ops.c5snn.onednn_available()),
    reason="this build of torch carries no oneDNN")
needs_fma = pytest.mark.skipif(not (kernels.backend().compiled and
                                    torch.ops.c5snn.fused_linear_available()),
                               reason="no FMA in this build: the fused operators are not used")


@needs_onednn
@pytest.mark.parametrize("m, k, n", [(5760, 64, 192), (2880, 128, 64), (1000, 256, 13),
                                     (7, 3, 5), (64, 20000, 48)])
def test_gemm_agrees_with_torch_mm_on_plain_and_transposed_operands(m, k, n):
    """The model's GEMMs (K = 64..256 over many rows), its weight gradients (K = all rows,
    operands transposed views) and odd sizes."""
    g = torch.Generator().manual_seed(m + k + n)
    a = (torch.rand(m, k, generator=g) < 0.3).float()
    b = torch.randn(k, n, generator=g)
    for x, y in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        ref = x @ y
        out = torch.ops.c5snn.gemm(x, y)
        assert out.shape == ref.shape and out.is_contiguous()
        assert (out - ref).norm() <= 1e-6 * ref.norm()
    grad = torch.randn(m, n, generator=g)  # dL/dW = gradᵀ @ a: summed over the m rows
    ref = grad.t() @ a
    assert (torch.ops.c5snn.gemm(grad.t(), a) - ref).norm() <= 1e-6 * ref.norm()
    assert torch.equal(torch.ops.c5snn.gemm(a[:, :0], b[:0]), torch.zeros(m, n))


@pytest.mark.parametrize("rows, m, n", [(57600 // 8, 192, 64), (3000, 64, 128), (1001, 40, 13),
                                        (129, 16, 6), (5, 7, 3), (1, 1, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_weight_grad_sums_gradient_times_input_over_all_rows(rows, m, n, threads):
    """dL/dW = gradᵀ @ x (* a spike's value) on fp32 input and on its uint8 copy: the model's
    shapes (a slice of its rows), widths that are no multiple of the kernel's tiles (16 of M,
    6 of N), fewer rows than a block or a thread's share, on one thread and two."""
    g = torch.Generator().manual_seed(rows + m + n)
    grad = torch.randn(rows, m, generator=g)
    spikes = (torch.rand(rows, n, generator=g) < 0.3).float()
    real = torch.randn(rows, n, generator=g)
    with torch_threads(threads):
        for x, kept, value in ((real, real, 1.0), (spikes, spikes.to(torch.uint8), 1.0),
                               (spikes / 0.9, spikes.to(torch.uint8), 1 / 0.9)):
            ref = (grad.double().t() @ x.double()).float()
            out = torch.ops.c5snn.weight_grad(grad, kept, value)
            assert out.shape == (m, n) and out.dtype == torch.float32 and out.is_contiguous()
            assert (out - ref).norm() <= 1e-6 * ref.norm()
    assert torch.equal(torch.ops.c5snn.weight_grad(grad[:0], spikes[:0], 1.0), torch.zeros(m, n))
    with pytest.raises(RuntimeError, match="g \\(R, M\\) and x \\(R, N\\)"):
        torch.ops.c5snn.weight_grad(grad, spikes[1:], 1.0)
    with pytest.raises(RuntimeError, match="float32 or uint8"):
        torch.ops.c5snn.weight_grad(grad, spikes.double(), 1.0)


@needs_onednn
@needs_fma
@pytest.mark.parametrize("k, n", [(64, 64), (64, 192), (128, 64), (256, 128), (24, 48)])
@pytest.mark.parametrize("input_kind", ["float", "spikes", "dropped"])
def test_linear_lif_operators_are_the_gemm_then_the_lif(k, n, input_kind, monkeypatch):
    """A linear map summed inside the LIF that reads it (`kernels.linear_lif`, `linear_lif_pair`):
    spikes, uint8 copies and membranes bitwise those of oneDNN's GEMM followed by the LIF
    operator (the sums are oneDNN's), for float input and for spike input read from its uint8
    copy (of value 1, or 1/(1-p) after dropout); gradients to input, weight, bias and residual
    as the two Functions' to rounding. Rows not a multiple of the 6-row tile."""
    use_backend(monkeypatch, gemm="onednn")  # compared with oneDNN's GEMM, whatever this machine chose
    shape = (5, 3, 31, k)
    value = 1 / 0.9 if input_kind == "dropped" else 1.0
    if input_kind == "float":
        x, x8 = _currents(*shape).abs() * 0.3, None
    else:
        x8 = (_currents(*shape) > 1.0).to(torch.uint8)
        x = x8.float() * value
    weight = _currents(n, k, seed=2) * (2.0 / k) ** 0.5
    bias = _currents(n, seed=3) * 0.2
    residual8 = (_currents(5, 3, 31, n, seed=4) > 1.0).to(torch.uint8)
    residual = residual8.float()
    spikes = input_kind != "float"
    fused_inputs = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    plain_inputs = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    fx, fw, fb, fr = fused_inputs
    px, pw, pb, pr = plain_inputs
    for dropout in (0.0, 0.3):
        torch.manual_seed(7)
        got = linear_lif(fx, fw, 0.8, fb, x8, value, dropout, bytes=True)
        torch.manual_seed(7)
        expected = kernels.lif(linear(px, pw, x8, value, spikes), 0.8, dropout=dropout, bias=pb,
                              bytes=True)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
        assert 0 < got[0].count_nonzero() < got[0].numel()
        w = _currents(*got[0].shape, seed=5)
        (got[0] * w).sum().backward()
        (expected[0] * w).sum().backward()
    got = linear_lif_pair(fx, fw, 0.8, fb, fr, x8, value, residual8, bytes=True)
    expected = kernels.lif_pair(linear(px, pw, x8, value, spikes), 0.8, pb, pr, True, residual8)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    w = _currents(*got[0].shape, seed=6)
    (got[0] * w).sum().backward()
    (expected[0] * w).sum().backward()
    for a, b in zip(fused_inputs, plain_inputs, strict=True):
        assert b.grad.norm() > 0
        assert (a.grad - b.grad).norm() <= 1e-6 * b.grad.norm()


@needs_onednn
@needs_fma
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("d, heads, spikes", [(64, 2, True), (128, 4, True), (64, 2, False),
                                              (80, 4, True)])
def test_linear_lif_attention_is_the_gemm_then_the_lif_attention(d, heads, spikes, training,
                                                                 monkeypatch):
    """The Q/K/V projection summed inside the LIF + attention operator
    (`kernels.linear_lif_attention`): outputs bitwise oneDNN's GEMM then `kernels.lif_attention`
    (the same dropout mask from the same seed draw), gradients to input, weight and bias to
    rounding; spike input read from its uint8 copy; heads of 20 (the plain loops)."""
    use_backend(monkeypatch, gemm="onednn")  # compared with oneDNN's GEMM, whatever this machine chose
    shape = (3, 4, 70, d)
    x8 = (_currents(*shape) > 1.0).to(torch.uint8) if spikes else None
    x = x8.float() if spikes else _currents(*shape).abs() * 0.3
    weight = _currents(3 * d, d, seed=2) * (3.0 / d) ** 0.5
    bias = _currents(3 * d, seed=3) * 0.2
    fused_inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    plain_inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    scale = (d // heads) ** -0.5
    torch.manual_seed(11)
    got = linear_lif_attention(*fused_inputs[:2], 0.8, fused_inputs[2], heads, scale, 0.2,
                               training, x8)
    torch.manual_seed(11)
    currents = linear(plain_inputs[0], plain_inputs[1], x8, 1.0, spikes)
    expected = kernels.lif_attention(currents, 0.8, plain_inputs[2], heads, scale, 0.2, training)
    assert torch.equal(got, expected) and got.abs().sum() > 0
    w = _currents(*got.shape, seed=5)
    (got * w).sum().backward()
    (expected * w).sum().backward()
    for a, b in zip(fused_inputs, plain_inputs, strict=True):
        assert b.grad.norm() > 0
        assert (a.grad - b.grad).norm() <= 1e-6 * b.grad.norm()


@needs_onednn
def test_flop_counter_counts_gemm_as_torchs_mm():
    from torch.utils.flop_counter import FlopCounterMode

    a, b = torch.randn(300, 64), torch.randn(64, 96)
    counted = []
    for f in (torch.mm, torch.ops.c5snn.gemm):
        with FlopCounterMode(display=False) as counter:
            f(a, b)
        counted.append(counter.get_total_flops())
    assert counted == [2 * 300 * 64 * 96] * 2
    with FlopCounterMode(display=False) as counter:
        torch.ops.c5snn.weight_grad(torch.randn(300, 96), torch.ones(300, 64, dtype=torch.uint8), 1.0)
    assert counter.get_total_flops() == 2 * 300 * 64 * 96  # as gradᵀ @ x


def test_flop_counter_counts_the_attention_operator_as_the_torch_paths_bmms():
    """Forward q @ kᵀ and scores @ v, backward four products of the same size, as the torch
    path's bmm's count: the same total either way."""
    from torch.utils.flop_counter import FlopCounterMode

    n, w, d = 4, 10, 64
    qkv = (torch.rand(n, w, 3 * d, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    with FlopCounterMode(display=False) as counter:
        SpikeAttention.apply(qkv.clone().requires_grad_(), 2, 0.2, 0.1, True).sum().backward()
    counted = [counter.get_total_flops()]
    x = qkv.view(2, 2, w, 3 * d).clone().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        kernels.lif_attention(x, 0.8, torch.zeros(3 * d), 2, 0.2, 0.1, True).sum().backward()
    counted.append(counter.get_total_flops())
    assert counted == [6 * 2 * n * w * w * d] * 2


def test_the_compiled_neuron_is_the_python_one():
    """The LIF's constants and reset rule as the built library holds them (neuron.h) equal
    `c5snn.neuron.NEURON`, which every Python path reads."""
    from c5snn.neuron import NEURON

    threshold, slope, reset = torch.ops.c5snn.neuron()
    assert (threshold, slope, reset) == (NEURON.threshold, NEURON.slope, NEURON.reset)
    assert NEURON.surrogate == "fast_sigmoid"  # the surrogate neuron.h's discharge() computes


def test_the_gemm_library_is_measured_once_per_build_and_takes_an_override(monkeypatch, capsys,
                                                                           tmp_path):
    """The library of the model's GEMMs is the one that ran the model's GEMM shapes faster here,
    measured once and kept beside the build (every process of the machine then agrees);
    C5SNN_GEMM overrides it, and a typo there is one line, then the measurement."""
    from c5snn.kernels import record

    if not torch.ops.c5snn.onednn_available():
        pytest.skip("this build of torch carries no oneDNN")
    monkeypatch.delenv(record.GEMM_SWITCH, raising=False)
    measure, measured = record.measure_gemms, []
    monkeypatch.setattr(record, "measure_gemms",
                        lambda: measured.append(1) or {"onednn": 0.2, "torch": 0.1})
    assert record._gemm_library(tmp_path) == ("torch", "measured: onednn 200.0 ms, torch 100.0 ms")
    assert record._gemm_library(tmp_path)[0] == "torch" and measured == [1]  # kept, not again
    kept = list(tmp_path.glob("gemm-*-threads.json"))
    assert len(kept) == 1 and kept[0].name == f"gemm-{torch.get_num_threads()}-threads.json"
    monkeypatch.setenv(record.GEMM_SWITCH, "onednn")
    assert record._gemm_library(tmp_path) == ("onednn", "C5SNN_GEMM")
    monkeypatch.setenv(record.GEMM_SWITCH, "mkl")
    assert record._gemm_library(tmp_path)[0] == "torch"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["c5snn: ignoring C5SNN_GEMM='mkl' (expected 'onednn' or 'torch')"]
    seconds = measure(repeats=1)  # the real measurement: both libraries timed
    assert set(seconds) == {"onednn", "torch"} and all(v > 0 for v in seconds.values())


def test_the_backend_record_says_how_a_step_is_computed():
    b = kernels.backend()
    record = kernels.describe("cpu")
    assert record["compiled"] is True and record["variant"] == build.isa_variant()
    assert record["isa"] == torch.ops.c5snn.isa() and record["gemm"] == b.gemm
    assert record["threads"] == torch.get_num_threads() and record["torch"] == torch.__version__
    assert record["fused_linear"] == (b.gemm == "onednn" and
                                      torch.ops.c5snn.fused_linear_available())
    other = {**record, "gemm": "torch" if b.gemm == "onednn" else "onednn", "cpu": "another"}
    assert kernels.differences(record, other) == [f"gemm: {b.gemm} -> {other['gemm']}"]
    assert kernels.differences(record, record) == []
    assert kernels.describe("cpu", "snntorch")["gemm"] == "torch"  # the reference: nn.Linear


def test_the_library_runs_on_torchs_openmp_threads():
    """ATen's parallel_for is inline: compiled without OpenMP it runs every operator on one
    thread (it did, unnoticed, until the attention operator was profiled). The library must
    import torch's OpenMP runtime."""
    assert "OpenMP" in torch.__config__.parallel_info()
    root = build.build_directory(build.isa_variant())
    library = root / f"{root.name}.so"
    assert b"GOMP_parallel" in library.read_bytes()


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=300)


TRAIN_STEP = """
import torch
from c5snn import kernels
from c5snn.model import SpikingTransformer
torch.manual_seed(0)
model = SpikingTransformer(d_model=16, n_heads=2, n_layers=2, d_ffn=32, beta=0.8,
                           encoding="rate_coded", timesteps=3, dropout=0.1)
loss = model((torch.rand(4, 10, 39) < 0.2).float()).square().sum()
loss.backward()
print("compiled", kernels.backend().compiled, "grad",
      model.input_proj.weight.grad.norm().item() >= 0)
"""


@pytest.mark.build
def test_switched_off_the_model_trains_on_the_torch_paths():
    out = _run(TRAIN_STEP, C5SNN_NATIVE="0")
    assert out.returncode == 0, out.stderr
    assert "compiled False grad True" in out.stdout


@pytest.mark.build
def test_a_failed_build_is_one_line_and_the_torch_paths_take_over(tmp_path):
    """No working compiler (CXX points at `false`), empty cache: one stderr line, still trains."""
    out = _run(TRAIN_STEP, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "compiled False grad True" in out.stdout
    lines = [line for line in out.stderr.splitlines() if "c5snn:" in line]
    assert any("unavailable" in line and "using the torch paths" in line for line in lines), lines
    assert "Traceback" not in out.stderr


@pytest.mark.build
def test_new_machine_dead_lock_and_damaged_library_each_cost_one_build(tmp_path, monkeypatch):
    """`c5snn workers -n 2` on a new machine: both children need the build at once, and share
    one. A build killed midway leaves torch's lock file (torch would wait for it forever), so
    they start with one here; a crash can leave a truncated library, which is rebuilt. (One test,
    so the suite pays for two builds of the library, not three.)"""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    root = build.build_directory(build.isa_variant())
    root.mkdir(parents=True)
    (root / "lock").touch()
    os.utime(root / "lock", (0, 0))  # last touched long ago: its builder is gone
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", TRAIN_STEP], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "compiled True" in out, err
    assert len(list(tmp_path.glob("c5snn_*/*.so"))) == 1
    library = root / f"{root.name}.so"
    library.write_bytes(library.read_bytes()[:100])
    out = _run(TRAIN_STEP, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.returncode == 0 and "compiled True" in out.stdout, out.stderr
    assert library.stat().st_size > 100_000


def test_the_build_is_keyed_by_content_and_shared_by_checkouts():
    """The library's name hashes the sources (and flags, torch, variant, CPU); the build
    compiles copies kept in its own folder, so two checkouts of one source never make ninja
    rebuild it, and each instruction-set variant has a build of its own."""
    variant = build.isa_variant()
    root = build.build_directory(variant)
    assert root.name == build.library_name(variant) and root.name.startswith(f"c5snn_{variant}_")
    assert len({build.library_name(v) for v in build.ISA_FLAGS}) == len(build.ISA_FLAGS)
    for source in build.SOURCES.iterdir():
        assert (root / source.name).read_bytes() == source.read_bytes()
    ninja = (root / "build.ninja").read_text()
    assert str(root / "ops.cpp") in ninja and str(build.SOURCES) not in ninja
    assert build.ISA_FLAGS[variant] in ninja


@pytest.mark.build
def test_a_bad_isa_switch_is_one_line():
    out = _run("from c5snn.kernels import backend; print(backend().compiled)", C5SNN_ISA="avx9")
    assert out.returncode == 0 and "False" in out.stdout
    assert "C5SNN_ISA='avx9' is not one of native, avx2, scalar" in out.stderr


@pytest.mark.skipif(build.isa_variant() != "native", reason="run from the native variant's suite")
@pytest.mark.parametrize("variant", ["avx2", "scalar"])
def test_the_lower_instruction_set_variants_pass_the_operator_tests(variant):
    """Each `#if` of the operators has an AVX-512 half and an AVX2 or scalar half, and
    -march=native compiles this CPU's only. The avx2 (x86-64-v3) and scalar (x86-64) variants
    are built here too (C5SNN_ISA) and run these tests, avx2 the model's against the oracle as
    well (scalar has no FMA, hence no fused operators): a CI machine of either vendor tests both
    halves of every `#if`."""
    if variant == "avx2" and not {"avx2", "fma"} <= set(build._cpu_flags().split()):
        pytest.skip("this CPU runs no AVX2")
    files = ["tests/test_kernels.py"] + (["tests/test_model.py", "tests/test_lif.py"]
                                         if variant == "avx2" else [])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "-m", "not build", *files], capture_output=True, text=True,
                          env={**os.environ, "C5SNN_ISA": variant}, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "no C++ compiler" not in proc.stdout and " passed" in proc.stdout
    root = build.build_directory(variant)
    assert b"-march=" + build.ISA_FLAGS[variant].split("=")[1].encode() in (
        root / "build.ninja").read_bytes()
