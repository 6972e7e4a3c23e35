"""`training.compile` against eager: compile cost and steady-state epoch time.

Trains one configuration for two epochs with `c5snn.train.train_run` (real data, W=90, batch 64,
`--limit-train-batches` per epoch, full validation), eager and with each torch.compile mode
asked for. Epoch 1 includes compiling (train graph, the short last eval batch, eval graph);
epoch 2 is the steady state the other 18-odd epochs of a trial would see.

    .venv/bin/python benchmarks/bench_compile.py [--device cpu] [--modes default]
        [--config d64_h2_l2_direct] [--limit-train-batches 40]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_precision import run_parser, setup  # noqa: E402

from c5snn.train import train_run  # noqa: E402


def main() -> None:
    ap = run_parser(__doc__, "d64_h2_l2_direct", 0.8)
    ap.add_argument("--modes", default="default", help="comma-separated torch.compile modes")
    args = ap.parse_args()
    params, base, data = setup(args, epochs=2)
    print(f"# {args.config}, 2 epochs x {args.limit_train_batches} train batches + full val, "
          f"device {args.device}, torch {torch.__version__}, {args.threads} threads")
    print("| mode | epoch 1 s (with compiling) | epoch 2 s | best val recall@20 |")
    print("|---|---|---|---|")
    for mode in [None, *args.modes.split(",")]:
        run = train_run(params, dataclasses.replace(base, compile=mode), data, seed=42)
        e1, e2 = (r.seconds for r in run.history)
        print(f"| {mode or 'eager'} | {e1:.1f} | {e2:.1f} | {run.val['recall_at_20']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
