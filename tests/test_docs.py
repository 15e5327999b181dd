"""The README must keep telling the truth about fields, commands, schema and exit codes."""

import re
from pathlib import Path

from harness import cli, results
from harness.spec import ENVIRONMENT_FIELDS, FORMATS, SWEEP_FIELDS, TIMEOUT_FIELDS

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_results_schema_table_matches_the_code():
    assert results.schema_markdown() in README


def test_every_sweep_and_environment_field_is_documented():
    for name in (*SWEEP_FIELDS, *TIMEOUT_FIELDS):
        assert re.search(rf"^\s*{re.escape(name)}:", README, re.M), f"sweep field {name} missing from README"
    for name in ENVIRONMENT_FIELDS:
        assert f"| `{name}` |" in README, f"environment field {name} missing from README"
    for fmt in FORMATS:
        assert f"| `{fmt}` |" in README


def test_every_command_and_exit_code_is_documented():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for command in sub.choices:
        assert f"harness {command}" in README, command
    for code in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_INVALID, cli.EXIT_INFRA, cli.EXIT_INTERRUPTED):
        assert f"| {code} |" in README


def test_quick_start_is_the_two_make_targets():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make demo" in quick and "make test" in quick
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    assert "scenarios/sweeps/quickstart.yaml" in makefile


def test_every_cpu_isa_level_is_documented():
    from harness.isa import ISA_LEVELS

    row = next(line for line in README.splitlines() if line.startswith("| `cpu_isa` |"))
    for level in ISA_LEVELS:
        assert f"`{level}`" in row, level
