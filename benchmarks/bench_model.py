"""Training-step speed and memory: the package model against the tests' snntorch oracle.

c5snn runs as its CPU workers do (jemalloc where libjemalloc is installed, else glibc tuned by
`tune_cpu_allocator`); the oracle runs under both and c5snn is compared with its better run in
each column (faster step, smaller peak RSS).
One training step = forward, BCEWithLogits loss, backward, Adam step at B=64, W=90,
dropout 0.1, fp32. Each (model, configuration) runs in its own subprocess so that its peak RSS
is its own. Also times `compute_metrics` on 1,741 x 39 logits (the size of the real val split).

    .venv/bin/python benchmarks/bench_model.py [--repeats 5] [--threads 2]
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


def one(kind: str, name: str, repeats: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from c5snn.model import SpikingTransformer
    from c5snn.reference import ReferenceSpikingTransformer
    from c5snn.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # glibc's setting (a no-op for allocation under jemalloc)
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
    return {
        "ms": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


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
    ap.add_argument("--one", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.repeats, args.threads)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"python {platform.python_version()}")
    allocators = allocator_environments(os.environ)
    mine = "jemalloc" if "jemalloc" in allocators else "glibc"
    print(f"c5snn on {mine}; oracle on {' and '.join(allocators)} (its better run per column)")
    print("| configuration | oracle ms/step | c5snn ms/step | speed-up | oracle peak RSS MB "
          "| c5snn peak RSS MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in CONFIGS:

        def measure(kind: str, allocator: str, name=name) -> dict:
            out = subprocess.run(
                [sys.executable, __file__, "--one", kind, name, "--repeats", str(args.repeats),
                 "--threads", str(args.threads)],
                check=True, capture_output=True, text=True, env=allocators[allocator],
            )
            return json.loads(out.stdout.strip().splitlines()[-1])

        oracle = {a: measure("oracle", a) for a in allocators}
        f = measure("fast", mine)
        fast = min(oracle, key=lambda a: oracle[a]["ms"])
        small = min(oracle, key=lambda a: oracle[a]["peak_rss_mb"])
        o, m = oracle[fast], oracle[small]["peak_rss_mb"]
        print(f"| {name} | {o['ms']:.0f} ({fast}) | {f['ms']:.0f} | {o['ms'] / f['ms']:.2f}x | "
              f"{m:.0f} ({small}) | {f['peak_rss_mb']:.0f} | {f['peak_rss_mb'] / m:.2f} |",
              flush=True)
        for a, r in oracle.items():
            print(f"<!-- oracle on {a}: {r['ms']:.0f} ms/step, {r['peak_rss_mb']:.0f} MB -->")
    print(f"\ncompute_metrics on 1741x39 logits: {metrics_ms(args.repeats):.2f} ms (median)")


if __name__ == "__main__":
    main()
