"""Lower-precision modes against fp32: speed, and how far the results move.

For one configuration and seed, on the real data at W=90, batch 64:
1. the same weights (an fp32 model trained for `--epochs`) evaluated on val in fp32 and in each
   other mode: relative L2 deviation of the logits, recall@20, and the share of val windows
   whose top-20 set is unchanged;
2. a whole training run per mode (`c5snn.train.train_run` with `training.precision` set, same
   seed): seconds per epoch (train batches + full validation) and the best val recall@20.

Modes: fp32 and bf16 everywhere; tf32 only on CUDA (it is a CUDA matmul mode).

    .venv/bin/python benchmarks/bench_precision.py [--device cpu] [--epochs 3]
        [--limit-train-batches 40] [--config d64_h2_l2_rate] [--beta 0.95]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from c5snn.config import ModelParams, TrainingParams  # noqa: E402
from c5snn.data import WindowData, prepare  # noqa: E402
from c5snn.runtime import tune_cpu_allocator  # noqa: E402
from c5snn.train import evaluate, train_run  # noqa: E402

CONFIGS = {
    "d64_h2_l2_direct": dict(d_model=64, n_heads=2, n_layers=2, encoding="direct", timesteps=1),
    "d64_h2_l2_rate": dict(d_model=64, n_heads=2, n_layers=2, encoding="rate_coded", timesteps=10),
    "d64_h2_l6_rate": dict(d_model=64, n_heads=2, n_layers=6, encoding="rate_coded", timesteps=10),
}


def run_parser(doc: str, config: str, beta: float) -> argparse.ArgumentParser:
    """Arguments of the benchmarks that train one configuration with `train_run`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "CA5_matrix_binary.csv"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default=config, choices=sorted(CONFIGS))
    ap.add_argument("--beta", type=float, default=beta)
    ap.add_argument("--limit-train-batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def setup(args, epochs: int) -> tuple[ModelParams, TrainingParams, WindowData]:
    """Threads, allocator, the model params, fp32 eager training params and the real data."""
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        tune_cpu_allocator()
    cfg = CONFIGS[args.config]
    params = ModelParams(d_ffn=2 * cfg["d_model"], beta=args.beta, dropout=0.1,
                         max_window_size=100, **cfg)
    base = TrainingParams(epochs=epochs, learning_rate=1e-3, optimizer="adam",
                          early_stopping_patience=10, early_stopping_metric="val_recall_at_20",
                          batch_size=64, limit_train_batches=args.limit_train_batches)
    return params, base, prepare(Path(args.data), 90, (0.70, 0.15, 0.15), args.device)


def main() -> None:
    # beta 0.95 makes the net fire from the start; a silent net would hide any deviation
    ap = run_parser(__doc__, "d64_h2_l2_rate", 0.95)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    modes = ["fp32", "bf16"] + (["tf32"] if args.device.startswith("cuda") else [])
    params, base, data = setup(args, args.epochs)
    print(f"# {args.config}, beta {args.beta}, seed 42, {args.epochs} epochs x "
          f"{args.limit_train_batches} batches, "
          f"device {args.device} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, {args.threads} threads")

    runs = {}
    for mode in modes:
        runs[mode] = train_run(params, dataclasses.replace(base, precision=mode), data, seed=42)

    from c5snn.model import build_model

    model = build_model(params).to(args.device)
    model.load_state_dict(runs["fp32"].model_state)
    ref = evaluate(model, data, "val", 64, precision_mode="fp32")
    ref_top = ref.logits.topk(20, dim=1).indices.sort(dim=1).values
    print()
    print("| mode | s/epoch | best val recall@20 (own run) | same weights: logits rel. dev. "
          "| same weights: val recall@20 | same weights: top-20 sets unchanged "
          "| same weights: spike rate per block |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        ev = evaluate(model, data, "val", 64, precision_mode=mode)
        dev = ((ev.logits - ref.logits).norm() / ref.logits.norm()).item()
        top = ev.logits.topk(20, dim=1).indices.sort(dim=1).values
        same = (top == ref_top).all(dim=1).float().mean().item()
        run = runs[mode]
        epoch_s = sum(r.seconds for r in run.history) / run.epochs_run
        print(f"| {mode} | {epoch_s:.1f} | {run.val['recall_at_20']:.4f} | "
              f"{dev:.2e} | {ev.metrics['recall_at_20']:.4f} | {same:.1%} | "
              f"{', '.join(f'{r:.4f}' for r in ev.spike_rate)} |")


if __name__ == "__main__":
    main()
