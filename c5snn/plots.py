"""`c5snn export --plots`: HTML figures beside the CSV (optuna.visualization, plotly)."""

from __future__ import annotations

from pathlib import Path

import optuna

from c5snn.errors import C5Error


def write_plots(study: optuna.Study, folder: Path, stem: str, report: dict | None) -> list[Path]:
    """Parallel coordinates, parameter importances and learning curves of screening; the top-K
    test recall@20 (mean ± std over seeds) against chance and the frequency baseline."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise C5Error("--plots needs plotly: `pip install 'c5snn[plots]'` (make install does)") from None
    figures = {
        "parallel_coordinates": optuna.visualization.plot_parallel_coordinate(study),
        "param_importances": optuna.visualization.plot_param_importances(study),
        "intermediate_values": optuna.visualization.plot_intermediate_values(study),
    }
    if report is not None:
        names = [m["name"] for m in report["models"]]
        fig = go.Figure(go.Bar(
            x=names, y=[m["metrics_mean"]["recall_at_20"] for m in report["models"]],
            error_y={"type": "data", "array": [m["metrics_std"]["recall_at_20"]
                                               for m in report["models"]]},
            name="test recall@20 (mean ± std over seeds)",
        ))
        fig.add_hline(y=report["chance"]["recall_at_20"], line_dash="dash",
                      annotation_text="chance 20/39")
        fig.add_hline(y=report["frequency_baseline"]["metrics"]["recall_at_20"],
                      line_dash="dot", annotation_text="frequency baseline")
        fig.update_layout(title="Top-K on test", yaxis_title="recall@20")
        figures["topk_test_recall"] = fig
    written = []
    for name, fig in figures.items():
        path = folder / f"{stem}_{name}.html"
        fig.write_html(path, include_plotlyjs="cdn")
        written.append(path)
    return written
