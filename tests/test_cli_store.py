"""`symzoo ls / query / import` through the CLI, and their one-line errors with exit code 2."""

from __future__ import annotations

import json

import polars as pl
from typer.testing import CliRunner

import pytest

from pipeline.cli import app, console
from tests.zoos.test_importers import write_small_cnn_zoo
from tests.zoos.test_store import make_pop
import zoos
from zoos.store import Store

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console():
    """Rich wraps tables to the terminal width; give the test console room for whole rows."""
    old = console.width
    console.width = 200
    yield
    console.width = old


def _store(tmp_path):
    s = Store(str(tmp_path / "store"))
    pops = [make_pop("zA", [0, 1, 2], seed=1), make_pop("zB", [5, 6], seed=2)]
    for p in pops:
        s.write_population(p)
    s.write_analysis("barrier", "p0", [{"model_id": pops[0].ids[0], "barrier": 0.5, "curve": [0.1, 0.7, 0.2],
                                        "flows": ["rotation", "translate_x"]}])
    return s, pops


def test_ls_summarises_each_zoo(tmp_path):
    s, pops = _store(tmp_path)
    r = runner.invoke(app, ["ls", s.root])
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if l.strip().startswith("zA"))
    assert "3" in line and "2/1" in line and "0, 2, 5" in line and "test_acc" in line
    best = max(m["test_acc"] for m in pops[0].models if m["status"] == "ok")
    assert f"{best:.4g}" in line


def test_query_formats(tmp_path):
    s, pops = _store(tmp_path)
    sql = "SELECT zoo, count(*) AS n FROM models GROUP BY zoo ORDER BY zoo"
    r = runner.invoke(app, ["query", s.root, sql, "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"zoo": "zA", "n": 3}, {"zoo": "zB", "n": 2}]
    r = runner.invoke(app, ["query", s.root, "SELECT model_id, epoch FROM checkpoints WHERE epoch = 5", "-f", "csv"])
    assert r.exit_code == 0 and r.output.count("\n") == 1 + 5
    out = tmp_path / "b.parquet"
    r = runner.invoke(app, ["query", s.root, "SELECT * FROM analysis_barrier", "-f", "parquet", "-o", str(out)])
    assert r.exit_code == 0 and pl.read_parquet(out)["barrier"].to_list() == [0.5]
    r = runner.invoke(app, ["query", s.root, "SELECT max(epoch) AS e FROM curves"])
    assert r.exit_code == 0 and "5" in r.output and "1 row" in r.output


def test_errors_exit_2_with_one_line(tmp_path):
    s, _ = _store(tmp_path)
    cases = [
        (["ls", str(tmp_path / "nowhere")], "no symzoo store"),
        (["query", s.root, "SELEC nonsense"], "bad SQL"),
        (["query", s.root, "SELECT nope FROM models"], "bad SQL"),
        (["query", s.root, "SELECT 1", "--format", "xml"], "--format 'xml'"),
        (["query", s.root, "SELECT 1", "-f", "csv", "-o", str(tmp_path / "no" / "x.csv")], "/no' does not exist"),
        (["query", s.root, "SELECT 1", "-f", "csv", "-o", str(tmp_path)], "is a folder; name a file to write"),
        (["import", "zip", str(tmp_path), s.root], "format 'zip'"),
        (["ls", "foo://x"], "store 'foo://x': Unrecognized filesystem type"),  # pyarrow's ArrowInvalid, not a traceback
        (["verify", "gs://bucket/x?no_such_option=1"], "store 'gs://bucket/x?no_such_option=1': Unexpected query parameter"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output


def test_import_then_query(tmp_path):
    write_small_cnn_zoo(tmp_path / "src", gz=True)
    r = runner.invoke(app, ["import", "small-cnn-zoo", str(tmp_path / "src"), str(tmp_path / "st"), "--zoo", "sc"])
    assert r.exit_code == 0, r.output
    assert " ".join(r.output.split()) == f"imported 2 models from {tmp_path / 'src'} into {tmp_path / 'st'}"
    r = runner.invoke(app, ["query", str(tmp_path / "st"), "SELECT count(*) AS n FROM checkpoints", "-f", "json"])
    assert json.loads(r.output) == [{"n": 4}]
    # the same folder again: the same models, rewritten, said so; the store still holds each once
    r = runner.invoke(app, ["import", "small-cnn-zoo", str(tmp_path / "src"), str(tmp_path / "st"), "--zoo", "sc"])
    assert r.exit_code == 0 and " ".join(r.output.split()).endswith("(2 of them already there: rewritten)"), r.output
    r = runner.invoke(app, ["query", str(tmp_path / "st"), "SELECT count(*) AS n FROM models", "-f", "json"])
    assert json.loads(r.output) == [{"n": 2}]


def test_csv_of_a_table_with_list_columns_holds_them_as_json(tmp_path):
    """Stage tables hold lists (a path's losses, one norm per flow): CSV has no nested values, so they come as JSON."""
    s, _ = _store(tmp_path)
    r = runner.invoke(app, ["query", s.root, "SELECT barrier, curve, flows FROM analysis_barrier", "-f", "csv"])
    assert r.exit_code == 0, r.output
    back = pl.read_csv(r.output.encode())
    assert back["barrier"].to_list() == [0.5]
    assert json.loads(back["curve"][0]) == [0.1, 0.7, 0.2] and json.loads(back["flows"][0]) == ["rotation", "translate_x"]


@pytest.mark.parametrize("sql", ["select * from read_csv('/etc/hostname')", "SELECT * FROM Read_Parquet ('x.parquet')",
                                 "select * from models join read_ipc('/tmp/x.arrow') using (model_id)"])
def test_queries_read_the_store_only(tmp_path, sql):
    s, _ = _store(tmp_path)
    r = runner.invoke(app, ["query", s.root, sql])
    assert r.exit_code == 2 and "reads files outside the store" in r.output and "Traceback" not in r.output


def test_a_value_that_mentions_a_reader_is_fine(tmp_path):
    s, _ = _store(tmp_path)
    r = runner.invoke(app, ["query", s.root, "select count(*) as n from models where zoo != 'read_csv(x)'", "-f", "json"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("credentials", ["default", "a missing file"])
def test_an_unreachable_cloud_store_fails_in_bounded_time_with_one_line(monkeypatch, credentials):
    """Arrow's GCS client retries for 15 minutes by default (a hang, offline or without credentials); a gs://
    store retries for GCS_RETRY_S, then `symzoo ls` exits 2 with one short line (so does a refused credential)."""
    import time

    import zoos.store

    monkeypatch.setattr(zoos.store, "GCS_RETRY_S", 2)
    if credentials == "a missing file":
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/symzoo-test-credentials.json")
    t = time.perf_counter()
    r = runner.invoke(app, ["ls", "gs://symzoo-no-such-bucket-for-tests/x"])
    assert r.exit_code == 2, r.output
    assert time.perf_counter() - t < 60 and len(r.output.strip().splitlines()) == 1 and len(r.output) < 500, r.output


def test_models_stored_twice_are_reported_by_verify_and_stored_once_by_repair(tmp_path):
    """A store an import before symzoo kept one copy left with a model in two shards of a zoo (the older written
    first): `ls` warns, `verify` exits 1 naming the older shard and the models; `repair` keeps each model's newest copy, the older
    shard's other models to the bit, and leaves an intact store; the other zoo is not touched."""
    import os

    import numpy as np

    s = Store(str(tmp_path / "store"))
    old, new, other = make_pop("z", [0, 1, 2], seed=1), make_pop("z", [2, 3], seed=2), make_pop("y", [0, 1], seed=3)
    for p in (old, new, other):
        s.write_population(p)
    rel = os.path.join(s.root, f"manifest/z/{old.shard}.json")
    with open(rel) as f:
        manifest = json.load(f)
    with open(rel, "w") as f:  # written a day before the re-import
        json.dump({**manifest, "written": "2026-12-05T10:00:00+0000"}, f)
    r = runner.invoke(app, ["ls", s.root])
    assert r.exit_code == 0 and "1 models are stored twice" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["verify", s.root])
    assert r.exit_code == 1 and f"manifest/z/{old.shard}.json" in r.output and "newer shard" in r.output, r.output
    assert old.ids[2] in r.output and "symzoo repair" in r.output
    r = runner.invoke(app, ["repair", s.root])
    assert r.exit_code == 0 and " ".join(r.output.split()) == f"1 models of {s.root} stored twice are stored once now (their newest copy)", r.output
    assert runner.invoke(app, ["verify", s.root]).exit_code == 0
    assert "stored twice" not in runner.invoke(app, ["ls", s.root]).output
    s = Store(s.root)
    models = s.models().collect()
    assert sorted(models["model_id"]) == sorted(old.ids[:2] + new.ids + other.ids)
    for p, kept in ((old, [0, 1]), (new, [0, 1]), (other, [0, 1])):
        for i in kept:
            np.testing.assert_array_equal(s.state_dict(p.ids[i], epoch=5)["fc.weight"].numpy(), p.weights["fc.weight"][i, -1])
    assert s.checkpoints(zoo="z").collect().height == 4 * 3


def test_imported_zoos_answer_to_symzoos_factor_names(tmp_path):
    """A Small CNN Zoo's `learning_rate` and a Model Zoos trial's `optim_lr`, `optim_optimizer`, `model_nlin` are
    stored under their published names and as symzoo's `lr`, `optimizer`, `activation`: one query compares them."""
    from tests.zoos.test_importers import write_trial

    write_small_cnn_zoo(tmp_path / "scz", gz=False)
    write_trial(tmp_path / "mz" / "tune_zoo_mnist" / "NN_tune_trainable_1", 1, [0, 1])
    st = str(tmp_path / "st")
    for fmt, src, zoo in (("small-cnn-zoo", "scz", "sc"), ("model-zoos", "mz", "mz")):
        r = runner.invoke(app, ["import", fmt, str(tmp_path / src), st, "--zoo", zoo])
        assert r.exit_code == 0, r.output
    models = zoos.open(st).models().collect()
    published = models.select(pl.coalesce("learning_rate", "optim_lr"))[:, 0]
    assert models["lr"].null_count() == 0 and models["lr"].to_list() == published.to_list()
    mz = models.filter(pl.col("zoo") == "mz").row(0, named=True)
    assert (mz["optimizer"], mz["activation"], mz["weight_decay"]) == (mz["optim_optimizer"], mz["model_nlin"], mz["optim_wd"])
    r = runner.invoke(app, ["query", st, "SELECT zoo, avg(lr) AS lr FROM models GROUP BY zoo ORDER BY zoo", "-f", "json"])
    assert r.exit_code == 0 and [row["zoo"] for row in json.loads(r.output)] == ["mz", "sc"], r.output
