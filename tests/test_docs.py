"""The docs, kept honest where a machine can check them: every c5snn command line they show
parses with the real CLI, every C5SNN_* variable the code reads is in the README's table (and
only those), every study-file key in docs/configuration.md is the schema's (and all of them)."""

from __future__ import annotations

import re

import pytest
from cli_lines import options_exist, parse, text_commands
from conftest import ROOT
from typer._click.exceptions import UsageError

from c5snn.config import _SCHEMA

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_read_in_five_minutes():
    assert len((ROOT / "README.md").read_bytes()) <= 8 * 1024


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_command_line_shown_parses_with_the_real_cli(page):
    blocks, inline = text_commands(page.read_text())
    for argv in blocks:
        try:
            parse(argv)
        except UsageError as exc:
            pytest.fail(f"{page.name}: c5snn {' '.join(argv)}: {exc.format_message()}")
    for argv in inline:
        try:
            options_exist(argv)
        except UsageError as exc:
            pytest.fail(f"{page.name}: `c5snn {' '.join(argv)}`: {exc.format_message()}")


def test_a_renamed_option_in_a_shown_line_fails():
    blocks, inline = text_commands((ROOT / "README.md").read_text())
    assert len(blocks) >= 6 and len(inline) >= 12
    line = next(argv for argv in blocks if "--watch" in argv)
    parse(line)
    with pytest.raises(UsageError):
        parse([w.replace("--watch", "--watch-every") for w in line])
    with pytest.raises(UsageError):
        options_exist(["status", "--config", "F", "--repairs"])


def _variables(paths) -> set[str]:
    return {v for path in paths for v in re.findall(r"C5SNN_[A-Z_]+", path.read_text())}


def test_every_environment_variable_the_code_reads_is_in_the_readmes_table_and_no_other():
    code = [*(ROOT / "c5snn").rglob("*.py"), ROOT / "docker-compose.yml"]
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Environment variables"):readme.index("## Docs")]
    listed = set(re.findall(r"^\| `(C5SNN_[A-Z_]+)` \|", table, re.MULTILINE))
    assert listed == _variables(code)


def test_every_slurm_setting_has_its_default_in_the_templates():
    slurm = ROOT / "deploy" / "slurm"
    defaults = set(re.findall(r'\$\{(C5SNN_[A-Z_]+):=', "".join(
        p.read_text() for p in slurm.iterdir())))
    defaults |= {"C5SNN_SLURM_DIR"}  # set by submit.sh for the jobs it submits
    assert _variables(slurm.iterdir()) <= defaults | {"C5SNN_PG_BIN"}
    assert "C5SNN_PG_BIN" in (slurm / "postgres.sbatch").read_text()


def test_configuration_lists_every_study_file_key_and_no_other():
    page = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", page, re.MULTILINE))
    schema = {f"{section}.{key}" for section, keys in _SCHEMA.items() for key in keys}
    assert documented == schema
