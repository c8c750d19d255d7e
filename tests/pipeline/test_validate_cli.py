"""`symzoo validate` on a study with one thing wrong: exit 2, one stderr line naming the file, the key path and the
value, in symzoo's words (no pydantic internals); and load_study's own messages for the same inputs."""

import copy
import os
import time

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.study import MAX_DEPTH, StudyError, load_study

STUDY = {
    "study": "tiny",
    "zoos": [{"name": "cnn", "task": {"name": "digits"}, "arch": {"name": "cnn", "config": {"width": 4, "depth": 2}},
              "grid": {"seed": [0, 1]}, "epochs": 3, "checkpoints": "0,1,last"}],
    "analysis": [{"stage": "interpolation", "pairs": 1}, {"stage": "lie", "flows": ["rotation"]}],
}


def changed(*edits):
    """STUDY with (key path, value) edits."""
    d = copy.deepcopy(STUDY)
    for path, value in edits:
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return d


def validate(tmp_path, data):
    p = tmp_path / "y.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    r = CliRunner().invoke(app, ["validate", str(p)])
    return r, p


CASES = [  # (edits, key path, fragment of the message)
    ([(("zoos", 0, "epochs"), -5)], "zoos[0].epochs", "must be >= 1 (got -5)"),
    ([(("zoos", 0, "checkpoints"), 7)], "zoos[0].checkpoints", "a checkpoint string such as '0,5,last' or a list of epochs (got 7)"),
    ([(("analysis", 0, "zoos"), "cnn")], "analysis[0].zoos", "must be 'all' or a list of zoo names (got 'cnn')"),
    ([(("analysis", 1, "flows"), ["rotatoin"])], "analysis[1].flows", "flows has 'rotatoin'; allowed: rotation"),
    ([(("analysis", 1, "flows"), [])], "analysis[1].flows", "the list is empty"),
    ([(("zoos", 0, "name"), "a b")], "zoos[0].name", "zoo name 'a b' is not a safe path component"),
    ([(("analysis", 0, "zoos"), ["ghost"])], "analysis[0].zoos", "names unknown zoo 'ghost'"),
    ([(("zoos",), {"a": 1})], "zoos", "must be a list (got a mapping)"),
    ([(("analysis",), {"a": 1})], "analysis", "must be a list (got a mapping)"),
    ([(("zoos", 0, "arch", "config", "depth"), 1_000_000)], "zoos[0].arch.config.depth", f"at most {MAX_DEPTH:,} layers (got 1000000)"),
    ([(("zoos", 0, "arch"), {"name": "mlp", "config": {"width": 4, "depth": 1_000_000}})], "zoos[0].arch.config.depth", "(got 1000000)"),
    ([(("zoos", 0, "arch", "config"), {"width": 4}), (("zoos", 0, "grid", "depth"), [2, 5000])], "zoos[0].grid.depth[1]", "(got 5000)"),
    ([(("zoos", 0, "epochs"), True)], "zoos[0].epochs", "not true or false (got true)"),
    ([(("zoos", 0, "epochs"), 1e21)], "zoos[0].epochs", "must be at most 1,000,000 (got 1e+21)"),
    ([(("analysis", 0, "pairs"), True)], "analysis[0].pairs", "must be an integer, not true or false (got true)"),
    ([(("analysis", 0, "repair"), 1)], "analysis[0].repair", "must be true or false (got 1)"),
    ([(("analysis", 0, "repair"), "yes")], "analysis[0].repair", "must be true or false (got 'yes')"),
    ([(("analysis", 1, "flows"), ["rotation", "rotation"])], "analysis[1].flows", "lists 'rotation' twice"),
    ([(("zoos", 0, "checkpoints"), [3, 3, 1])], "zoos[0].checkpoints", "lists epoch 3 twice"),
    ([(("analysis", 0, "lambdas"), 10**9)], "analysis[0].lambdas", "must be <= 1001 (got 1000000000)"),
    # a pair stage that could pair nothing
    ([(("zoos", 0, "grid", "seed"), [0])], "analysis[0].zoos", "stage 'interpolation' pairs models of a zoo; every zoo it "
     "analyses ('cnn') trains one model"),
    ([(("analysis", 0), {"stage": "interpolation_cross"})], "analysis[0].zoos", "stage 'interpolation_cross' pairs a "
     "model of one zoo with one of another; it analyses 1 zoo ('cnn'): give it two or more"),
    ([(("analysis", 0, "epochs"), [])], "analysis[0].epochs", "the list is empty"),
    ([(("analysis", 0, "zoos"), [])], "analysis[0].zoos", "the list is empty: nothing to analyse"),
    ([(("analysis", 0, "seed"), -5)], "analysis[0].seed", "must be >= 0"),
    ([(("zoos", 0, "grid", "width"), [4, 8])], "zoos[0].arch.config.width", "grid.width also sets width"),
    ([(("analysis", 0, "pair"), 1)], "analysis[0].pair", "stage 'interpolation' has no setting 'pair'"),
    ([(("zoo",), [])], "zoo", "unknown key 'zoo'; allowed: study, store"),
]


@pytest.mark.parametrize("edits, where, fragment", CASES, ids=[c[1] + ":" + c[2][:20] for c in CASES])
def test_one_problem_is_one_line_naming_the_file_key_and_value(tmp_path, edits, where, fragment):
    start = time.monotonic()
    r, p = validate(tmp_path, changed(*edits))
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {p}: {where}: "), lines[0]
    assert fragment in lines[0]
    rest = lines[0].removeprefix(f"error: {p}: ")
    assert not rest.startswith("study: ") and not any(
        leak in rest for leak in ("Value error", "Input should", ".str:", "list[", "literal[")), lines[0]
    assert time.monotonic() - start < 20  # an absurd depth is refused before anything is built
    with pytest.raises(StudyError) as e:
        load_study(p)
    assert str(e.value) == f"{p}: {lines[0].removeprefix(f'error: {p}: ')}"


def test_several_problems_are_a_line_each_with_no_header(tmp_path):
    r, p = validate(tmp_path, changed((("zoos", 0, "epochs"), -5), (("zoos", 0, "checkpoints"), 7),
                                      (("analysis", 0, "repair"), 1)))
    assert r.exit_code == 2
    lines = r.stderr.splitlines()
    assert [line.split(": ")[:3] for line in lines] == [
        ["error", str(p), "zoos[0].epochs"], ["error", str(p), "zoos[0].checkpoints"], ["error", str(p), "analysis[0].repair"]]


def test_zoos_missing_the_same_data_are_one_line_naming_them_all(tmp_path, monkeypatch):
    """Eight MNIST zoos and no data folder were eight copies of one long line; now one line names the eight zoos
    (a zoo with another problem keeps its own line)."""
    monkeypatch.delenv("SYMZOO_DATA", raising=False)
    mnist = {**STUDY["zoos"][0], "task": {"name": "mnist"}}
    fivefold = {**STUDY["zoos"][0], "name": "c5", "task": {"name": "digits", "options": {"group": "C5"}}}
    r, p = validate(tmp_path, {**STUDY, "zoos": [{**mnist, "name": "m1"}, fivefold, {**mnist, "name": "m2"}],
                               "analysis": []})
    assert r.exit_code == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith(f"error: {p}: zoos[0, 2].task: task 'mnist': no data directory")
    assert lines[0].endswith("(zoos 'm1', 'm2')")
    assert lines[1].startswith(f"error: {p}: zoos[1].task: task 'digits': group='C5'") and lines[1].endswith("(zoo 'c5')")


def test_a_duplicate_yaml_key_is_refused_naming_it_and_its_lines(tmp_path):
    r, p = validate(tmp_path, "study: a\nstudy: b\n" + yaml.safe_dump({k: v for k, v in STUDY.items() if k != "study"}))
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        f"error: {p}: key 'study' at line 2 is given twice (first at line 1); give it once"]


def test_merge_keys_may_still_be_overridden(tmp_path):
    text = yaml.safe_dump({k: v for k, v in STUDY.items() if k != "zoos"}) + (
        "zoos:\n  - &z {name: x, task: digits, arch: {name: cnn, config: {width: 4, depth: 2}}, grid: {seed: [0, 1]}, epochs: 2}\n"
        "  - {<<: *z, name: y}\n")
    p = tmp_path / "m.yaml"
    p.write_text(text)
    assert [z.name for z in load_study(p).zoos] == ["x", "y"]


@pytest.mark.parametrize("kind", ["dir", "devnull", "fifo"])
def test_a_study_path_that_is_not_a_regular_file(tmp_path, kind):
    path = {"dir": tmp_path, "devnull": "/dev/null", "fifo": tmp_path / "f"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 2 and r.stderr.splitlines() == [f"error: study file '{path}' is not a regular file; a study is a YAML file"]


def test_legitimate_values_still_load(tmp_path):
    ok = changed((("analysis", 0, "repair"), True), (("analysis", 0, "epochs"), [0, 3]), (("analysis", 0, "seed"), 0),
                 (("zoos", 0, "checkpoints"), [0, 2]), (("zoos", 0, "grid", "depth"), [1, MAX_DEPTH]),
                 (("zoos", 0, "arch", "config"), {"width": 4}))
    r, p = validate(tmp_path, ok)
    assert r.exit_code == 0, r.output
    assert load_study(p).analysis[0].settings.repair is True
