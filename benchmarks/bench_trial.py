"""One epoch of a trial (train + validation + metrics) on the real data: c5snn vs a baseline.

c5snn: the package's device-resident `WindowData` (index-gather batches from the (rows, 39)
matrix), `SpikingTransformer` and `evaluate` (vectorized metrics). Baseline: what a
straightforward pipeline does, the original's way: the step-by-step snntorch reference model
(`c5snn/reference.py`), a `torch.utils.data.DataLoader` over materialized (N, W, 39) windows,
per-sample metrics in a Python loop, validation every epoch. Each pipeline runs in its own
subprocess of this command (so each peak RSS is its own) on the same machine, data, batch size
and thread count.

Allocators: c5snn runs as its CPU workers do (on jemalloc where libjemalloc is installed, else
glibc tuned by `tune_cpu_allocator`). The baseline runs under both tuned glibc and jemalloc, and
c5snn is compared with the baseline's better run in each column: its faster epoch, its smaller
peak RSS. Both flush denormals to zero, as c5snn's training processes do
(`c5snn.runtime.configure_threads`).

    .venv/bin/python benchmarks/bench_trial.py [--data data/CA5_matrix_binary.csv]
        [--limit-train-batches 20] [--threads 2]
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
}
W, BATCH, RATIOS = 90, 64, (0.70, 0.15, 0.15)


def _per_sample_metrics(logits, targets) -> dict:
    out = {k: [] for k in ("recall_at_5", "recall_at_20", "hit_at_5", "hit_at_20", "mrr")}
    for row, true in zip(logits.tolist(), targets.tolist(), strict=True):
        ranked = sorted(range(39), key=lambda j: -row[j])
        truth = [j for j in range(39) if true[j] > 0]
        for k in (5, 20):
            found = len(set(truth) & set(ranked[:k]))
            out[f"recall_at_{k}"].append(found / len(truth))
            out[f"hit_at_{k}"].append(float(found > 0))
        out["mrr"].append(1 / (min(ranked.index(j) for j in truth) + 1))
    return {k: sum(v) / len(v) for k, v in out.items()}


def train_batches(model, opt, loss_fn, batches, limit: int | None) -> list[float]:
    """Train on up to `limit` batches; returns each step's milliseconds."""
    model.train()
    times = []
    for i, (x, y) in enumerate(batches):
        if limit is not None and i >= limit:
            break
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def run(kind: str, name: str, data_path: str, limit: int | None, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from c5snn.data import load_events, make_splits
    from c5snn.runtime import configure_threads, set_seed, tune_cpu_allocator

    tune_cpu_allocator()  # glibc's setting (a no-op for allocation under jemalloc)
    configure_threads(threads)  # both pipelines: c5snn's thread and denormal settings
    set_seed(42)
    cfg = CONFIGS[name]
    kw = dict(cfg, d_ffn=2 * cfg["d_model"], beta=0.8, dropout=0.1)
    events = load_events(data_path)
    splits = make_splits(events, W, RATIOS)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t_epoch = time.perf_counter()
    if kind == "c5snn":
        from c5snn.data import WindowData
        from c5snn.model import SpikingTransformer
        from c5snn.train import evaluate

        data = WindowData(events, W, splits, "cpu")
        model = SpikingTransformer(**kw)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(42)
        batch_ms = train_batches(model, opt, loss_fn, data.batches("train", BATCH, generator=gen),
                                 limit)
        t_val = time.perf_counter()
        metrics = evaluate(model, data, "val", BATCH).metrics
    else:
        import numpy as np
        from torch.utils.data import DataLoader, TensorDataset

        from c5snn.reference import ReferenceSpikingTransformer

        p = events.matrix.astype(np.float32)
        n = events.rows - W
        windows = np.stack([p[t : t + W] for t in range(n)])  # (N, W, 39) materialized
        targets = p[W:]
        tr, va = splits["train"], splits["val"]
        train = DataLoader(TensorDataset(torch.from_numpy(windows[tr.start:tr.stop]),
                                         torch.from_numpy(targets[tr.start:tr.stop])),
                           batch_size=BATCH, shuffle=True)
        val = DataLoader(TensorDataset(torch.from_numpy(windows[va.start:va.stop]),
                                       torch.from_numpy(targets[va.start:va.stop])),
                         batch_size=BATCH)
        model = ReferenceSpikingTransformer(**kw)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batch_ms = train_batches(model, opt, loss_fn, train, limit)
        t_val = time.perf_counter()
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x) for x, _ in val])
        metrics = _per_sample_metrics(logits, torch.from_numpy(targets[va.start:va.stop]))
    end = time.perf_counter()
    return {
        "epoch_s": end - t_epoch,
        "train_batch_ms_median": statistics.median(batch_ms),
        "val_s": end - t_val,
        "batches": len(batch_ms),
        "val_recall_at_20": metrics["recall_at_20"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "CA5_matrix_binary.csv"))
    ap.add_argument("--limit-train-batches", type=int, default=20,
                    help="train batches per epoch for the 6-layer rate_coded configuration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=3, metavar=("KIND", "CONFIG", "LIMIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, name, limit = args.one
        print(json.dumps(run(kind, name, args.data, None if limit == "all" else int(limit),
                             args.threads)))
        return
    print(f"machine: {platform.machine()}, {args.threads} torch threads, "
          f"python {platform.python_version()}; data {args.data}, W={W}, batch {BATCH}")
    allocators = allocator_environments(os.environ)
    c5snn_allocator = "jemalloc" if "jemalloc" in allocators else "glibc"
    print(f"c5snn on {c5snn_allocator}; baseline on {' and '.join(allocators)} (its better run "
          "per column)")
    print("| configuration | train batches | baseline s/epoch | c5snn s/epoch | speed-up | "
          "baseline ms/batch | c5snn ms/batch | baseline val+metrics s | c5snn val+metrics s | "
          "baseline peak RSS MB | c5snn peak RSS MB | memory ratio |")
    print("|---" * 12 + "|")
    for name in CONFIGS:
        limit = "all" if "l2" in name else str(args.limit_train_batches)

        def one(kind: str, allocator: str, name=name, limit=limit) -> dict:
            out = subprocess.run(
                [sys.executable, __file__, "--one", kind, name, limit, "--data", args.data,
                 "--threads", str(args.threads)], check=True, capture_output=True, text=True,
                env=allocators[allocator])
            return json.loads(out.stdout.strip().splitlines()[-1])

        base = {a: one("baseline", a) for a in allocators}
        c = one("c5snn", c5snn_allocator)
        fast = min(base, key=lambda a: base[a]["epoch_s"])
        small = min(base, key=lambda a: base[a]["peak_rss_mb"])
        b = base[fast]
        print(f"| {name} | {c['batches']} | {b['epoch_s']:.1f} ({fast}) | {c['epoch_s']:.1f} | "
              f"{b['epoch_s'] / c['epoch_s']:.2f}x | {b['train_batch_ms_median']:.0f} | "
              f"{c['train_batch_ms_median']:.0f} | {b['val_s']:.1f} | {c['val_s']:.1f} | "
              f"{base[small]['peak_rss_mb']:.0f} ({small}) | {c['peak_rss_mb']:.0f} | "
              f"{c['peak_rss_mb'] / base[small]['peak_rss_mb']:.2f} |", flush=True)
        for a, r in base.items():
            print(f"<!-- baseline on {a}: {r['epoch_s']:.1f} s/epoch, "
                  f"{r['train_batch_ms_median']:.0f} ms/batch, {r['peak_rss_mb']:.0f} MB -->")


if __name__ == "__main__":
    main()
