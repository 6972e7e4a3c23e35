"""Training-step speed, efficiency and memory: the fast path against the snntorch reference.

The baseline is `c5snn.reference.ReferenceSpikingTransformer`: the straightforward snntorch model
(one `snntorch.Leaky` per LIF, heads batched, a Python loop over T only), the structure of the
original project's model. Both sides run under the same conditions: the same allocator (the one
c5snn's CPU workers use: jemalloc where installed, else glibc tuned by `tune_cpu_allocator`), the
same threads, the same denormal setting (flushed to zero, as in c5snn's training processes:
`c5snn.runtime.configure_threads`; `--denormals keep` for both sides shows what that is worth),
each (model, configuration) in its own subprocess so that its peak RSS is its own. One training
step = forward, BCEWithLogits loss, backward, Adam step at B=64, W=90, dropout 0.1, fp32.

Efficiency: the fast path's step FLOPs (`torch.utils.flop_counter`: the matmuls it runs, its
compiled attention's counted as the torch path's bmm's) over its step time, as a fraction of
the fp32 matmul rate measured in the same process: a 2048 x 2048 GEMM on torch's mm (MKL) and
on oneDNN, the faster of the two (`matmul_rates`). (Earlier versions also printed the step's
share of time in matmuls and the efficiency were everything else free; since the linear maps
are summed inside the LIF operators, which now hold most of the step, no profile separates
the two.) Kernels: profiler events (aten ops and c5snn's compiled operators) per step. Also times
`compute_metrics` on 1,741 x 39 logits (the size of the real val split).

    .venv/bin/python benchmarks/bench_model.py [--repeats 5] [--threads 2] [--denormals keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from c5snn.runtime import allocator_environments  # noqa: E402

CONFIGS = {
    "d64_h2_l2_direct": dict(d_model=64, n_heads=2, n_layers=2, encoding="direct"),
    "d64_h2_l6_rate": dict(d_model=64, n_heads=2, n_layers=6, encoding="rate_coded"),
    "d128_h4_l6_rate": dict(d_model=128, n_heads=4, n_layers=6, encoding="rate_coded"),
}


def one(kind: str, name: str, repeats: int, threads: int, denormals: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from c5snn.model import SpikingTransformer
    from c5snn.reference import ReferenceSpikingTransformer
    from c5snn.runtime import configure_threads, tune_cpu_allocator

    tune_cpu_allocator()  # glibc's setting (a no-op for allocation under jemalloc)
    if denormals == "flush":
        configure_threads(threads)  # as c5snn's training processes: threads, denormals flushed
    else:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    kw = dict(cfg, d_ffn=2 * cfg["d_model"], beta=0.8, dropout=0.1)
    model = (SpikingTransformer if kind == "fast" else ReferenceSpikingTransformer)(**kw)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = (torch.rand(64, 90, 39) < 5 / 39).float()
    y = (torch.rand(64, 39) < 5 / 39).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1000)
    result = {
        "ms": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    result["gflop"] = counter.get_total_flops() / 1e9
    result["events"] = sum(1 for e in prof.events() if e.name.startswith(("aten::", "c5snn::")))
    result["torch_gflops"], result["onednn_gflops"] = matmul_rates()
    result["matmul_gflops"] = max(result["torch_gflops"], result["onednn_gflops"])
    return result


def matmul_rates(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """This process's fp32 GEMM rates in GFLOP/s (best of `repeats`) on torch's mm (MKL) and on
    oneDNN (`c5snn::gemm`; 0 where it is not available). The faster is this CPU's fp32
    matmul rate: on AMD CPUs MKL runs its AVX2 code, and oneDNN inside the same torch ran
    2048 x 2048 at over twice its rate, so MKL's rate alone would flatter every efficiency."""
    import torch

    from c5snn import kernels

    a, b = torch.randn(n, n), torch.randn(n, n)
    onednn = kernels.backend().compiled and torch.ops.c5snn.onednn_available()
    rates = []
    for mm in (torch.mm, torch.ops.c5snn.gemm if onednn else None):
        if mm is None:
            rates.append(0.0)
            continue
        mm(a, b)
        best = min(_timed(lambda mm=mm: mm(a, b)) for _ in range(repeats))
        rates.append(2 * n**3 / best / 1e9)
    return rates[0], rates[1]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def metrics_ms(repeats: int) -> float:
    import torch

    sys.path.insert(0, str(ROOT))
    from c5snn.metrics import compute_metrics

    logits = torch.randn(1741, 39)
    targets = (torch.rand(1741, 39) < 5 / 39).float()
    compute_metrics(logits, targets)
    times = []
    for _ in range(max(repeats, 20)):
        t0 = time.perf_counter()
        compute_metrics(logits, targets)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--denormals", choices=("flush", "keep"), default="flush",
                    help="flush (c5snn's training processes, the default) or keep, for both sides")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.repeats, args.threads,
                             args.denormals)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"python {platform.python_version()}")
    allocators = allocator_environments(os.environ)
    mine = "jemalloc" if "jemalloc" in allocators else "glibc"
    print(f"both sides on {mine}, denormals {args.denormals}")
    print("| configuration | reference ms/step | c5snn ms/step | speed-up | c5snn GFLOP/step "
          "| GEMM GFLOP/s torch / oneDNN | c5snn efficiency | reference / c5snn aten events per step "
          "| reference / c5snn peak RSS MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:

        def measure(kind: str, name=name) -> dict:
            out = subprocess.run(
                [sys.executable, __file__, "--one", kind, name, "--repeats", str(args.repeats),
                 "--threads", str(args.threads), "--denormals", args.denormals],
                check=True, capture_output=True, text=True, env=allocators[mine],
            )
            return json.loads(out.stdout.strip().splitlines()[-1])

        o, f = measure("oracle"), measure("fast")
        efficiency = f["gflop"] / (f["ms"] / 1000) / f["matmul_gflops"]
        print(f"| {name} | {o['ms']:.0f} | {f['ms']:.0f} | {o['ms'] / f['ms']:.2f}x | "
              f"{f['gflop']:.1f} | {f['torch_gflops']:.0f} / {f['onednn_gflops']:.0f} | "
              f"{efficiency:.0%} | "
              f"{o['events']} / {f['events']} | {o['peak_rss_mb']:.0f} / {f['peak_rss_mb']:.0f} | "
              f"{f['peak_rss_mb'] / o['peak_rss_mb']:.2f} |", flush=True)
    print(f"\ncompute_metrics on 1741x39 logits: {metrics_ms(args.repeats):.2f} ms (median)")


if __name__ == "__main__":
    main()
