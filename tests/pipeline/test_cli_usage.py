"""Usage errors of the `symzoo` command line: one line on stderr naming the command's --help, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("args", "says"), [
    (["validate"], "Missing argument 'study_file'. (see symzoo validate --help)"),
    (["validate", "study.yaml", "--bogus"], "No such option: --bogus (see symzoo validate --help)"),
    (["ls", "a", "b"], "Got unexpected extra argument(s) (b) (see symzoo ls --help)"),
    (["tasks", "digits", "foo"], "Got unexpected extra argument(s) (foo) (see symzoo tasks --help)"),
    (["valdiate"], "No such command 'valdiate'. Did you mean 'validate'? (see symzoo --help)"),
    (["report", "store", "--out"], "Option '--out' requires an argument. (see symzoo --help)"),
])
def test_a_usage_error_is_one_line_naming_the_commands_help(args, says):
    r = CliRunner().invoke(app, args, prog_name="symzoo")
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == [f"error: {says}"], r.stderr
    assert r.stdout == ""


def test_help_and_version_still_exit_0():
    runner = CliRunner()
    for args in (["--help"], ["tasks", "--help"], ["--version"]):
        r = runner.invoke(app, args, prog_name="symzoo")
        assert r.exit_code == 0 and r.stdout.strip() and r.stderr == "", (args, r.output)


def test_a_commands_own_error_keeps_its_exit_code_through_the_group(tmp_path):
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "missing.yaml")], prog_name="symzoo")
    assert r.exit_code == 2 and r.stderr.splitlines() == [f"error: study file '{tmp_path / 'missing.yaml'}' does not exist"]


def test_the_real_command_line_prints_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipeline", "validate", "x.yaml", "--bogus"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert p.returncode == 2 and p.stderr.splitlines() == ["error: No such option: --bogus (see python -m pipeline validate --help)"], p.stderr
    assert list(tmp_path.iterdir()) == []
