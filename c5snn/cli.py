"""The `c5snn` command line: thin typer commands over the library.

Each command parses options and calls one library function. Library code raises `C5Error`s;
`main()` turns them into a one-line `error: ...` on stderr and exit code 1 (set C5SNN_DEBUG=1
for the traceback). Options that several commands share (storage, artifacts, the lease settings
and budgets, GPUs and threads) are declared once, as `OptionSet`s that `shares` adds to each
command that takes them.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from c5snn.errors import C5Error
from c5snn.lease import Budget, Timing

app = typer.Typer(
    help="Spiking-transformer hyperparameter sweeps on CA5 events, as a crash-safe service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Validate or synthesize CA5 event files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
study_app = typer.Typer(help="Create and inspect sweep studies.", no_args_is_help=True)
app.add_typer(study_app, name="study")


@dataclass(frozen=True)
class OptionSet:
    """Options declared once and shared by several commands: `options` maps a parameter name to
    (its annotated type, its default); `build` turns their values into the one value a command
    receives."""

    options: dict[str, tuple[Any, Any]]
    build: Callable[..., Any]


def shares(**sets: OptionSet) -> Callable:
    """Add each set's options to a command's signature; the command receives what the set
    builds from their values as the keyword argument named like the set."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in sets]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                   default=default)
                 for option_set in sets.values() for name, (annotation, default) in
                 option_set.options.items()]

        @functools.wraps(command)
        def wrapper(**values):
            built = {key: option_set.build(**{name: values.pop(name) for name in option_set.options})
                     for key, option_set in sets.items()}
            return command(**values, **built)

        params = sorted(own + added, key=lambda p: p.kind)
        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _opt(help: str, *names: str) -> Any:
    return typer.Option(*names, help=help)


ConfigOpt = Annotated[Path, _opt("Study file (YAML).", "--config", "-c")]
SetOpt = Annotated[list[str] | None, _opt(
    "Override: a grid key (d_model=64) or section.key=value.", "--set")]
DeviceOpt = Annotated[str, _opt("Torch device: cpu, cuda or cuda:N.")]
ThreadsOpt = Annotated[int | None, _opt(
    "Torch CPU threads per process (default: the cores this process may use, shared among "
    "CPU workers; 1 per GPU worker).")]

STORAGE = OptionSet({"storage": (Annotated[str | None, _opt(
    "SQLAlchemy URL; default $C5SNN_STORAGE, then the study file, then "
    "sqlite:///storage/c5snn.db.")], None)}, lambda storage: storage)


def _artifacts(artifacts: Path | None) -> Path:
    from c5snn.artifacts import artifacts_root

    return artifacts_root(artifacts)


ARTIFACTS = OptionSet({"artifacts": (Annotated[Path | None, _opt(
    "The artifacts folder every worker writes checkpoints and run directories to, wherever "
    "this machine mounts it; default $C5SNN_ARTIFACTS, then storage/artifacts.")], None)},
    _artifacts)
_BUDGET_DEFAULTS = Budget()
BUDGET = OptionSet({
    "max_attempts": (Annotated[int, _opt(
        "Failed attempts (the trial's own fault: it raised, ran out of GPU memory, diverged) "
        "before a point is given up.")], _BUDGET_DEFAULTS.max_attempts),
    "max_disruptions": (Annotated[int, _opt(
        "Attempts lost to a dead or frozen worker (killed, node lost, frozen past --grace) "
        "before a point is given up.")], _BUDGET_DEFAULTS.max_disruptions),
}, Budget)
_TIMING_DEFAULTS = Timing()
GRACE = OptionSet({"grace": (Annotated[float, _opt(
    "Seconds without a heartbeat before an attempt counts as dead (its worker's).")],
    _TIMING_DEFAULTS.grace_s)}, lambda grace: grace)
LEASE = OptionSet({
    "heartbeat": (Annotated[float, _opt("Seconds between a worker's heartbeats.")],
                  _TIMING_DEFAULTS.heartbeat_s),
    **GRACE.options,
    "db_outage_tolerance": (Annotated[float, _opt(
        "Seconds a worker keeps retrying while the database is unreachable before it exits 1 "
        "(its point is retried later).")], _TIMING_DEFAULTS.db_outage_tolerance_s),
    **BUDGET.options,
}, lambda heartbeat, grace, db_outage_tolerance, max_attempts, max_disruptions: Timing(
    heartbeat_s=heartbeat, grace_s=grace, db_outage_tolerance_s=db_outage_tolerance,
    budget=Budget(max_attempts, max_disruptions)))


def _pool(gpus: str | None, threads: int | None) -> dict:
    from c5snn.launcher import parse_gpus

    return {"gpus": parse_gpus(gpus), "threads": threads}


POOL = OptionSet({
    "gpus": (Annotated[str | None, _opt(
        "GPU ids, e.g. 0,1 (workers round-robin over them, several per GPU), or 'all': every "
        "GPU this process sees (CUDA_VISIBLE_DEVICES, as Slurm and Kubernetes set it).")], None),
    "threads": (ThreadsOpt, None),
}, _pool)


def _echo(line: str) -> None:
    typer.echo(line)


@data_app.command("validate")
def data_validate(path: Annotated[Path, typer.Argument(help="CA5 CSV file.")]) -> None:
    """Check every rule of the CA5 format; print a summary, or every error and exit 1."""
    from c5snn.data import load_events

    s = load_events(path).summary()
    _echo(
        f"{s['file']}: OK, {s['rows']} rows, {s['first_date']} .. {s['last_date']}; "
        f"rarest part {s['rarest_part'][0]} ({s['rarest_part'][1]}x), "
        f"commonest part {s['commonest_part'][0]} ({s['commonest_part'][1]}x)"
    )


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Where to write the CSV.")],
    rows: Annotated[int, typer.Option(help="Number of events.")] = 1200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write SYNTHETIC uniform-random 5-of-39 events in CA5_matrix_binary.csv format.

    For demos and tests only: the data carries no signal, so every model should score chance.
    """
    from c5snn.data import write_synthetic

    write_synthetic(out, rows, seed)
    _echo(f"wrote {rows} synthetic events to {out}")


@app.command()
def train(
    config: ConfigOpt,
    run_dir: Annotated[Path, typer.Option(help="Directory for the run's outputs.")],
    set_: SetOpt = None,
    seed: Annotated[int, typer.Option(help="Run seed.")] = 42,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
) -> None:
    """Train one grid point (pin each grid key with --set) and write its run directory."""
    from c5snn.runtime import reexec_with_jemalloc

    if device == "cpu":
        reexec_with_jemalloc()  # before anything is allocated; returns when not possible

    from c5snn.runs import train_one

    result = train_one(
        config, set_ or [], seed=seed, device=device, threads=threads, run_dir=run_dir, echo=_echo
    )
    metrics = " ".join(f"{k}={v:.4f}" for k, v in result.val.items())
    _echo(f"best epoch {result.best_epoch}/{result.epochs_run}: val {metrics}")
    _echo(f"wrote {run_dir}")


def _open(config: Path, overrides: list[str] | None, storage: str | None, **store_options):
    """The study file (with the overrides its study was created with, then these) and its
    storage: what every command that works on an existing or new study starts from."""
    from c5snn.config import load_config
    from c5snn.storage import open_store
    from c5snn.studies import with_stored_overrides

    cfg = load_config(config, overrides or [])
    store = open_store(storage, cfg.storage, **store_options)
    return with_stored_overrides(cfg, store), store


@study_app.command("create")
@shares(storage=STORAGE)
def study_create(config: ConfigOpt, storage: str | None) -> None:
    """Create the screening study (GridSampler over the grid), or open it if it exists."""
    from c5snn.studies import create_screening

    cfg, store = _open(config, None, storage)
    _, created = create_screening(cfg, store)
    verb = "created" if created else "exists:"
    _echo(f"{verb} study '{cfg.name}' ({cfg.n_points} points, hash {cfg.content_hash}) "
          f"in {store.masked}")


@app.command()
@shares(storage=STORAGE, artifacts=ARTIFACTS, timing=LEASE)
def worker(
    config: ConfigOpt,
    storage: str | None,
    artifacts: Path,
    timing: Timing,
    set_: SetOpt = None,
    device: DeviceOpt = "cpu",
    max_trials: Annotated[int | None, typer.Option(help="Stop after this many trials.")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name in logs and status.")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Pull and train points until none is left; SIGTERM/Ctrl-C releases the current one."""
    import socket

    from c5snn.runtime import allocator, reexec_with_jemalloc

    if device == "cpu":
        reexec_with_jemalloc()  # before anything is allocated; returns when not possible

    from c5snn.runtime import configure_threads
    from c5snn.worker import StopFlag, Worker

    configure_threads(threads)
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    cfg, store = _open(config, set_, storage, outage_tolerance_s=timing.db_outage_tolerance_s,
                       echo=_echo, application=f"worker {name}")
    _echo(f"worker {name} on {device} ({allocator()} allocator), storage {store.masked}")
    stop = StopFlag().install()
    ran = Worker(cfg, store, name=name, device=device, artifacts=artifacts, timing=timing,
                 echo=_echo, stop=stop).run(max_trials)
    _echo(f"worker {name}: {ran} trial(s) done; {'stopped on request' if stop() else 'no work left'}")


@app.command()
@shares(storage=STORAGE, artifacts=ARTIFACTS, timing=LEASE, pool=POOL)
def workers(
    config: ConfigOpt,
    storage: str | None,
    artifacts: Path,
    timing: Timing,
    pool: dict,
    n: Annotated[int, typer.Option("-n", "--n", help="Number of worker processes.")] = 2,
) -> None:
    """Start N local worker processes (several per GPU allowed) and wait for them."""
    from c5snn.config import load_config
    from c5snn.launcher import launch, worker_args

    args = worker_args(load_config(config), timing, artifacts)
    code = launch(args, n, **pool, echo=_echo, storage_url=storage)
    raise typer.Exit(code)


@app.command()
@shares(storage=STORAGE, artifacts=ARTIFACTS, budget=BUDGET, grace=GRACE)
def status(
    config: ConfigOpt,
    storage: str | None,
    artifacts: Path,
    budget: Budget,
    grace: float,
    watch: Annotated[float | None, typer.Option(help="Refresh every N seconds.")] = None,
    repair: Annotated[bool, typer.Option(
        help="Settle what dead workers (or an older c5snn) left: mark attempts silent for "
             "--grace stale, FAIL RUNNING trials without a live claim; one line per fix.")] = False,
) -> None:
    """Trials per state, running trials and their workers, failing points with both budgets, ETA."""
    import time

    from c5snn.status import format_status, repair_study
    from c5snn.studies import SweepState

    cfg, store = _open(config, None, storage)
    if repair:
        fixes = repair_study(cfg, store, grace)
        for line in fixes:
            _echo(f"fixed: {line}")
        _echo(f"repair: {len(fixes)} fix(es)")
    while True:
        text = format_status(SweepState.read(cfg, store, budget), store.masked, artifacts)
        if watch:
            typer.clear()
        _echo(text)
        if not watch:
            return
        time.sleep(watch)


TopKOpt = Annotated[int | None, _opt("Configurations to promote (default: study file).")]
SeedsOpt = Annotated[str | None, _opt("Promote seeds, e.g. 42,123,7 (default: study file).")]
OutputOpt = Annotated[Path | None, _opt(
    "Sweep CSV; the JSON, best/ and meta go next to it (default: the study file's "
    "output.dir/phase_c_sweep.csv, else results/phase_c_sweep.csv).")]


@app.command()
@shares(storage=STORAGE, artifacts=ARTIFACTS, budget=BUDGET)
def promote(
    config: ConfigOpt,
    storage: str | None,
    artifacts: Path,
    budget: Budget,
    top_k: TopKOpt = None,
    seeds: SeedsOpt = None,
    allow_partial: Annotated[bool, typer.Option(help="Promote before screening ends.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait until workers finish the promote trials and "
                                            "their run directories are under --artifacts; exit 1 "
                                            "naming any point given up.")] = False,
) -> None:
    """Create the promote study: the top-K screening configs x seeds, run by the workers on test."""
    from c5snn.config import parse_seeds
    from c5snn.promote import promote as create_promote
    from c5snn.promote import wait_for_promote

    cfg, store = _open(config, None, storage)
    k = top_k or cfg.top_k
    seed_list = parse_seeds(seeds) if seeds else cfg.seeds
    study, created = create_promote(cfg, store, top_k=k, seeds=seed_list, allow_partial=allow_partial)
    n = len(study.user_attrs["points"])
    _echo(f"{'created' if created else 'exists:'} promote study '{study.study_name}' "
          f"({n} trials: top {k} x seeds {','.join(map(str, seed_list))})")
    if wait:
        done = wait_for_promote(cfg, store, budget=budget, artifacts=artifacts, echo=_echo)
        _echo(f"promote complete: {done}/{n}")


@app.command()
@shares(storage=STORAGE, artifacts=ARTIFACTS)
def export(
    config: ConfigOpt,
    storage: str | None,
    artifacts: Path,
    output: OutputOpt = None,
    plots: Annotated[bool, typer.Option(help="Also write HTML figures (needs plotly).")] = False,
    force: Annotated[bool, typer.Option(help="Replace a folder or foreign files where the "
                                             "outputs go (refused otherwise).")] = False,
    require_promote: Annotated[bool, typer.Option(
        help="Exit 1 (writing nothing) unless promote is complete, instead of writing the CSV "
             "alone: for a scheduler's dependent export job.")] = False,
) -> None:
    """Write the sweep CSV and, once promote is done, the top-K JSON, best checkpoint and meta."""
    from c5snn.export import export as do_export
    from c5snn.export import top_table

    cfg, store = _open(config, None, storage)
    written = do_export(cfg, store, cfg.sweep_csv(output), artifacts=artifacts, plots=plots,
                        force=force, require_promote=require_promote)
    _echo(written["leaderboard"])
    if "report" in written:
        _echo(top_table(written["report"]))
    _echo("wrote " + ", ".join(str(written[k]) for k in ("csv", "top", "best", "meta") if k in written))


@app.command("phase-c-sweep")
@shares(storage=STORAGE, artifacts=ARTIFACTS, timing=LEASE, pool=POOL)
def phase_c_sweep(
    config: ConfigOpt,
    storage: str | None,
    artifacts: Path,
    timing: Timing,
    pool: dict,
    output: OutputOpt = None,
    top_k: TopKOpt = None,
    seeds: SeedsOpt = None,
    screening_seed: Annotated[int | None, typer.Option(help="Screening seed (default: study file).")] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes.")] = 2,
) -> None:
    """Run the spiking transformer sweep end to end: screen, promote top-K, re-run, export."""
    from c5snn.config import parse_seeds
    from c5snn.pipeline import phase_c_sweep as run

    overrides = [f"promote.screening_seed={screening_seed}"] if screening_seed is not None else []
    cfg, store = _open(config, overrides, storage)
    run(
        cfg, store, output=cfg.sweep_csv(output), top_k=top_k or cfg.top_k,
        seeds=parse_seeds(seeds) if seeds else cfg.seeds, n_workers=workers, **pool,
        artifacts=artifacts, timing=timing, echo=_echo,
    )


@app.command()
@shares(storage=STORAGE, artifacts=ARTIFACTS)
def dashboard(
    config: ConfigOpt,
    storage: str | None,
    artifacts: Path,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
) -> None:
    """Serve optuna-dashboard on the study's storage, with the promote runs' files."""
    from c5snn.dashboard import serve

    cfg, store = _open(config, None, storage, application="dashboard")
    serve(store, host, port, _echo, artifacts=artifacts)


def main() -> None:
    """Console entry point: the one place errors become messages and exit codes.

    A library error (`C5Error`) or a usage error (an unknown option, a value of the wrong type)
    is one line on stderr and exit code 1; C5SNN_DEBUG=1 shows the traceback instead.
    """
    try:
        code = app(standalone_mode=False)
    except (C5Error, typer.TyperException) as exc:
        if os.environ.get("C5SNN_DEBUG"):
            raise
        message = exc.format_message() if isinstance(exc, typer.TyperException) else str(exc)
        if not message.strip():  # a bare group (`c5snn`, `c5snn data`): its help was shown
            sys.exit(2)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(1)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
