"""c5snn command lines as users meet them (the README, docs/, the Slurm templates, the Kubernetes
manifests, the compose file), found and parsed with the real CLI without running them.

`parse` builds typer's command and lets it parse a command line as the shell would hand it
over: an unknown command or option, a value of the wrong type or a missing required option
raises typer's UsageError, exactly as `c5snn ...` would refuse it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer.main

from c5snn.cli import app


def parse(argv: list[str]) -> dict:
    """The parameters of the (sub)command `argv` names, parsed by the real CLI; raises typer's
    UsageError (or BadParameter) where `c5snn` would refuse the line."""
    command = typer.main.get_command(app)
    context = command.make_context("c5snn", list(argv))
    while hasattr(command, "resolve_command"):  # a group: descend into its subcommand
        rest = [*(getattr(context, "protected_args", None) or context._protected_args),
                *context.args]
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)
    return context.params


def _fill(text: str, values: dict[str, str], arrays: dict[str, list[str]]) -> str:
    """Shell text with its expansions replaced: arrays by their words, `${X:-d}` by d, `$X` by
    `values[X]` (or "x"), command and arithmetic substitutions by 1."""
    text = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: " ".join(map(shlex.quote, arrays.get(m[1], []))), text)
    text = re.sub(r"\$\(\(.*?\)\)|\$\([^)]*\)", "1", text)
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1]) or "x", text)


def env_defaults(path: Path) -> dict[str, str]:
    """`: "${VAR:=default}"` lines of a shell file: VAR -> default, earlier ones expanded."""
    values: dict[str, str] = {"HOME": "/home/user"}
    for name, default in re.findall(r'^: "\$\{(\w+):=(.*)\}"', path.read_text(), re.MULTILINE):
        values[name] = _fill(default, values, {})
    return values


def shell_commands(path: Path, values: dict[str, str]) -> list[list[str]]:
    """Every `c5snn ...` command line of a shell script, its variables set from `values`."""
    text = path.read_text()
    arrays = {name: shlex.split(words) for name, words in re.findall(r"\b(\w+)=\(([^)]+)\)", text)}
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("exec "):
            line = line[5:]
        if line.startswith("c5snn "):
            words = shlex.split(_fill(line, values, arrays))
            found.append([w for w in words[1:] if w != "&"])
    return found


def text_commands(text: str) -> list[list[str]]:
    """Every `c5snn ...` command line shown in Markdown code (blocks, or `inline`), with
    placeholders such as `N` or `...` as they are written."""
    found = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            line = re.sub(r"^(\$ |\.venv/bin/|[A-Z_]+=\S+ )+", "", line)
            if line.startswith("c5snn "):
                found.append(line)
    for inline in re.findall(r"`(c5snn [^`]+)`", text):
        found.append(inline)
    return [shlex.split(line)[1:] for line in found]
