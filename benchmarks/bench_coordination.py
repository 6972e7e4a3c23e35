"""Cost of the sweep machinery alone: 72 trials whose training is a ~0 s stub.

Each trial still does everything a real one does against the database: claim (stale-lease
check, attempt scan, INSERT), create the Optuna trial, its user attrs, one intermediate value,
the result attrs, tell, release the claim, and a heartbeat thread. Reports the wall time and
the worker time spent claiming and running trials (not process start-up, not idle polling while
the last trials finish elsewhere), per trial.

    .venv/bin/python benchmarks/bench_coordination.py --storage sqlite:////tmp/coord.db --workers 2
    .venv/bin/python benchmarks/bench_coordination.py \\
        --storage postgresql+psycopg://postgres@127.0.0.1:5432/test --workers 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stub_train(params, training, data, *, seed, evaluate_test, on_epoch, checkpoint_path,
               should_stop, **_):
    from c5snn.train import EpochRecord, RunResult

    val = {"recall_at_5": 0.13, "recall_at_20": 0.51, "hit_at_5": 0.5, "hit_at_20": 0.98,
           "mrr": 0.31}
    on_epoch(EpochRecord(1, 0.69, val, [0.1, 0.1], 0.0, True))
    return RunResult(seed=seed, best_epoch=1, epochs_run=1, val=val, spike_rate=[0.1, 0.1],
                     training_time_s=0.0, history=[], model_state={}, optimizer_state={})


def work(study_path: str, url: str, name: str, artifacts: str, out) -> None:
    from c5snn.config import load_config
    from c5snn.storage import Store
    from c5snn.worker import Attempt, Worker

    config = load_config(study_path)
    worker = Worker(config, Store(url), name=name, artifacts=Path(artifacts), echo=lambda _: None,
                    train_fn=stub_train)
    worker._data = object()  # the stub never touches data
    busy = [0.0, 0.0]  # wall, CPU of this process

    def timed(method):
        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                busy[0] += time.perf_counter() - t0
                busy[1] += time.process_time() - c0
        return wrapper

    worker.claim = timed(worker.claim)  # claim (incl. stale check) ...
    Attempt.open = timed(Attempt.open)  # ... create the trial ...
    Attempt.run = timed(Attempt.run)  # ... heartbeat, report, attrs, tell
    ran = worker.run()
    out.put((name, ran, busy[0], busy[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import study_dict, write_study

    from c5snn.config import load_config
    from c5snn.data import write_synthetic
    from c5snn.storage import Store
    from c5snn.studies import create_screening

    tmp = Path(tempfile.mkdtemp())
    data = write_synthetic(tmp / "e.csv", rows=300, seed=0)
    study = write_study(tmp / "s.yaml", study_dict(data, name=f"coord-{uuid.uuid4().hex[:8]}"))
    create_screening(load_config(study), Store(args.storage))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=work, args=(str(study), args.storage, f"w{i}", str(tmp / "a"), out))
             for i in range(args.workers)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    trials = sum(r[1] for r in results)
    busy = sum(r[2] for r in results)
    cpu = sum(r[3] for r in results)
    backend = args.storage.split(":", 1)[0]
    print(f"{backend}, {args.workers} workers: {trials} trials in {wall:.2f} s wall "
          f"(incl. process start); per trial {busy / trials * 1000:.1f} ms of worker time in "
          f"claim + run (stub training ~0 ms), of which {cpu / trials * 1000:.1f} ms on its CPU; "
          f"{wall / trials * 1000:.1f} ms of wall time")


if __name__ == "__main__":
    main()
