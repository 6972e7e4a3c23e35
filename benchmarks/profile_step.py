"""Where one training step's time goes: torch profiler table of a c5snn step.

One warm-up step, then one profiled step (forward, BCEWithLogits, backward, Adam) at B=64, W=90,
dropout 0.1, on the allocator the process was started with, threads and denormals set as in
c5snn's training processes (`c5snn.runtime.configure_threads`).

    .venv/bin/python benchmarks/profile_step.py [--config d64_h2_l6_rate] [--rows 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_model import CONFIGS  # noqa: E402

from c5snn.model import SpikingTransformer  # noqa: E402
from c5snn.runtime import configure_threads, tune_cpu_allocator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="d64_h2_l6_rate", choices=sorted(CONFIGS))
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tune_cpu_allocator()
    configure_threads(args.threads)  # as c5snn's training processes: denormals flushed
    torch.manual_seed(0)
    cfg = CONFIGS[args.config]
    model = SpikingTransformer(**cfg, d_ffn=2 * cfg["d_model"], beta=0.8, dropout=0.1).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (torch.rand(64, 90, 39) < 5 / 39).float()
    y = (torch.rand(64, 39) < 5 / 39).float()

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()

    step()
    with profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
