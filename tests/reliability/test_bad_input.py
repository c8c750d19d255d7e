"""Bad input to `symzoo run`: each case exits 2 with a short error naming the key path or file and what to
do, before any Ray work, and writes nothing to the store. Cases already in tests/pipeline (malformed YAML,
unknown task/arch/factor/stage, negative lr and epochs, an empty grid value list, a string for epochs,
escaping names, a store under a file, an unreachable MLflow server) are not repeated here; the table of
every case and its message is tests/reliability/README.md.
"""

import copy
import json

import pytest
import yaml
from typer.testing import CliRunner

import pipeline.runner
from pipeline.cli import app

GOOD = {
    "study": "bad",
    "zoos": [{"name": "m", "task": {"name": "digits"}, "arch": {"name": "mlp", "config": {"width": 8, "depth": 1}},
              "grid": {"seed": [0]}, "epochs": 1}],
}


def variant(path: tuple, value) -> dict:
    d = copy.deepcopy(GOOD)
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


MNIST = {"name": "m", "task": {"name": "mnist"}, "arch": {"name": "mlp", "config": {"width": 8, "depth": 1}},
         "grid": {"seed": [0]}, "epochs": 1}

CASES = {
    "empty file": ("", "the file is empty; a study is a YAML mapping with keys study, zoos, analysis"),
    "a list, not a mapping": ("- study: x\n", "expected a mapping with keys study, zoos, analysis, ...; got a list"),
    "misspelt top-level key": ({**GOOD, "zoo": GOOD["zoos"]}, "zoo: unknown key 'zoo'; allowed: study, store"),
    "no zoos": (variant(("zoos",), KeyError), "zoos: is required"),
    "empty zoo list": (variant(("zoos",), []), "zoos: the list is empty"),
    "zoos a mapping": (variant(("zoos",), {"m": GOOD["zoos"][0]}), "zoos: must be a list (got a mapping)"),
    "grid a list": (variant(("zoos", 0, "grid"), ["seed", 0]), "zoos[0].grid"),
    "grid values a scalar": (variant(("zoos", 0, "grid", "lr"), 0.01), "zoos[0].grid.lr"),
    "lr a word": (variant(("zoos", 0, "grid", "lr"), ["fast"]), "zoos[0].grid.lr[0]"),
    "checkpoint past the last epoch": (variant(("zoos", 0, "checkpoints"), [0, 5]), "zoos[0].checkpoints"),
    "unknown arch config key": (variant(("zoos", 0, "arch", "config"), {"width": 8, "colour": 1}), "colour"),
    "unknown task option": (variant(("zoos", 0, "task"), {"name": "digits", "options": {"grup": "C4"}}), "grup"),
    "num_cpus a word": ({**GOOD, "resources": {"num_cpus": "two"}}, "resources.num_cpus"),
    "negative num_gpus": ({**GOOD, "resources": {"num_gpus": -1}}, "resources.num_gpus"),
    "unknown precision": ({**GOOD, "resources": {"precision": "fp8"}}, "resources.precision"),
    "population_size 0": (variant(("zoos", 0, "population_size"), 0), "zoos[0].population_size"),
    "mnist, data_dir without files": ({**GOOD, "data_dir": "{tmp}/nodata", "zoos": [MNIST]},
                                      "missing data files train-images-idx3-ubyte"),
    "mnist, no data_dir": ({**GOOD, "zoos": [MNIST]}, "no data directory"),
    # unbounded work: refused at once, not after minutes of validating or an allocation of terabytes
    "a range of 10^7 seeds": (variant(("zoos", 0, "grid", "seed"), {"range": [0, 10**7]}), "at most 1,000,000 a factor"),
    "a range of 10^18 seeds": (variant(("zoos", 0, "grid", "seed"), {"range": [0, 10**18]}), "at most 1,000,000 a factor"),
    "200,000 models": (variant(("zoos", 0, "grid", "seed"), {"range": [0, 200_000]}), "more than max_models = 100,000"),
    "width 200,000": (variant(("zoos", 0, "arch", "config"), {"width": 200_000, "depth": 8}), "more than this machine's"),
    "seed 2**70": (variant(("zoos", 0, "grid", "seed"), [2**70]), "zoos[0].grid.seed[0]: seed = 1180591620717411303424"),
    "a 300-character zoo name": (variant(("zoos", 0, "name"), "z" * 300), "has 300 characters; at most 100"),
    "a study named [/x]": ({**GOOD, "study": "[/x]"}, "'[/x]' is not a safe path component"),
    "an alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                      "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                      "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
                      "expands to more than 100,000 values"),
    "20,000 levels deep": ("x: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested"),
}


@pytest.fixture
def no_ray(monkeypatch):
    """Bad input must be refused before Ray starts: reaching it fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached Ray")
    monkeypatch.setattr(pipeline.runner, "init_ray", refuse)
    monkeypatch.delenv("SYMZOO_DATA", raising=False)


def run(tmp_path, data, *args):
    path = tmp_path / "study.yaml"
    if isinstance(data, dict):
        data = yaml.safe_dump({**data, "store": str(tmp_path / "store"), "output": str(tmp_path / "out"),
                               "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    path.write_text(data.replace("{tmp}", str(tmp_path)))
    return CliRunner().invoke(app, ["run", str(path), "--plain", *args])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_study_exits_2_naming_the_problem_and_writes_nothing(tmp_path, no_ray, case):
    data, expected = CASES[case]
    r = run(tmp_path, data)
    assert r.exit_code == 2, r.output
    assert expected in r.output.replace("\n", " ") or expected in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.splitlines()) <= 6, "short, no traceback"
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, prepare, expected", [
    ("store root is a file", lambda root: root.write_text("x"), "cannot write the store"),
    ("store of a newer schema", lambda root: (root.mkdir(), (root / "symzoo-store.json").write_text(
        json.dumps({"schema_version": 99}))), "schema version 99"),
    ("store marker is garbage", lambda root: (root.mkdir(), (root / "symzoo-store.json").write_text("{nope")),
     "is not a symzoo store marker"),
])
def test_unusable_store_exits_2_and_is_left_as_it_was(tmp_path, no_ray, case, prepare, expected):
    root = tmp_path / "store"
    prepare(root)
    before = sorted(p.name for p in root.iterdir()) if root.is_dir() else root.read_text()
    r = run(tmp_path, GOOD)
    assert r.exit_code == 2, r.output
    assert expected in r.output and str(root) in r.output.replace("\n", "")
    assert (sorted(p.name for p in root.iterdir()) if root.is_dir() else root.read_text()) == before


@pytest.mark.parametrize("uri, expected", [
    ("nosuch://host/x", "nosuch://host/x"),
    ("sqlite:///{tmp}/a-file/mlflow.db", "a-file/mlflow.db"),  # a folder that cannot be made: a file is there
])
def test_unusable_tracking_uri_exits_2_before_the_store(tmp_path, no_ray, uri, expected):
    (tmp_path / "a-file").write_text("x")
    r = run(tmp_path, GOOD, "--tracking-uri", uri.replace("{tmp}", str(tmp_path)))
    assert r.exit_code == 2, r.output
    assert expected in r.output.replace("\n", "") and "--tracking-uri" in r.output.replace("\n", "")
    assert not (tmp_path / "store").exists()


def test_a_binary_study_file_exits_2(tmp_path, no_ray):
    path = tmp_path / "study.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 2 and "not a text file" in r.output and "Traceback" not in r.output


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, no_ray):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "store": str(tmp_path / "store"), "output": "/proc/version",
                                    "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 2 and "cannot write the output folder '/proc/version'" in r.output, r.output


def test_an_empty_store_path_is_refused(tmp_path, no_ray):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "store": ""}))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 2 and "store is empty" in r.output


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS", "nonsense", "a dashboard's"])
def test_a_cluster_address_with_no_ray_head_exits_2_in_seconds_and_writes_nothing(tmp_path, no_ray, monkeypatch, how):
    """ray.init retries an unreachable head for minutes (a hang); the run refuses it at once, naming the address."""
    import time

    address = {"nonsense": "no-port-here", "a dashboard's": "http://127.0.0.1:8265"}.get(how, f"127.0.0.1:{_closed_port()}")
    args = ()
    if how == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        args = ("--address", address)
    t = time.perf_counter()
    r = run(tmp_path, GOOD, *args)
    assert r.exit_code == 2, r.output
    assert time.perf_counter() - t < 30, "refused in seconds, not after ray.init's retries"
    assert f"'{address}'" in r.output and "Traceback" not in r.output and len(r.output.splitlines()) <= 3, r.output
    if how in ("--address", "RAY_ADDRESS"):
        assert "connection refused" in r.output and "ray start --head" in r.output
    if how == "a dashboard's":
        assert "ray job submit --address" in r.output and "host:6379" in r.output
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("address, expected", [
    ("ray://", "names no host"),
    ("ray://h:x", "Port could not be cast"),
    ("ray://127.0.0.1:{closed}", "(127.0.0.1:{closed}: connection refused)"),
])
def test_check_cluster_names_what_is_wrong_with_a_ray_client_address(address, expected):
    from pipeline.localray import ClusterUnreachable, check_cluster

    closed = str(_closed_port())
    with pytest.raises(ClusterUnreachable) as e:
        check_cluster(address.replace("{closed}", closed))
    assert expected.replace("{closed}", closed) in str(e.value)


def test_check_cluster_passes_an_address_where_a_head_listens(monkeypatch):
    """A listener on every interface (as `ray start --head` binds): the check returns the host:port ray.init joins;
    no address (and no RAY_ADDRESS) is a local Ray of our own, nothing to check."""
    import socket

    from pipeline.localray import check_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert check_cluster(None) is None and check_cluster("local") is None
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        assert check_cluster(f"127.0.0.1:{port}").endswith(f":{port}")
