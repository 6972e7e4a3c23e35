import pytest
import torch
from helpers import use_backend

from c5snn import kernels
from c5snn.kernels import linear
from c5snn.lif import lif_torch as lif
from c5snn.ops import dropout_spikes, keep_mask, spike_attention


def test_keep_mask_rate():
    mask = keep_mask((400, 1000), 0.1, torch.device("cpu"))
    assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) == {0, 1}
    assert abs(1 - mask.float().mean().item() - 0.1) < 0.003


def test_lif_dynamics_by_hand():
    # beta 0.5, threshold 1, reset by subtraction: U = 0.6, 0.3+0.6=0.9, 0.45+0.9=1.35 -> spike,
    # then 0.675 + 0.2 - 1 = -0.125
    x = torch.tensor([[0.6], [0.6], [0.9], [0.2]])
    assert lif(x, 0.5).flatten().tolist() == [0.0, 0.0, 1.0, 0.0]


def test_dropout_backward_uses_the_forward_mask():
    torch.manual_seed(0)
    x = torch.ones(50, 60, requires_grad=True)
    y = dropout_spikes(x, 0.3, training=True)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum)/dx = mask / (1-p) = y where x = 1
    assert torch.equal(dropout_spikes(x, 0.3, training=False), x)


def _qkv():
    """q, k, v `(3, 10, 8)` spikes and their fused `(3, 10, 24)` tensor (a leaf)."""
    qkv = (torch.rand(3, 10, 24) < 0.4).float().requires_grad_()
    return qkv, qkv.detach().split(8, dim=-1)


def _grads(qkv):
    return qkv.grad.split(8, dim=-1)


def test_spike_attention_matches_reference_with_dropout_off():
    torch.manual_seed(0)
    qkv, (q, k, v) = _qkv()
    out = spike_attention(qkv, 2, 0.5, 0.1, training=False)
    heads = [t.detach().view(3, 10, 2, 4).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    ref = ((heads[0] @ heads[1].transpose(-2, -1)) * 0.5) @ heads[2]
    assert torch.allclose(out, ref.transpose(1, 2).reshape(3, 10, 8))
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref.transpose(1, 2).reshape(3, 10, 8) * w).sum().backward()
    for fast, slow in zip(_grads(qkv), heads, strict=True):
        assert torch.allclose(fast, slow.grad.transpose(1, 2).reshape(3, 10, 8), atol=1e-5)


def test_spike_attention_dropout_matches_reference_with_the_same_mask():
    torch.manual_seed(0)
    qkv, (q, k, v) = _qkv()
    torch.manual_seed(5)
    out = spike_attention(qkv, 2, 0.5, 0.3, training=True)
    torch.manual_seed(5)
    drop = keep_mask((2, 3, 10, 10), 0.3, torch.device("cpu")).transpose(0, 1) == 0  # (N,h,W,W)
    heads = [t.detach().view(3, 10, 2, 4).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    scores = ((heads[0] @ heads[1].transpose(-2, -1)) * 0.5).masked_fill(drop, 0.0) / 0.7
    ref = (scores @ heads[2]).transpose(1, 2).reshape(3, 10, 8)
    assert torch.allclose(out, ref, atol=1e-6)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for fast, slow in zip(_grads(qkv), heads, strict=True):
        assert torch.allclose(fast, slow.grad.transpose(1, 2).reshape(3, 10, 8), atol=1e-5)


@pytest.mark.parametrize("library", ["onednn", "torch"])
def test_linear_matches_torch_linear_keeping_spikes_as_their_uint8_copy(library, monkeypatch):
    """`ops.linear` on either GEMM library: spike input (0 or 1/(1-p)) is kept as uint8, made
    here or by the LIF that made it; other input (attention's output) is kept as it is and gets
    its gradient too."""
    if library == "onednn" and not (kernels.backend().compiled and
                                    torch.ops.c5snn.onednn_available()):
        pytest.skip("no compiled operators or no oneDNN in this torch")
    use_backend(monkeypatch, gemm=library)
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4, bias=False)
    spikes = (torch.rand(2, 5, 6) < 0.5).float() / 0.9
    w = torch.randn(2, 5, 4)
    cases = [(spikes, None, True), (spikes, (spikes != 0).to(torch.uint8), True),
             (torch.randn(2, 5, 6), None, False)]
    for x, x8, is_spikes in cases:
        x = x.clone().requires_grad_(True)
        layer.zero_grad()
        out = linear(x, layer.weight, x8, 1 / 0.9 if is_spikes else 1.0, spikes=is_spikes)
        kept = out.grad_fn.saved_tensors[0]
        assert kept.dtype == (torch.uint8 if is_spikes else torch.float32)
        (out * w).sum().backward()
        grad_w, grad_x = layer.weight.grad.clone(), x.grad.clone()
        layer.zero_grad()
        x.grad = None
        ref = layer(x)
        (ref * w).sum().backward()
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)
        assert torch.allclose(grad_w, layer.weight.grad, atol=1e-6)
        assert torch.allclose(grad_x, x.grad, atol=1e-6)
