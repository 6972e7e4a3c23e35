"""The package's architecture, checked: no import circle, the read side apart from the worker,
Optuna through its public API only."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "c5snn"
READ_SIDE = ("status", "export", "promote", "plots", "studies")


def import_graph() -> dict[str, set[str]]:
    """Module -> the c5snn modules it imports anywhere in its body (lazy imports included)."""
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("c5snn."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("c5snn.")}
        graph[name] = deps & set(modules)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "sweep" not in graph  # the old mixed module is gone
    circles = sorted(m for m in graph if m in reachable(graph, m))
    assert circles == []


def test_read_side_never_imports_the_worker():
    graph = import_graph()
    for module in READ_SIDE:
        assert "worker" not in reachable(graph, module), module



def test_no_private_optuna_api():
    """No module reaches into Optuna's private modules or attributes (its tables, `_storage`,
    `_study_id`): an Optuna upgrade must not be able to corrupt a study silently."""
    private = re.compile(r"optuna\.[\w.]*\._|\b_storage\b|\b_study_id\b|\b_trial_id\b|optuna_models")
    for path in PACKAGE.glob("*.py"):
        hits = [line for line in path.read_text().splitlines() if private.search(line)]
        assert not hits, (path.name, hits)
