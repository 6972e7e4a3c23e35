"""Why c5snn's masks are uint8 multiplies: masking ops on a 10M-element fp32 tensor on this CPU.

Each op allocates its output, as in the model; the allocator is tuned as in c5snn's workers.

    .venv/bin/python benchmarks/bench_masks.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from c5snn.runtime import tune_cpu_allocator


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # freed outputs are reused, so page faults do not dominate the timing
    n = 10_000_000
    x = torch.randn(n)
    keep_bool = torch.rand(n) > 0.1
    keep_u8 = keep_bool.to(torch.uint8)
    keep_f32 = keep_bool.float()
    cases = {
        "x.masked_fill(~keep_bool, 0)": lambda: x.masked_fill(~keep_bool, 0.0),
        "torch.where(keep_bool, x, 0)": lambda: torch.where(keep_bool, x, 0.0),
        "x * keep_bool (mixed dtype)": lambda: x * keep_bool,
        "x * keep_u8 (mixed dtype)": lambda: x * keep_u8,
        "keep_u8.to(fp32).mul_(x) (c5snn)": lambda: keep_u8.to(torch.float32).mul_(x),
        "x * keep_f32 (same dtype)": lambda: x * keep_f32,
    }
    print("| op on 10M fp32 elements | median ms |")
    print("|---|---|")
    for name, fn in cases.items():
        print(f"| {name} | {median_ms(fn):.1f} |")


if __name__ == "__main__":
    main()
