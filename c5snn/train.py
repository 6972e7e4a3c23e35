"""One training run of one configuration and seed (DESIGN §3).

BCEWithLogits, Adam, training batches reshuffled each epoch by a generator seeded from the run's
seed, early stopping on val recall@20 (strictly greater improves) with patience, and the best
epoch's weights restored before the final evaluation. After every epoch the whole state (model,
optimizer, early-stopping state, every RNG) can be checkpointed, so a run stopped after epoch k
and resumed ends bitwise where an uninterrupted run ends (on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from c5snn.config import ModelParams, TrainingParams
from c5snn.data import WindowData
from c5snn.errors import TrainingDiverged, TrainingInterrupted, first_line
from c5snn.files import atomic_path
from c5snn.kernels import describe, differences
from c5snn.metrics import compute_metrics
from c5snn.model import build_model
from c5snn.runtime import check_device, precision, set_seed

CHECKPOINT_VERSION = 2  # 2: plain types only (weights_only=True loads it)


@dataclass
class EpochRecord:
    """What one finished epoch reports to callbacks (Optuna, progress bars)."""

    epoch: int  # 1-based
    train_loss: float
    val: dict[str, float]
    spike_rate: list[float]
    seconds: float
    improved: bool
    replayed: bool = False  # True when re-announced from a checkpoint on resume

    def line(self, epochs: int) -> str:
        """The progress line every run prints after an epoch."""
        mark = " *" if self.improved else ""
        return (f"  epoch {self.epoch}/{epochs} loss {self.train_loss:.4f} "
                f"val_recall@20 {self.val['recall_at_20']:.4f}{mark} ({self.seconds:.1f}s)")


@dataclass
class RunResult:
    seed: int
    best_epoch: int
    epochs_run: int
    val: dict[str, float]  # metrics of the best epoch's weights
    spike_rate: list[float]  # per block, on val, with the best weights
    training_time_s: float
    history: list[EpochRecord]
    model_state: dict
    optimizer_state: dict
    test: dict[str, float] | None = None
    test_logits: torch.Tensor | None = None  # (n_test, 39), when evaluated on test
    resumed_from_epoch: int | None = None
    discarded_checkpoint: str | None = None  # why an unusable checkpoint was set aside
    backend: dict = dataclasses.field(default_factory=dict)  # how it was computed (describe)
    backend_changes: list[str] | None = None  # resumed from a checkpoint computed otherwise


@dataclass
class Evaluation:
    metrics: dict[str, float]
    spike_rate: list[float]
    logits: torch.Tensor  # (n, 39) on CPU


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: WindowData,
    split: str,
    batch_size: int,
    limit_batches: int | None = None,
    precision_mode: str = "fp32",
) -> Evaluation:
    """Metrics and per-block spike rates of `model` on a split, in date order."""
    model.eval()
    logits, rates, targets = [], [], []
    for x, y in data.batches(split, batch_size, limit=limit_batches):
        with precision(precision_mode, x.device):
            out, rate = model(x, return_spike_rates=True)
        logits.append(out.float())  # bf16 logits would tie where fp32 ranks
        rates.append(rate * x.shape[0])
        targets.append(y)
    all_logits = torch.cat(logits)
    all_targets = torch.cat(targets)
    spike_rate = (torch.stack(rates).sum(dim=0) / all_logits.shape[0]).tolist()
    return Evaluation(
        compute_metrics(all_logits, all_targets), spike_rate, all_logits.float().cpu()
    )


def _rng_state(shuffle: torch.Generator) -> dict:
    """Every RNG a run draws from, in plain types and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict, shuffle: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path: Path, device: torch.device, seed: int, params: ModelParams,
                    on_discard: Callable[[str], None] | None = None) -> dict | None:
    """A point's per-epoch checkpoint, or None when there is none or it cannot be used.

    A checkpoint is a cache of progress: one that is damaged (truncated, garbled), needs more
    than plain types and tensors to load (`weights_only=True`: it may come from a shared folder)
    or belongs to another run is moved aside to `<name>.corrupt`, `on_discard` hears why, and
    the run starts from epoch 0. That costs time, never the point.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')}, not {CHECKPOINT_VERSION}")
        if state["seed"] != seed or state["params"] != dataclasses.asdict(params):
            raise ValueError("it belongs to another run (seed or configuration differ)")
        _ = state["model"], state["optimizer"], state["rng"], state["best"], state["history"]
    except Exception as exc:  # any way of being unreadable: set it aside, train from scratch
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        if on_discard is not None:
            on_discard(f"{path} unreadable ({type(exc).__name__}: {first_line(exc)}); moved to "
                       f"{aside.name}, training from epoch 0")
        return None
    return state


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a crash never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def compiled(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """`model` under `torch.compile(mode=mode)` with static shapes, or `model` itself for None.

    Shapes are static (`dynamic=False`): every full batch has one shape, and the short last batch
    of the train and eval splits (the same size every epoch) gets its own graph once, reused in
    later epochs instead of recompiled. The compile cache is cleared first because each trial
    builds a new model: without that a long-running worker would hit dynamo's recompile limit
    and silently fall back to eager.
    """
    if mode is None:
        return model
    torch._dynamo.reset()
    return torch.compile(model, mode=mode, dynamic=False)


def train_run(
    params: ModelParams,
    training: TrainingParams,
    data: WindowData,
    *,
    seed: int,
    evaluate_test: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint_path: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint_discarded: Callable[[str], None] | None = None,
    on_backend_change: Callable[[str], None] | None = None,
) -> RunResult:
    """Train one configuration with one seed; resume from `checkpoint_path` when it exists.

    `should_stop` is polled after every batch: when it returns True the run raises
    `TrainingInterrupted`, leaving the checkpoint of the last finished epoch. Test is evaluated
    only when `evaluate_test` (promote); screening never touches it. Checkpoints keep the
    backend record (`c5snn.kernels.describe`); a resume on another backend works and
    `on_backend_change` hears what changed (the result may then differ in its last bits from an
    uninterrupted run's).
    """
    device = data.device
    check_device(training, device)
    backend = describe(device, training.lif_kernel)
    set_seed(seed)
    model = build_model(params, lif_kernel=training.lif_kernel).to(device)
    net = compiled(model, training.compile)  # what runs batches; `model` owns the state dict
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    shuffle = torch.Generator()
    shuffle.manual_seed(seed)

    start_epoch, best_metric, best_epoch, bad_epochs, elapsed = 0, float("-inf"), 0, 0, 0.0
    best: dict = {}
    history: list[EpochRecord] = []
    resumed_from, discarded, changes = None, None, None

    def discard(reason: str) -> None:
        nonlocal discarded
        discarded = reason
        if on_checkpoint_discarded is not None:
            on_checkpoint_discarded(reason)

    state = read_checkpoint(checkpoint_path, device, seed, params, discard) if checkpoint_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"], shuffle)
        start_epoch, best_metric, best_epoch = state["epoch"], state["best_metric"], state["best_epoch"]
        bad_epochs, elapsed, best = state["bad_epochs"], state["elapsed"], state["best"]
        history = [EpochRecord(**record) for record in state["history"]]
        resumed_from = start_epoch
        changes = differences(state.get("backend", {}), backend) or None
        if changes and on_backend_change is not None:
            on_backend_change(f"resuming from epoch {start_epoch}, computed on another backend "
                              f"({'; '.join(changes)}); results may differ in the last bits")
        for record in history:
            if on_epoch is not None:
                on_epoch(dataclasses.replace(record, replayed=True))

    finished = start_epoch >= training.epochs or bad_epochs >= training.early_stopping_patience
    epoch = start_epoch
    while not finished:
        epoch += 1
        t0 = time.perf_counter()
        net.train()
        total, count = torch.zeros((), device=device), 0
        for x, y in data.batches(
            "train", training.batch_size, generator=shuffle, limit=training.limit_train_batches
        ):
            optimizer.zero_grad(set_to_none=True)
            with precision(training.precision, device):
                loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
            total += loss.detach() * x.shape[0]
            count += x.shape[0]
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(
                    f"stopped during epoch {epoch}; resumable from epoch {epoch - 1}"
                )
        train_loss = float(total / max(count, 1))  # one device sync per epoch
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"the training loss is {train_loss} in epoch {epoch}")
        ev = evaluate(net, data, "val", training.batch_size, training.limit_val_batches,
                      training.precision)
        metric = ev.metrics["recall_at_20"]
        improved = metric > best_metric
        if improved:
            best_metric, best_epoch, bad_epochs = metric, epoch, 0
            best = {
                "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict()),
                "val": ev.metrics,
                "spike_rate": ev.spike_rate,
            }
        else:
            bad_epochs += 1
        elapsed += time.perf_counter() - t0
        record = EpochRecord(
            epoch, train_loss, ev.metrics, ev.spike_rate,
            time.perf_counter() - t0, improved,
        )
        history.append(record)
        finished = epoch >= training.epochs or bad_epochs >= training.early_stopping_patience
        if checkpoint_path is not None:
            save_atomic(
                {
                    "version": CHECKPOINT_VERSION, "seed": seed, "params": dataclasses.asdict(params),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(shuffle), "epoch": epoch, "best_metric": best_metric,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "elapsed": elapsed,
                    "best": best, "history": [dataclasses.asdict(r) for r in history],
                    "backend": backend,
                },
                checkpoint_path,
            )
        if on_epoch is not None:
            on_epoch(record)

    model.load_state_dict(best["model"])
    result = RunResult(
        seed=seed,
        best_epoch=best_epoch,
        epochs_run=len(history),
        val=best["val"],
        spike_rate=best["spike_rate"],
        training_time_s=elapsed,
        history=history,
        model_state=best["model"],
        optimizer_state=best["optimizer"],
        resumed_from_epoch=resumed_from,
        discarded_checkpoint=discarded,
        backend=backend,
        backend_changes=changes,
    )
    if evaluate_test:
        ev = evaluate(net, data, "test", training.batch_size, training.limit_test_batches,
                      training.precision)
        result.test, result.test_logits = ev.metrics, ev.logits
    return result
