"""The GPU check behind benchmarks/gpu_check.sh: epoch times, worker scaling, sweep estimate.

1. Correctness on the device: fast model vs the snntorch oracle (outputs and gradients).
2. Seconds per epoch (train at W=90, batch 64, plus full validation with metrics) of the three
   benchmark configurations, eager fp32.
3. The speed options of the study file on the story's best configuration (d64_h2_l6_rate): tf32,
   bf16, the Triton LIF (after checking it against the torch LIF on the GPU), torch.compile
   in reduce-overhead mode (CUDA graphs), with and without the Triton LIF: each in its own subprocess
   with a time limit, compile time reported apart, failures reported with their reason.
4. `c5snn workers -n K --gpus 0` for K in 1, 2, 4, 8 on a 16-point grid with a short budget:
   trials per hour.
5. An estimate of the whole phase-C sweep (72 screening + 15 promote trials at ~20 epochs) from
   those numbers.

Data: data/CA5_matrix_binary.csv (shipped with the project), else synthetic events of the same size
(timing does not depend on the values). `--quick` shrinks every budget for a CPU dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from c5snn.data import WindowData, load_events, make_splits, write_synthetic  # noqa: E402
from c5snn.model import SpikingTransformer  # noqa: E402
from c5snn.runtime import configure_threads, precision  # noqa: E402
from c5snn.train import evaluate  # noqa: E402

CONFIGS = {
    "d64_h2_l2_direct": dict(d_model=64, n_heads=2, n_layers=2, encoding="direct"),
    "d64_h2_l6_rate": dict(d_model=64, n_heads=2, n_layers=6, encoding="rate_coded"),
    "d128_h4_l6_rate": dict(d_model=128, n_heads=4, n_layers=6, encoding="rate_coded"),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_triton(device: str) -> str:
    try:
        from test_triton import check

        check(device)
        return "OK"
    except Exception as exc:  # report it; the eager numbers still stand
        return f"FAILED ({type(exc).__name__}: {str(exc)[:120]})"


def check_correctness(device: str) -> str:
    from helpers import make_it_fire

    from c5snn.reference import ReferenceSpikingTransformer

    kw = dict(d_model=64, n_heads=2, n_layers=6, d_ffn=128, beta=0.8, encoding="rate_coded",
              timesteps=4, dropout=0.0)
    torch.manual_seed(0)
    fast = make_it_fire(SpikingTransformer(**kw).to(device))
    oracle = ReferenceSpikingTransformer(**kw).to(device)
    oracle.load_state_dict(fast.state_dict())  # the same keys, strictly
    x = (torch.rand(8, 30, 39, device=device) < 5 / 39).float()
    a, b = fast(x), oracle(x)
    a.square().sum().backward()
    b.square().sum().backward()
    out_err = ((a - b).norm() / b.norm()).item()
    ref = dict(oracle.named_parameters())
    grad_err = max(((p.grad - ref[n].grad).norm() / ref[n].grad.norm()).item()
                   for n, p in fast.named_parameters())
    ok = out_err <= 1e-5 and grad_err <= 1e-4
    return f"{'OK' if ok else 'MISMATCH'} (output rel err {out_err:.1e}, worst grad {grad_err:.1e})"


def epoch_seconds(model, data, train_batches: int, device: str,
                  precision_mode: str = "fp32") -> tuple[float, float, float]:
    """(seconds for a full epoch extrapolated from `train_batches`, ms per batch, warm-up s).

    The warm-up (two batches and one validation pass) is where torch.compile compiles.
    """
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(0)
    batches = list(data.batches("train", 64, generator=gen, limit=train_batches + 2))

    def train(some):
        model.train()
        for x, y in some:
            opt.zero_grad(set_to_none=True)
            with precision(precision_mode, x.device):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    t_warm = time.perf_counter()
    train(batches[:2])
    evaluate(model, data, "val", 64, precision_mode=precision_mode)
    sync(device)
    warm = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    train(batches[2:])
    sync(device)
    per_batch = (time.perf_counter() - t0) / max(len(batches) - 2, 1)
    t1 = time.perf_counter()
    evaluate(model, data, "val", 64, precision_mode=precision_mode)
    sync(device)
    val = time.perf_counter() - t1
    n_train = -(-data.splits["train"].size // 64)
    return per_batch * n_train + val, per_batch * 1000, warm


VARIANTS = {  # name -> (precision, lif_kernel, torch.compile mode)
    "fp32 eager": ("fp32", "torch", None),
    "tf32": ("tf32", "torch", None),
    "bf16": ("bf16", "torch", None),
    "triton LIF": ("fp32", "triton", None),
    "compile reduce-overhead": ("fp32", "torch", "reduce-overhead"),
    "compile reduce-overhead + triton LIF": ("fp32", "triton", "reduce-overhead"),
}


def load_data(device: str, quick: bool):
    real = ROOT / "data" / "CA5_matrix_binary.csv"
    data_path = real if real.exists() else write_synthetic(
        Path(tempfile.mkdtemp()) / "synthetic.csv", rows=11692, seed=0)
    events = load_events(data_path)
    return data_path, events, WindowData(events, 90, make_splits(events, 90, (0.7, 0.15, 0.15)),
                                         device)


def one_variant(name: str, device: str, quick: bool) -> dict:
    """Epoch time of d64_h2_l6_rate under one speed option (run in a subprocess)."""
    mode, kernel, compile_mode = VARIANTS[name]
    _, _, data = load_data(device, quick)
    cfg = CONFIGS["d64_h2_l2_direct" if quick else "d64_h2_l6_rate"]  # quick: a CPU dry run
    torch.manual_seed(0)
    model = SpikingTransformer(**cfg, d_ffn=128, beta=0.8, dropout=0.1, lif_kernel=kernel).to(device)
    net = torch.compile(model, mode=compile_mode, dynamic=False) if compile_mode else model
    secs, ms, warm = epoch_seconds(net, data, 3 if quick else 20, device, mode)
    return {"secs": secs, "ms": ms, "warm": warm}


def options_table(device: str, quick: bool, say, limit_s: int) -> None:
    say(f"| {'d64_h2_l2_direct' if quick else 'd64_h2_l6_rate'} option | ms/batch | s/epoch | "
        "warm-up s (incl. compile) |")
    say("|---|---|---|---|")
    names = ["fp32 eager", "bf16"] if not device.startswith("cuda") else list(VARIANTS)
    for name in names:
        cmd = [sys.executable, __file__, "--device", device, "--variant", name]
        if quick:
            cmd.append("--quick")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or ["?"])[-1][:100]
                say(f"| {name} | failed: {why} | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            say(f"| {name} | {r['ms']:.1f} | {r['secs']:.1f} | {r['warm']:.0f} |")
        except subprocess.TimeoutExpired:
            say(f"| {name} | over {limit_s} s, not measured | | |")


def scaling(device: str, data_path: Path, quick: bool, counts: list[int]) -> dict[int, float]:
    """Trials per hour of `c5snn workers -n K` on a 16-point grid."""
    from conftest import study_dict, write_study

    tmp = Path(tempfile.mkdtemp())
    grid = {"n_layers": [2, 6], "n_heads": [2, 4], "d_model": [64, 128], "beta": [0.8],
            "encoding": ["direct", "rate_coded"]}
    training = {"epochs": 1, "limit_train_batches": 2 if quick else 10,
                "limit_val_batches": 1 if quick else 5}
    rates = {}
    for k in counts:
        study = write_study(tmp / f"s{k}.yaml", study_dict(
            data_path, name=f"scale-{k}", grid=grid, training=training,
            data={"window_size": 90, "batch_size": 64}))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "C5SNN_STORAGE": f"sqlite:///{tmp}/s{k}.db"}
        cmd = [sys.executable, "-m", "c5snn"]
        subprocess.run([*cmd, "study", "create", "--config", str(study)], env=env, check=True,
                       capture_output=True)
        gpus = ["--gpus", "0"] if device.startswith("cuda") else []
        t0 = time.perf_counter()
        subprocess.run([*cmd, "workers", "--config", str(study), "-n", str(k), *gpus,
                        "--artifacts", str(tmp / f"a{k}")], env=env, check=True,
                       capture_output=True)
        rates[k] = 16 / (time.perf_counter() - t0) * 3600
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (CPU dry run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the table")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = args.device
    configure_threads(None)  # as c5snn's training processes (denormals flushed on the CPU side)
    if args.variant:
        print(json.dumps(one_variant(args.variant, device, args.quick)))
        return
    lines = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    say(f"# gpu_check on {name}, torch {torch.__version__}, device {device}")
    say(f"correctness vs oracle on {device}: {check_correctness(device)}")

    if device.startswith("cuda"):
        say(f"Triton LIF vs torch LIF on {device}: {check_triton(device)}")
    data_path, events, data = load_data(device, args.quick)
    say(f"data: {data_path} ({events.rows} rows), W=90, batch 64")
    say("")
    say("| configuration | eager fp32 ms/batch | eager fp32 s/epoch |")
    say("|---|---|---|")
    n_batches = 3 if args.quick else 30
    epoch = {}
    for cname, cfg in CONFIGS.items():
        kw = dict(cfg, d_ffn=2 * cfg["d_model"], beta=0.8, dropout=0.1)
        torch.manual_seed(0)
        model = SpikingTransformer(**kw).to(device)
        secs, ms, _ = epoch_seconds(model, data, n_batches, device)
        epoch[cname] = secs
        say(f"| {cname} | {ms:.1f} | {secs:.1f} |")
    say("")
    options_table(device, args.quick, say, limit_s=60 if args.quick else 75)
    say("")
    counts = [1, 2] if args.quick else [1, 2, 4, 8]
    rates = scaling(device, data_path, args.quick, counts)
    say("| workers per GPU | trials/hour (16-point grid, short budget) | speed-up |")
    say("|---|---|---|")
    for k, rate in rates.items():
        say(f"| {k} | {rate:.0f} | {rate / rates[counts[0]]:.2f}x |")
    best = max(rates, key=rates.get)
    # Sweep estimate: each of the 72 points ~20 epochs; the three measured configs stand in for
    # their families (2-layer direct; 6-layer rate_coded at d=64 and d=128); promote adds 15
    # runs of the top configurations, taken at the 6-layer d=64 rate_coded cost (the story's best).
    direct, rate64, rate128 = (epoch[c] for c in CONFIGS)
    per_point = []
    for layers in (2, 4, 6):
        for d, rate in ((64, rate64), (128, rate128)):
            scale = layers / 6
            per_point += [direct * layers / 2 * (2 if d == 128 else 1), rate * scale]
    serial = sum(per_point) * 6 * 20 + 15 * rate64 * 20  # 12 (layers, d, enc) x 6 (heads, beta)
    parallel = serial / (rates[best] / rates[counts[0]])
    say("")
    say(f"estimated phase-C sweep (72 + 15 trials x 20 epochs): {serial / 3600:.2f} h with one "
        f"worker, {parallel / 60:.0f} min with {best} workers per GPU (goal: under 30 min on one "
        "H200; the original: 10.3 h on a B200)")
    out = Path(args.out) / "gpu_check.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
