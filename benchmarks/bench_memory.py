"""Where the training step's memory goes: live tensors against what the allocator keeps.

One configuration (default d64_h2_l6_rate, B=64, W=90, dropout 0.1, fp32), 1 warm-up + N
training steps, each variant in its own process:

- `jemalloc` - how c5snn's CPU workers run where libjemalloc is installed
  (`c5snn.runtime.cpu_allocator_env`: preloaded, freed pages kept);
- `glibc tuned` - the fallback (`c5snn.runtime.tune_cpu_allocator`: glibc keeps freed memory);
- `glibc defaults` - no tuning;
- `mmap every tensor` - `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4194304`: every tensor of
  4 MB or more is its own mapping, returned to the OS when freed, so peak RSS is the peak of
  live memory (at the price of page faults on every fresh tensor);
- the snntorch oracle under jemalloc and under tuned glibc, for the ratios.

Also reports the bytes autograd saves for backward in one forward (saved_tensors_hooks).

    .venv/bin/python benchmarks/bench_memory.py [--config d64_h2_l6_rate] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_model import CONFIGS  # noqa: E402

from c5snn.runtime import allocator_environments  # noqa: E402

VARIANTS = {  # name -> (model kind, tune_cpu_allocator, allocator environment)
    "c5snn, jemalloc (as CPU workers run)": ("fast", False, "jemalloc"),
    "c5snn, glibc tuned": ("fast", True, None),
    "c5snn, glibc defaults": ("fast", False, None),
    "c5snn, glibc mmap every tensor >= 4 MB": ("fast", False, "glibc.malloc.mmap_threshold=4194304"),
    "oracle, jemalloc": ("oracle", False, "jemalloc"),
    "oracle, glibc tuned": ("oracle", True, None),
}


def one(kind: str, tune: bool, config: str, steps: int, threads: int) -> dict:
    import torch

    from c5snn.model import SpikingTransformer
    from c5snn.reference import ReferenceSpikingTransformer
    from c5snn.runtime import tune_cpu_allocator

    if tune:
        tune_cpu_allocator()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = CONFIGS[config]
    kw = dict(cfg, d_ffn=2 * cfg["d_model"], beta=0.8, dropout=0.1)
    model = (SpikingTransformer if kind == "fast" else ReferenceSpikingTransformer)(**kw).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (torch.rand(64, 90, 39) < 5 / 39).float()
    y = (torch.rand(64, 39) < 5 / 39).float()
    start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        del loss
        times.append((time.perf_counter() - t0) * 1000)
    return {"ms": statistics.median(times[1:]), "start_mb": start_mb,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "saved_mb": sum(saved.values()) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="d64_h2_l6_rate", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, tune, _ = VARIANTS[args.one]
        print(json.dumps(one(kind, tune, args.config, args.steps, args.threads)))
        return
    print(f"# {args.config}, B=64, W=90, median of {args.steps} steps after one warm-up, "
          f"{args.threads} threads")
    print("| variant | ms/step | saved for backward MB | RSS before the model MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    envs = allocator_environments(os.environ)
    for name, (_, _, allocator) in VARIANTS.items():
        if allocator == "jemalloc" and allocator not in envs:
            print(f"| {name} | no libjemalloc on this machine | | | |")
            continue
        env = dict(envs["jemalloc" if allocator == "jemalloc" else "glibc"])
        if allocator not in (None, "jemalloc"):
            env["GLIBC_TUNABLES"] = allocator
        out = subprocess.run([sys.executable, __file__, "--one", name, "--config", args.config,
                              "--steps", str(args.steps), "--threads", str(args.threads)],
                             env=env, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['ms']:.0f} | {r['saved_mb']:.0f} | {r['start_mb']:.0f} | "
              f"{r['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
