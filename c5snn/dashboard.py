"""optuna-dashboard on a study's storage, and the notes it shows beside studies and trials."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna

from c5snn.errors import C5Error, OptionError
from c5snn.storage import Store


def write_note(target: optuna.Study | optuna.Trial, body: str) -> None:
    """A Markdown note for optuna-dashboard's study or trial page.

    The facts in a note are also user attrs; the note is their readable summary, written only
    where optuna-dashboard (the `dashboard` extra) is installed, since it owns the format.
    """
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    save_note(target, body)


def serve(store: Store, host: str, port: int, echo: Callable[[str], None], *,
          artifacts: Path) -> None:
    """Serve optuna-dashboard until interrupted (blocking), with the promote runs' files that
    workers uploaded to Optuna's artifact store under `artifacts`."""
    try:
        import optuna_dashboard
    except ImportError:
        raise C5Error(
            "optuna-dashboard is not installed; `pip install 'c5snn[dashboard]'` (make install does)"
        ) from None
    if not 1 <= port <= 65535:
        raise OptionError(f"--port must lie in 1..65535, got {port}")
    from c5snn.artifacts import optuna_artifact_store

    artifact_store = optuna_artifact_store(artifacts)
    echo(f"optuna-dashboard for {store.masked} at http://{host}:{port}/dashboard "
         f"(artifacts: {artifacts})")
    optuna_dashboard.run_server(store.optuna, host=host, port=port, artifact_store=artifact_store)
