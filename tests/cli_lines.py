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


def text_commands(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """The `c5snn ...` command lines shown in Markdown: (those in code blocks, written out in
    full, and those in inline code, which may name a command with some of its options only)."""
    blocks, fenced = [], False
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        line = re.sub(r"^(\$ |\.venv/bin/|[A-Z_]+=\S+ )+", "", line.split(" #")[0].strip())
        if fenced and line.startswith("c5snn "):
            blocks.append(shlex.split(line)[1:])
    inline = [shlex.split(span)[1:] for span in re.findall(r"`(c5snn [^`]+)`", text)]
    return blocks, inline


def options_exist(argv: list[str]) -> None:
    """Raise UsageError unless `argv` names a command and every option it shows is one of that
    command's (values are not checked: an inline mention may show a part of a command line)."""
    from typer._click.exceptions import UsageError

    command = typer.main.get_command(app)
    words = list(argv)
    while hasattr(command, "resolve_command"):
        name, *words = words
        found = command.get_command(None, name)
        if found is None:
            raise UsageError(f"no command {name!r}")
        command = found
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in words:
        option = word.split("=")[0]
        if option.startswith("-") and option not in known | {"--help"}:
            raise UsageError(f"no option {option!r} of {command.name}")
