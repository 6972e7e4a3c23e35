"""The package's architecture, checked: no import circle, the read side apart from the worker,
Optuna through its public API only."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "c5snn"
READ_SIDE = ("status", "export", "promote", "plots", "studies")


def import_graph() -> dict[str, set[str]]:
    """Module -> the c5snn modules it imports anywhere in its body (lazy imports included); a
    subpackage (kernels) is one node, its modules' imports its own."""
    files = {p.stem: [p] for p in PACKAGE.glob("*.py")}
    files |= {d.name: list(d.glob("*.py")) for d in PACKAGE.iterdir() if (d / "__init__.py").exists()}
    graph = {}
    for name, paths in files.items():
        deps = set()
        for node in (n for path in paths for n in ast.walk(ast.parse(path.read_text()))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("c5snn."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "c5snn":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("c5snn.")}
        graph[name] = (deps & set(files)) - {name}
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
    for path in PACKAGE.rglob("*.py"):
        hits = [line for line in path.read_text().splitlines() if private.search(line)]
        assert not hits, (path.name, hits)


def test_the_compiled_code_sits_behind_one_boundary():
    """Only c5snn.kernels loads or calls the compiled operators; the rest of the package goes
    through it (the model reads its routes and backend record)."""
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert "torch.ops.c5snn" not in text and "cpp_extension" not in text, path.name
    graph = import_graph()
    assert "kernels" in graph["model"]
    assert reachable(graph, "kernels") <= {"errors", "files", "neuron"}  # below the model
