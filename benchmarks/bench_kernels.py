"""The pieces behind the training-step numbers: denormal GEMMs, and each compiled CPU operator
(`c5snn/kernels`) against the torch path it replaces.

1. A (57600, 64) @ (64, 64) fp32 GEMM (a d64 projection's input gradient at B=64, W=90, T=10) on
   normal and on denormal inputs, with denormals kept and flushed
   (`c5snn.runtime.configure_threads`). Each row runs in a fresh process, because the flush
   setting must precede torch's thread pool.
2. The LIF recurrence on a (10, 64, 90, 64) tensor: forward alone, and forward + backward through
   autograd; the LIF with the FFN's dropout in its pass against LIF then dropout; the Q/K/V LIF
   and spike attention (`kernels.lif_attention` against the torch LIF then
   `c5snn.ops.SpikeAttention`) at the two 6-layer configurations' shapes; the dropout keep mask
   of a (2, 640, 90, 90)
   attention-score tensor. Best of 10 after a warm-up, in this process (flushed), on the
   allocator it was started with (jemalloc, as c5snn's workers, in docs/benchmarks.md).
3. The fused operators against the compiled operators they replace, forward + backward
   through autograd at d64's shapes: `kernels.lif_pair` against two `kernels.lif` calls, and
   (where oneDNN runs the GEMMs) each of a block's four linear maps summed inside the LIF
   operator that reads it (`kernels.linear_lif*`) against `kernels.linear` then that operator.
   Medians of 5
   rounds of best-of-3, the two sides alternating, in this process.
4. The model's GEMMs on the two libraries inside torch: torch's mm (MKL) and oneDNN
   (`c5snn::gemm`, what `kernels.linear` runs where the backend chose oneDNN): each 6-layer
   configuration's linear maps at B=64, W=90, T=10 (57,600 rows), forward, dL/dx and dL/dW,
   and a 2048 x 2048 GEMM; for dL/dW also c5snn's own kernel (`c5snn::weight_grad`, what runs
   beside oneDNN) on the same fp32 input and on the uint8
   copy the model keeps of spike input. Same process, same threads.

    .venv/bin/python benchmarks/bench_kernels.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_ms(fn, repeats: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def gemm_row(flush: bool, denormal: bool, threads: int) -> float:
    import torch

    from c5snn.runtime import configure_threads

    if flush:
        configure_threads(threads)
    else:
        torch.set_num_threads(threads)
    g = torch.randn(57600, 64) * (1e-39 if denormal else 1.0)  # 1e-39: below fp32's 1.2e-38
    w = torch.randn(64, 64) * 0.1
    return best_ms(lambda: g @ w, repeats=3 if denormal and not flush else 10)


def operator_rows(threads: int) -> list[tuple[str, float, float]]:
    import torch

    from c5snn import kernels
    from c5snn.kernels import record
    from c5snn.lif import lif_torch
    from c5snn.ops import dropout_spikes, keep_mask
    from c5snn.runtime import configure_threads

    configure_threads(threads)
    if not kernels.backend().compiled:
        raise SystemExit("the compiled CPU operators are not available here")
    x = torch.randn(10, 64, 90, 64) * 1.5
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    rows = []
    with torch.no_grad():
        rows.append(("LIF forward (10, 64, 90, 64)", best_ms(lambda: lif_torch(x, 0.8)),
                     best_ms(lambda: kernels.lif(x, 0.8))))
    rows.append(("LIF forward + backward, autograd", best_ms(lambda: lif_torch(xg, 0.8).backward(g)),
                 best_ms(lambda: kernels.lif(xg, 0.8).backward(g))))
    h = torch.randn(10, 64, 90, 128).requires_grad_()  # the d64 FFN's hidden currents
    gh = torch.randn_like(h)
    rows.append(("LIF + dropout p=0.1 (10, 64, 90, 128), forward + backward",
                 best_ms(lambda: dropout_spikes(lif_torch(h, 0.8), 0.1, True).backward(gh)),
                 best_ms(lambda: kernels.lif(h, 0.8, dropout=0.1).backward(gh))))
    for d, heads in ((64, 2), (128, 4)):
        rows += attention_rows(d, heads)
    shape, cpu = (2, 640, 90, 90), torch.device("cpu")
    compiled = best_ms(lambda: keep_mask(shape, 0.1, cpu))
    serves, record.compiled_on = record.compiled_on, lambda device: False  # the torch path
    try:
        rows.append(("keep mask (2, 640, 90, 90), p=0.1", best_ms(lambda: keep_mask(shape, 0.1, cpu)),
                     compiled))
    finally:
        record.compiled_on = serves
    return rows


def attention_rows(d: int, heads: int) -> list[tuple[str, float, float]]:
    """The Q/K/V LIF and spike attention at a 6-layer configuration's shape: the torch LIF then
    the torch attention, and the compiled operator."""
    import torch

    from c5snn import kernels
    from c5snn.lif import lif_torch
    from c5snn.ops import SpikeAttention

    x = (torch.randn(10, 64, 90, 3 * d) * 1.5).requires_grad_()  # (T, B, W, 3d) currents
    go = torch.randn(10, 64, 90, d)
    scale = (d // heads) ** -0.5

    def torch_path():
        spikes = lif_torch(x, 0.8).reshape(640, 90, 3 * d)
        return SpikeAttention.apply(spikes, heads, scale, 0.1, True).view(10, 64, 90, d)

    def compiled():
        return kernels.lif_attention(x, 0.8, torch.zeros(3 * d), heads, scale, 0.1, True)

    name = f"LIF + attention (10, 64, 90, {3 * d}), {heads} heads, p=0.1"
    rows = []
    with torch.no_grad():
        rows.append((f"{name}, forward", best_ms(torch_path), best_ms(compiled)))
    rows.append((f"{name}, forward + backward", best_ms(lambda: torch_path().backward(go)),
                 best_ms(lambda: compiled().backward(go))))
    return rows


def fused_rows() -> list[tuple[str, float, float]]:
    """(operator, its parts ms, fused ms): forward + backward at d64's shapes, alternating."""
    import statistics

    import torch

    from c5snn import kernels

    x = (torch.randn(10, 64, 90, 64) * 1.5).requires_grad_()  # o_proj's currents
    r = (torch.rand(10, 64, 90, 64) < 0.3).float().requires_grad_()  # the block input
    bias = torch.randn(64).requires_grad_()
    g = torch.randn(10, 64, 90, 64)
    cases = [
        ("LIF(r + LIF(x + b)) (10, 64, 90, 64): `lif_pair` / two `lif`",
         lambda: kernels.lif(r, 0.8, residual=kernels.lif(x, 0.8, bias=bias)).backward(g),
         lambda: kernels.lif_pair(x, 0.8, bias, r).backward(g)),
    ]
    cases += linear_cases()
    rows = []
    for name, parts, fused in cases:
        times = [(best_ms(parts, 3), best_ms(fused, 3)) for _ in range(5)]
        rows.append((f"{name}, forward + backward", statistics.median(t[0] for t in times),
                     statistics.median(t[1] for t in times)))
    return rows


def linear_cases() -> list:
    """A d64 block's four linear maps with the LIF operators that read them: oneDNN's GEMM (and
    c5snn's dL/dW) then the LIF operator, against the two in one (`kernels.linear_lif*`),
    forward + backward through autograd; none where the fused operators are not used here."""
    import torch

    from c5snn import kernels

    if not kernels.backend().fused_linear:
        return []
    gen = torch.Generator().manual_seed(0)

    def spikes(*shape, value=1.0):
        x8 = (torch.rand(*shape, generator=gen) < 0.2).to(torch.uint8)
        return (x8.float() * value).requires_grad_(), x8

    def weight(n, k):
        return (torch.randn(n, k, generator=gen) * (2.0 / k) ** 0.5).requires_grad_()

    def bias(n):
        return (torch.randn(n, generator=gen) * 0.1).requires_grad_()

    mixed = (torch.rand(10, 64, 90, 64, generator=gen) * 0.5).requires_grad_()  # attention out
    x, x8 = spikes(10, 64, 90, 64)  # block input, r1
    hidden, hidden8 = spikes(10, 64, 90, 128, value=1 / 0.9)
    r8 = x8
    w_o, w_1, w_2, w_qkv = weight(64, 64), weight(128, 64), weight(64, 128), weight(192, 64)
    b_o, b_1, b_2, b_qkv = bias(64), bias(128), bias(64), bias(192)
    g64, g128 = torch.randn(10, 64, 90, 64, generator=gen), torch.randn(10, 64, 90, 128,
                                                                         generator=gen)
    return [
        ("o_proj, float input (K 64, N 64) + LIF pair: `linear_lif_pair` / `linear` + `lif_pair`",
         lambda: kernels.lif_pair(kernels.linear(mixed, w_o), 0.8, b_o, x, False, r8).backward(g64),
         lambda: kernels.linear_lif_pair(mixed, w_o, 0.8, b_o, x, residual8=r8).backward(g64)),
        ("ffn1, uint8 input (K 64, N 128) + LIF, dropout 0.1: `linear_lif` / `linear` + `lif`",
         lambda: kernels.lif(kernels.linear(x, w_1, x8), 0.8, dropout=0.1, bias=b_1).backward(g128),
         lambda: kernels.linear_lif(x, w_1, 0.8, b_1, x8, dropout=0.1).backward(g128)),
        ("ffn2, uint8 input of 1/(1-p) (K 128, N 64) + LIF pair: `linear_lif_pair` / `linear` + "
         "`lif_pair`",
         lambda: kernels.lif_pair(kernels.linear(hidden, w_2, hidden8, 1 / 0.9), 0.8, b_2, x, False,
                                 r8).backward(g64),
         lambda: kernels.linear_lif_pair(hidden, w_2, 0.8, b_2, x, hidden8, 1 / 0.9,
                                     r8).backward(g64)),
        ("Q/K/V, uint8 input (K 64, N 192) + LIF + attention, 2 heads, p=0.1: "
         "`linear_lif_attention` / `linear` + `lif_attention`",
         lambda: kernels.lif_attention(kernels.linear(x, w_qkv, x8), 0.8, b_qkv, 2, 32**-0.5, 0.1,
                                      True).backward(g64),
         lambda: kernels.linear_lif_attention(x, w_qkv, 0.8, b_qkv, 2, 32**-0.5, 0.1, True,
                                          x8).backward(g64)),
    ]


def gemm_rows() -> list[tuple[str, float, float, float | None, float | None]]:
    """(shape, torch mm ms, oneDNN ms, c5snn dL/dW ms on fp32 and on uint8 x or None) for the
    model's GEMMs; spikes as the forward's input."""
    import torch

    if not torch.ops.c5snn.onednn_available():
        return []
    rows, n = [], 57600
    layers = {64: (("qkv", 64, 192), ("o", 64, 64), ("ffn1", 64, 128), ("ffn2", 128, 64)),
              128: (("qkv", 128, 384), ("o", 128, 128), ("ffn1", 128, 256), ("ffn2", 256, 128))}
    for d, maps in layers.items():
        for name, k, m in maps:
            x = (torch.rand(n, k) < 0.3).float()
            w, g = torch.randn(m, k), torch.randn(n, m)
            x8 = x.to(torch.uint8)
            for what, a, b in (("x @ Wᵀ", x, w.t()), ("dL/dx", g, w), ("dL/dW", g.t(), x)):
                own = (None, None)
                if what == "dL/dW":
                    own = (best_ms(lambda g=g, x=x: torch.ops.c5snn.weight_grad(g, x, 1.0)),
                           best_ms(lambda g=g, x8=x8: torch.ops.c5snn.weight_grad(g, x8, 1.0)))
                rows.append((f"d{d} {name} {what}: ({a.shape[0]}, {a.shape[1]}) @ "
                             f"({b.shape[0]}, {b.shape[1]})",
                             best_ms(lambda a=a, b=b: torch.mm(a, b)),
                             best_ms(lambda a=a, b=b: torch.ops.c5snn.gemm(a, b)), *own))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rows.append(("2048 x 2048", best_ms(lambda: torch.mm(a, b)), best_ms(lambda: torch.ops.c5snn.gemm(a, b)),
                 None, None))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm", nargs=2, metavar=("FLUSH", "DENORMAL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gemm:
        print(json.dumps(gemm_row(args.gemm[0] == "1", args.gemm[1] == "1", args.threads)))
        return
    print(f"{args.threads} threads")
    print("| (57600, 64) @ (64, 64) GEMM | normal inputs ms | denormal inputs ms |")
    print("|---|---|---|")
    for flush in (False, True):
        cells = []
        for denormal in (False, True):
            out = subprocess.run([sys.executable, __file__, "--gemm", str(int(flush)),
                                  str(int(denormal)), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True)
            cells.append(float(out.stdout.strip().splitlines()[-1]))
        print(f"| denormals {'flushed' if flush else 'kept'} | {cells[0]:.1f} | {cells[1]:.1f} |")
    print("\n| operator | torch path ms | compiled ms | speed-up |")
    print("|---|---|---|---|")
    for name, slow, fast in operator_rows(args.threads):
        print(f"| {name} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x |")
    print("\n| fused operator | its parts ms | fused ms | speed-up |")
    print("|---|---|---|---|")
    for name, parts, fused in fused_rows():
        print(f"| {name} | {parts:.2f} | {fused:.2f} | {parts / fused:.2f}x |")
    print("\n| GEMM | torch mm (MKL) ms | oneDNN ms | oneDNN speed-up | c5snn dL/dW ms, fp32 x |"
          " c5snn dL/dW ms, uint8 x |")
    print("|---|---|---|---|---|---|")
    for name, mkl, dnnl, own, own8 in gemm_rows():
        extra = (f"{own:.2f} | {own8:.2f}" if own is not None else "- | -")
        print(f"| {name} | {mkl:.2f} | {dnnl:.2f} | {mkl / dnnl:.2f}x | {extra} |")


if __name__ == "__main__":
    main()
