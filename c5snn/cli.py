"""The `c5snn` command line: thin typer commands over the library.

Each command parses options and calls one library function. Library code raises `C5Error`s;
`main()` turns them into a one-line `error: ...` on stderr and exit code 1 (set C5SNN_DEBUG=1
for the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from c5snn.errors import C5Error

app = typer.Typer(
    help="Spiking-transformer hyperparameter sweeps on CA5 events, as a crash-safe service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Validate or synthesize CA5 event files.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Study file (YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override: a grid key (d_model=64) or section.key=value."),
]
DeviceOpt = Annotated[str, typer.Option(help="Torch device: cpu, cuda or cuda:N.")]
ThreadsOpt = Annotated[
    int | None, typer.Option(help="Torch CPU threads for this process (default: torch's).")
]


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
    from c5snn.runs import train_one

    result = train_one(
        config, set_ or [], seed=seed, device=device, threads=threads, run_dir=run_dir, echo=_echo
    )
    metrics = " ".join(f"{k}={v:.4f}" for k, v in result.val.items())
    _echo(f"best epoch {result.best_epoch}/{result.epochs_run}: val {metrics}")
    _echo(f"wrote {run_dir}")


def main() -> None:
    """Console entry point: the one place errors become messages and exit codes."""
    try:
        app()
    except C5Error as exc:
        if os.environ.get("C5SNN_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
