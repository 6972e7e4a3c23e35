"""Study files: the one place that loads, validates and derives configuration.

A study file (YAML) describes a whole sweep: data, fixed model settings, the grid, training
budget, promote settings and outputs. `load_config` turns it into a frozen `StudyConfig` or raises
`StudyFileError` naming the file, the key and the rule. Everything downstream (trainer, workers,
promote, export) reads the validated object, never the raw YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from c5snn.data import file_sha256
from c5snn.errors import OptionError, StudyFileError
from c5snn.neuron import NEURON

# The five swept hyperparameters, in the order that defines config_id (DESIGN §4).
GRID_KEYS = ("n_layers", "n_heads", "d_model", "beta", "encoding")
ENCODINGS = ("direct", "rate_coded")
# Speed options (all off by default; fp32 eager torch is the reference the tests pin):
PRECISIONS = ("fp32", "tf32", "bf16")  # tf32: CUDA matmuls only; bf16: autocast, membranes fp32
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes
# triton: one fused kernel per LIF recurrence, CUDA only; snntorch: the step-by-step reference
LIF_KERNELS = ("torch", "triton", "snntorch")

MAX_NAME_LENGTH = 512  # Optuna's study_name column (and c5snn_claims.study)
MAX_SEED = 2**63 - 1

# Schema: section -> {key: (type(s), required)}. Types are checked after YAML parsing.
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "study": {"name": ((str,), True), "storage": ((str, type(None)), False)},
    "data": {
        "path": ((str,), True),
        "window_size": ((int,), True),
        "split_ratios": ((list,), True),
        "batch_size": ((int,), True),
    },
    "model": {
        "type": ((str,), True),
        "timesteps": ((int,), True),
        "dropout": ((float, int), True),
        "max_window_size": ((int,), True),
        "surrogate": ((str,), True),
        "d_ffn_multiplier": ((int,), True),
    },
    "grid": {k: ((list,), True) for k in GRID_KEYS},
    "training": {
        "epochs": ((int,), True),
        "learning_rate": ((float, int), True),
        "optimizer": ((str,), True),
        "early_stopping_patience": ((int,), True),
        "early_stopping_metric": ((str,), True),
        "limit_train_batches": ((int, type(None)), False),
        "limit_val_batches": ((int, type(None)), False),
        "limit_test_batches": ((int, type(None)), False),
        "precision": ((str,), False),
        "compile": ((str, type(None)), False),
        "lif_kernel": ((str,), False),
    },
    "promote": {
        "top_k": ((int,), True),
        "seeds": ((list,), True),
        "screening_seed": ((int,), True),
    },
    "output": {"dir": ((str,), False)},
}


@dataclass(frozen=True)
class ModelParams:
    """Everything `SpikingTransformer` needs for one run (one grid point)."""

    d_model: int
    n_heads: int
    n_layers: int
    d_ffn: int
    beta: float
    encoding: str
    timesteps: int  # T actually simulated: 1 for direct, the study's timesteps for rate_coded
    dropout: float
    max_window_size: int

    def describe(self) -> str:
        """The story's progress label: `d=64 h=2 l=2 b=0.50 enc=direct`."""
        return (
            f"d={self.d_model} h={self.n_heads} l={self.n_layers} "
            f"b={self.beta:.2f} enc={self.encoding}"
        )


@dataclass(frozen=True)
class TrainingParams:
    epochs: int
    learning_rate: float
    optimizer: str
    early_stopping_patience: int
    early_stopping_metric: str
    batch_size: int
    limit_train_batches: int | None = None  # None: the whole split, every epoch
    limit_val_batches: int | None = None  # val windows scored each epoch (first batches)
    limit_test_batches: int | None = None  # promote's test windows (first batches)
    precision: str = "fp32"
    compile: str | None = None  # a torch.compile mode, or None for eager
    lif_kernel: str = "torch"

    @property
    def is_full(self) -> bool:
        """Whether runs see whole splits (the story's budget), not a smoke-scale slice."""
        return (self.limit_train_batches, self.limit_val_batches, self.limit_test_batches) == (
            None, None, None)

    def describe_budget(self) -> str:
        """How much each run sees, in one line: '2 epochs x 2 batches of 32; val: first 64 windows
        per epoch; test: all windows' (closing tables and the top-K JSON print it)."""
        def windows(limit: int | None) -> str:
            return "all windows" if limit is None else f"first {limit * self.batch_size} windows"

        epochs = (f"up to {self.epochs} epochs (early stopping, patience "
                  f"{self.early_stopping_patience})" if self.epochs > self.early_stopping_patience
                  else f"{self.epochs} epoch{'s' if self.epochs > 1 else ''}")
        train = ("all train windows" if self.limit_train_batches is None else
                 f"{self.limit_train_batches} batch{'es' if self.limit_train_batches > 1 else ''} "
                 f"of {self.batch_size}")
        return (f"{epochs} x {train}; val: {windows(self.limit_val_batches)} per epoch; "
                f"test: {windows(self.limit_test_batches)}")


@dataclass(frozen=True)
class StudyConfig:
    """A validated study file."""

    source: Path
    raw: dict[str, Any]  # the validated mapping, as loaded (after overrides)
    name: str
    storage: str | None
    data_path: Path
    window_size: int
    split_ratios: tuple[float, float, float]
    model: dict[str, Any]
    grid: dict[str, tuple]
    training: TrainingParams
    top_k: int
    seeds: tuple[int, ...]
    screening_seed: int
    output_dir: Path | None  # where export writes unless --output says otherwise
    overrides: tuple[str, ...] = ()  # the --set assignments applied on load, for child processes

    @functools.cached_property
    def definition(self) -> dict[str, Any]:
        """What defines a study's results: data (by content: its sha256, not its path), window,
        splits, model, grid, training and promote settings. Not the study's name or storage URL,
        not the output folder: moving the data or the database does not change a study."""
        defining = {k: v for k, v in self.raw.items() if k not in ("study", "output")}
        data = {k: v for k, v in defining["data"].items() if k != "path"}
        defining["data"] = {**data, "sha256": file_sha256(self.data_path)}
        return json.loads(json.dumps(defining, sort_keys=True))  # canonical: what storage returns

    @property
    def content_hash(self) -> str:
        """sha256 of the definition (comments, key order and paths do not matter)."""
        canonical = json.dumps(self.definition, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def check_top_k(self, top_k: int | None = None) -> int:
        """`top_k` (default: the file's) if it fits the grid, else StudyFileError. Checked when
        a sweep starts, not on load: `c5snn train` pins the grid to one point."""
        top_k = self.top_k if top_k is None else top_k
        if not 1 <= top_k <= self.n_points:
            raise StudyFileError(f"{self.source}: promote.top_k / --top-k must lie in "
                                 f"1..{self.n_points} (the grid's points), got {top_k}")
        return top_k

    def sweep_csv(self, option: Path | None) -> Path:
        """Where export writes the sweep CSV: --output, else the study's output.dir, else results/."""
        if option is not None:
            return option
        return (self.output_dir or Path("results")) / "phase_c_sweep.csv"

    @property
    def n_points(self) -> int:
        return len(self.grid_points())

    def grid_points(self) -> list[dict[str, Any]]:
        """All combinations in `itertools.product` order; the list index is the config_id."""
        values = [self.grid[k] for k in GRID_KEYS]
        return [dict(zip(GRID_KEYS, combo, strict=True)) for combo in itertools.product(*values)]

    def config_id(self, params: dict[str, Any]) -> int:
        point = {k: params[k] for k in GRID_KEYS}
        try:
            return self.grid_points().index(point)
        except ValueError:
            raise StudyFileError(f"{self.source}: {point} is not a point of the grid") from None

    def model_params(self, point: dict[str, Any]) -> ModelParams:
        """The full model configuration of one grid point (d_ffn and T derived here only)."""
        return ModelParams(
            d_model=int(point["d_model"]),
            n_heads=int(point["n_heads"]),
            n_layers=int(point["n_layers"]),
            d_ffn=int(point["d_model"]) * self.model["d_ffn_multiplier"],
            beta=float(point["beta"]),
            encoding=str(point["encoding"]),
            timesteps=self.model["timesteps"] if point["encoding"] == "rate_coded" else 1,
            dropout=float(self.model["dropout"]),
            max_window_size=self.model["max_window_size"],
        )


def resolve_path(source: Path, value: str) -> Path:
    """A path written in a study file: relative paths are relative to the study file's folder
    (as docker compose resolves paths in its file), so a study runs from any working directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(source.parent.absolute() / path))


def _resolve_sqlite(source: Path, url: str | None) -> str | None:
    """`study.storage`: a relative SQLite file path resolves like any other path in the file."""
    if url is None or not url.startswith("sqlite:///"):
        return url
    database, sep, query = url[len("sqlite:///"):].partition("?")
    if not database or database == ":memory:" or Path(database).is_absolute():
        return url
    return f"sqlite:///{resolve_path(source, database)}{sep}{query}"


def _fail(source: Path, key: str, rule: str) -> StudyFileError:
    return StudyFileError(f"{source}: key '{key}': {rule}")


def _apply_override(raw: dict, source: Path, assignment: str) -> None:
    """`--set key=value`: a grid key pins that grid axis to one value; `section.key` sets a field."""
    if "=" not in assignment:
        raise _fail(source, assignment, "an override must look like key=value")
    key, text = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise _fail(source, key, f"--set value {text!r} is not a YAML value") from None
    if key in GRID_KEYS:
        raw.setdefault("grid", {})[key] = [value]
        return
    if key.count(".") != 1:
        raise _fail(source, key, f"unknown override; use one of {GRID_KEYS} or section.key")
    section, field = key.split(".")
    if section not in _SCHEMA or field not in _SCHEMA[section]:
        raise _fail(source, key, "unknown key")
    if not isinstance(raw.get(section), dict):
        raw[section] = {}
    raw[section][field] = value


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> StudyConfig:
    """Load and validate a study file; `overrides` are `key=value` strings applied first."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise StudyFileError(f"{source}: cannot read study file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise StudyFileError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise StudyFileError(f"{source}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise StudyFileError(f"{source}: a study file must be a mapping of sections")
    raw = copy.deepcopy(raw)
    for assignment in overrides or []:
        _apply_override(raw, source, assignment)
    _check_schema(raw, source)
    return dataclasses.replace(_build(raw, source), overrides=tuple(overrides or ()))


def _check_schema(raw: dict, source: Path) -> None:
    for section in raw:
        if section not in _SCHEMA:
            raise _fail(source, section, f"unknown section (expected one of {sorted(_SCHEMA)})")
    for section, fields in _SCHEMA.items():
        body = raw.get(section)
        if body is None and not any(required for _, required in fields.values()):
            body = raw[section] = {}  # a section of optional keys may be left out
        if body is None:
            raise _fail(source, section, "missing section")
        if not isinstance(body, dict):
            raise _fail(source, section, "must be a mapping")
        for key in body:
            if key not in fields:
                raise _fail(source, f"{section}.{key}", "unknown key")
        for key, (types, required) in fields.items():
            if key not in body:
                if required:
                    raise _fail(source, f"{section}.{key}", "missing")
                continue
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, types):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise _fail(source, f"{section}.{key}", f"must be {names}, got {value!r}")


def _positive(source: Path, key: str, value: Any, minimum: int = 1) -> None:
    if value < minimum:
        raise _fail(source, key, f"must be >= {minimum}, got {value}")


def _build(raw: dict, source: Path) -> StudyConfig:
    study, data, model, grid = raw["study"], raw["data"], raw["model"], raw["grid"]
    training, promote = raw["training"], raw["promote"]

    if not study["name"].strip():
        raise _fail(source, "study.name", "must not be empty")
    if len(study["name"]) > MAX_NAME_LENGTH:
        raise _fail(source, "study.name", f"must be at most {MAX_NAME_LENGTH} characters "
                                          f"(Optuna's limit), got {len(study['name'])}")
    ratios = data["split_ratios"]
    if len(ratios) != 3 or not all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios
    ):
        raise _fail(source, "data.split_ratios", "must be three positive numbers (train, val, test)")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise _fail(source, "data.split_ratios", f"must sum to 1, got {sum(ratios)}")
    _positive(source, "data.batch_size", data["batch_size"])
    _positive(source, "data.window_size", data["window_size"])
    if model["type"] != "spiking_transformer":
        raise _fail(source, "model.type", "only 'spiking_transformer' is supported")
    if model["surrogate"] != NEURON.surrogate:  # the one neuron c5snn defines (c5snn.neuron)
        raise _fail(source, "model.surrogate", f"only '{NEURON.surrogate}' is supported")
    _positive(source, "model.timesteps", model["timesteps"])
    _positive(source, "model.max_window_size", model["max_window_size"])
    _positive(source, "model.d_ffn_multiplier", model["d_ffn_multiplier"])
    if not 0 <= model["dropout"] < 1:
        raise _fail(source, "model.dropout", f"must be in [0, 1), got {model['dropout']}")
    if data["window_size"] > model["max_window_size"]:
        raise _fail(
            source,
            "data.window_size",
            f"{data['window_size']} exceeds model.max_window_size {model['max_window_size']}",
        )

    for key in GRID_KEYS:
        values = grid[key]
        if not values:
            raise _fail(source, f"grid.{key}", "must list at least one value")
        if len(set(values)) != len(values):
            raise _fail(source, f"grid.{key}", f"has duplicate values {values}")
    for key in ("n_layers", "n_heads", "d_model"):
        for v in grid[key]:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(source, f"grid.{key}", f"values must be positive integers, got {v!r}")
    for v in grid["beta"]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise _fail(source, "grid.beta", f"values must be numbers in [0, 1], got {v!r}")
    for v in grid["encoding"]:
        if v not in ENCODINGS:
            raise _fail(source, "grid.encoding", f"values must be one of {ENCODINGS}, got {v!r}")
    for d in grid["d_model"]:
        for h in grid["n_heads"]:
            if d % h:
                raise _fail(source, "grid.n_heads", f"n_heads={h} does not divide d_model={d}")

    _positive(source, "training.epochs", training["epochs"])
    _positive(source, "training.early_stopping_patience", training["early_stopping_patience"])
    if not math.isfinite(training["learning_rate"]) or training["learning_rate"] <= 0:
        raise _fail(source, "training.learning_rate",
                    f"must be a finite number > 0, got {training['learning_rate']}")
    if training["optimizer"] != "adam":
        raise _fail(source, "training.optimizer", "only 'adam' is supported")
    if training["early_stopping_metric"] != "val_recall_at_20":
        raise _fail(source, "training.early_stopping_metric", "only 'val_recall_at_20' is supported")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if training.get(key) is not None:
            _positive(source, f"training.{key}", training[key])
    for key, allowed in (("precision", PRECISIONS), ("compile", COMPILE_MODES + (None,)),
                         ("lif_kernel", LIF_KERNELS)):
        if key in training and training[key] not in allowed:
            names = ", ".join("null" if a is None else a for a in allowed)
            raise _fail(source, f"training.{key}", f"must be one of {names}, got {training[key]!r}")

    seeds = promote["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(source, "promote.seeds", "must be a non-empty list of integers")
    for key, values in (("promote.seeds", seeds),
                        ("promote.screening_seed", [promote["screening_seed"]])):
        for seed in values:
            if not 0 <= seed <= MAX_SEED:
                raise _fail(source, key, f"seeds must lie in 0..{MAX_SEED}, got {seed}")
    if len(set(seeds)) != len(seeds):
        raise _fail(source, "promote.seeds", f"has duplicates {seeds}")
    _positive(source, "promote.top_k", promote["top_k"])

    return StudyConfig(
        source=source,
        raw=raw,
        name=study["name"],
        storage=_resolve_sqlite(source, study.get("storage")),
        data_path=resolve_path(source, data["path"]),
        window_size=data["window_size"],
        split_ratios=tuple(float(r) for r in ratios),
        model=dict(model),
        grid={k: tuple(grid[k]) for k in GRID_KEYS},
        training=TrainingParams(
            epochs=training["epochs"],
            learning_rate=float(training["learning_rate"]),
            optimizer=training["optimizer"],
            early_stopping_patience=training["early_stopping_patience"],
            early_stopping_metric=training["early_stopping_metric"],
            batch_size=data["batch_size"],
            limit_train_batches=training.get("limit_train_batches"),
            limit_val_batches=training.get("limit_val_batches"),
            limit_test_batches=training.get("limit_test_batches"),
            precision=training.get("precision", "fp32"),
            compile=training.get("compile"),
            lif_kernel=training.get("lif_kernel", "torch"),
        ),
        top_k=promote["top_k"],
        seeds=tuple(seeds),
        screening_seed=promote["screening_seed"],
        output_dir=resolve_path(source, raw["output"]["dir"]) if "dir" in raw["output"] else None,
    )


def parse_seeds(text: str) -> tuple[int, ...]:
    """`"42,123,7"` -> (42, 123, 7), with a clear error for anything else."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise OptionError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise OptionError(f"--seeds: expected distinct integers, got {text!r}")
    for seed in seeds:
        check_seed(seed, "--seeds")
    return seeds


def check_seed(seed: int, option: str) -> int:
    """Seeds seed python, numpy and torch: 0..2**63-1 is what all three take."""
    if not 0 <= seed <= MAX_SEED:
        raise OptionError(f"{option} must lie in 0..{MAX_SEED}, got {seed}")
    return seed


def snapshot(config: StudyConfig, params: ModelParams, seed: int,
             backend: dict | None = None) -> dict[str, Any]:
    """A self-describing record of one run, written as config_snapshot.yaml and in checkpoints:
    its configuration, and how it was computed (`c5snn.kernels.describe`)."""
    return {
        "study": config.name,
        "study_hash": config.content_hash,
        "data": {
            "path": str(config.data_path),
            "window_size": config.window_size,
            "split_ratios": list(config.split_ratios),
        },
        "model": {"type": "spiking_transformer", **asdict(params)},
        "training": asdict(config.training),
        "seed": seed,
        "backend": backend or {},
    }


def definition_changes(stored: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) for each setting that differs, as `section.key`."""
    changes = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += definition_changes(a, b, name + ".")
        elif a != b:
            changes.append((name, a, b))
    return changes
