"""`training.compile` against eager: compile cost and steady-state epoch time.

Trains one configuration for two epochs with `c5snn.train.train_run` (real data, W=90, batch 64,
`--limit-train-batches` per epoch, full validation), eager and with each torch.compile mode
asked for. Epoch 1 includes compiling (train graph, the short last eval batch, eval graph);
epoch 2 is the steady state the other 18-odd epochs of a trial would see.

    .venv/bin/python benchmarks/bench_compile.py [--device cpu] [--modes default]
        [--config d64_h2_l2_direct] [--limit-train-batches 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_precision import CONFIGS  # noqa: E402

from c5snn.config import ModelParams, TrainingParams  # noqa: E402
from c5snn.data import prepare  # noqa: E402
from c5snn.runtime import tune_cpu_allocator  # noqa: E402
from c5snn.train import train_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/CA5_matrix_binary.csv"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="d64_h2_l2_direct", choices=sorted(CONFIGS))
    ap.add_argument("--modes", default="default", help="comma-separated torch.compile modes")
    ap.add_argument("--limit-train-batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        tune_cpu_allocator()
    cfg = CONFIGS[args.config]
    params = ModelParams(d_ffn=2 * cfg["d_model"], beta=0.8, dropout=0.1, max_window_size=100, **cfg)
    base = TrainingParams(epochs=2, learning_rate=1e-3, optimizer="adam",
                          early_stopping_patience=10, early_stopping_metric="val_recall_at_20",
                          batch_size=64, limit_train_batches=args.limit_train_batches)
    data = prepare(Path(args.data), 90, (0.70, 0.15, 0.15), args.device)
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
