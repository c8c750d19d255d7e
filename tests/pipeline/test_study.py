"""Study files: valid ones load; each kind of bad input names its key path, the value and what is allowed."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.study import StudyError, load_study  # noqa: F401
from zoos.spec import expand

GOOD = {
    "study": "tiny",
    "zoos": [{"name": "mlp", "task": {"name": "digits"}, "arch": {"name": "mlp", "config": {"width": 16, "depth": 1}},
              "grid": {"seed": [0, 1], "lr": [0.01]}, "epochs": 2}],
    "analysis": [{"stage": "equivariance"}],
}


def write(tmp_path, data, name="study.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def with_(path, value):
    """GOOD with one key path replaced."""
    import copy

    d = copy.deepcopy(GOOD)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


def test_good_study_loads_and_validate_prints_the_zoos(tmp_path):
    s = load_study(write(tmp_path, GOOD))
    assert s.study == "tiny" and s.zoos[0].name == "mlp"
    r = CliRunner().invoke(app, ["validate", str(write(tmp_path, GOOD))])
    assert r.exit_code == 0, r.output
    assert "mlp" in r.output and "digits" in r.output
    r = CliRunner().invoke(app, ["validate", str(write(tmp_path, with_(("zoos", 0, "population_size"), "auto")))])
    assert r.exit_code == 0 and "auto" in r.output, r.output


@pytest.mark.parametrize(
    "data, expected",
    [
        ("study: x\nzoos: [\n", "malformed YAML at line"),
        (with_(("zoos", 0, "task", "name"), "nope"), "unknown task 'nope'"),
        (with_(("zoos", 0, "arch", "name"), "nope"), "unknown architecture 'nope'"),
        (with_(("zoos", 0, "grid", "colour"), ["red"]), "colour"),
        (with_(("zoos", 0, "grid", "lr"), [-1.0]), "zoos[0].grid.lr[0]"),
        (with_(("zoos", 0, "epochs"), -3), "zoos[0].epochs"),
        (with_(("zoos", 0, "grid", "seed"), []), "zoos[0].grid.seed"),
        (with_(("zoos", 0, "epochs"), "many"), "zoos[0].epochs"),
        (with_(("study",), "../escape"), "study"),
        (with_(("zoos", 0, "name"), "../escape"), "zoos[0].name"),
        (with_(("analysis", 0, "stage"), "dance"), "unknown stage 'dance'"),
        ({**GOOD, "resources": {"compile": "sometimes"}}, "resources.compile"),
        (with_(("analysis", 0, "samples"), 0), "analysis[0].samples: must be >= 1 (got 0)"),
        (with_(("analysis",), [{"stage": "equivariance", "zoos": ["ghost"]}]), "ghost"),
        (with_(("zoos", 0, "population_size"), "big"), "zoos[0].population_size"),
        (with_(("zoos", 0, "population_size"), 0), "zoos[0].population_size"),
        (with_(("model_runs",), "some"), "model_runs"),
        (with_(("analysis",), [{"stage": "equivariance"}, {"stage": "equivariance", "samples": 64}]),
         "analysis[1].stage: stage 'equivariance' is listed twice (analysis[0]); a study runs each stage once"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(tmp_path, data, expected):
    path = write(tmp_path, data)
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 2, r.output
    assert expected in r.output


def test_a_bad_field_does_not_hide_a_bad_task_or_architecture_in_the_same_zoo(tmp_path):
    """pydantic stops at a field's error before the zoo's cross-field checks; the task's and architecture's names
    and keys are still checked, so one pass names them all (and a task that parses is not reported twice)."""
    zoo = {**GOOD["zoos"][0], "epochs": 0, "task": {"name": "digitz"}, "arch": {"name": "cnn", "config": {"widht": 4}}}
    r = CliRunner().invoke(app, ["validate", str(write(tmp_path, {**GOOD, "zoos": [zoo]}))])
    assert r.exit_code == 2, r.output
    lines = r.output.splitlines()
    assert [line.split(": ")[2] for line in lines] == ["zoos[0].epochs", "zoos[0].task.name", "zoos[0].arch.config.widht"], r.output
    assert "unknown task 'digitz'" in lines[1] and "no config field 'widht'" in lines[2]
    good_task = {**zoo, "task": {"name": "digits"}}
    r = CliRunner().invoke(app, ["validate", str(write(tmp_path, {**GOOD, "zoos": [good_task]}))])
    assert [line.split(": ")[2] for line in r.output.splitlines()] == ["zoos[0].epochs", "zoos[0].arch.config.widht"], r.output


def test_problems_found_building_the_zoos_are_all_reported_each_naming_its_zoo(tmp_path):
    """A task option the task refuses and an architecture config too large for the task's images surface only when
    the zoos are built: validate reports both at once (not the first alone), each with its zoo's key path and name;
    a good zoo between them says nothing."""
    bad_task = {**GOOD["zoos"][0], "name": "fivefold", "task": {"name": "digits", "options": {"group": "C5"}}}
    too_deep = {**GOOD["zoos"][0], "name": "deep", "arch": {"name": "small_cnn_zoo", "config": {"depth": 3}}}
    r = CliRunner().invoke(app, ["validate", str(write(tmp_path, {**GOOD, "zoos": [bad_task, GOOD["zoos"][0], too_deep]}))])
    assert r.exit_code == 2, r.output
    lines = r.output.splitlines()
    assert len(lines) == 2, r.output  # a line a problem, each naming the file: no header
    assert lines[0].startswith(f"error: {tmp_path / 'study.yaml'}: zoos[0].task: task 'digits': group='C5'; allowed")
    assert lines[0].endswith("(zoo 'fivefold')")
    assert lines[1].startswith(f"error: {tmp_path / 'study.yaml'}: zoos[2].arch: architecture 'small_cnn_zoo'")
    assert lines[1].endswith("(zoo 'deep')")


def test_missing_file_exits_2(tmp_path):
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_validates(path):
    """Each study in studies/ parses with every key checked, its zoos expand and name registered parts."""
    study = load_study(path)
    assert study.zoos and all(expand(z, study.study) for z in study.zoos)
