"""Damaged shards (truncated, a flipped byte), interrupted writes, and safety: no unpickling, no path escape."""

import os
import pickle

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from tests.zoos.test_importers import write_trial
from tests.zoos.test_store import make_pop
from zoos.importers import import_zoo
from zoos.store import DamagedShardWarning, Store, StoreError

runner = CliRunner()


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "store"))
    pops = [make_pop("zA", [0, 1, 2], seed=1), make_pop("zA", [3, 4], seed=2)]
    for p in pops:
        s.write_population(p)
    return s, pops


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("damage", [truncate, flip_byte])
@pytest.mark.parametrize("kind", ["models/zA/{}.parquet", "checkpoints/zA/{}.arrow"])
def test_damaged_shard_is_named_refused_or_skipped(store, damage, kind):
    s, (bad, good) = store
    rel = kind.format(bad.shard)
    damage(os.path.join(s.root, rel))

    r = runner.invoke(app, ["verify", s.root])
    assert r.exit_code == 1, r.output
    assert rel in r.output and all(mid in r.output for mid in bad.ids), "names the file and every model affected"
    assert good.shard not in r.output

    fresh = Store(s.root)  # a new reader: nothing memoised from before the damage
    read = (lambda st: st.models().collect()) if kind.startswith("models") else (lambda st: st.to_torch())
    with pytest.raises(StoreError, match=f"damaged file .*{rel}.*symzoo verify.*skip_damaged=True"):
        read(fresh)
    with pytest.warns(DamagedShardWarning, match=rel):
        got = read(Store(s.root, skip_damaged=True))
    ids = got["model_id"].to_list() if kind.startswith("models") else got.model_ids
    assert sorted(ids) == sorted(good.ids), "the intact shard is read whole, the damaged one skipped"

    s.write_population(bad)  # rewriting the shard (a re-run) repairs it
    assert runner.invoke(app, ["verify", s.root]).exit_code == 0
    assert Store(s.root).models().collect().height == 5


def test_interrupted_write_leaves_no_partial_file_after_the_rewrite(store):
    s, (bad, _) = store
    os.remove(os.path.join(s.root, f"manifest/zA/{bad.shard}.json"))  # the writer died before its manifest
    stray = os.path.join(s.root, f"checkpoints/zA/{bad.shard}.arrow.tmp-123")  # ... and mid-file
    with open(stray, "wb") as f:
        f.write(b"half a file")
    r = runner.invoke(app, ["verify", s.root])
    assert r.exit_code == 1 and f"{bad.shard}.arrow.tmp-123" in r.output
    assert s.models().collect().height == 2, "an incomplete shard is invisible"
    s.write_population(bad)
    assert not os.path.exists(stray) and s.verify() == []


def test_verify_of_a_missing_store_exits_2(tmp_path):
    r = runner.invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no symzoo store" in r.output


def test_reading_a_zoo_never_unpickles(store, monkeypatch):
    s, pops = store
    s.write_analysis("barrier", "pairs-0", [{"model_id": pops[0].ids[0], "barrier": 0.5}])

    def refuse(*args, **kwargs):
        raise AssertionError("the store unpickled something")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = Store(s.root)
    assert fresh.models().collect().height == 5 and fresh.curves().collect().height > 0
    assert fresh.analysis("barrier").collect().height == 1
    full = fresh.checkpoints(columns="all").collect()
    assert full.height == 5 * 3
    w = fresh.to_torch(epoch=2)
    for p in pops:
        rows = [w.model_ids.index(mid) for mid in p.ids]
        np.testing.assert_array_equal(w["fc.weight"].numpy()[rows], p.weights["fc.weight"][:, 1])
    assert fresh.verify() == []


def test_malicious_pickle_in_a_model_zoos_checkpoint_is_refused(tmp_path):
    src = tmp_path / "tune_zoo"
    write_trial(src / "NN_tune_trainable_1", 1, [0, 1])
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = src / "NN_tune_trainable_1" / "checkpoint_000001" / "checkpoints"
    torch.save({"conv.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(StoreError, match="refusing checkpoint .*checkpoint_000001"):
        import_zoo("model-zoos", str(src), Store(str(tmp_path / "store")))
    r = runner.invoke(app, ["import", "model-zoos", str(src), str(tmp_path / "store2")])
    assert r.exit_code == 2 and "refusing checkpoint" in r.output
    assert not marker.exists(), "the payload never ran"
    assert not (tmp_path / "store").exists() and not (tmp_path / "store2").exists(), "nothing imported"


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "/abs", ".hidden", "x/../../y", "-flag"])
def test_names_cannot_escape_the_store(tmp_path, bad):
    s = Store(str(tmp_path / "store"))
    s.write_population(make_pop("ok", [0]))
    with pytest.raises(StoreError, match="not a safe path component"):
        s.write_population(make_pop(bad, [0]))
    with pytest.raises(StoreError, match="not a safe path component"):
        s.write_analysis("stage", bad, [{"a": 1}])
    with pytest.raises(StoreError, match="not a safe path component"):
        s.models(zoo=bad)
    with pytest.raises(StoreError, match="not a safe path component"):
        s.analysis(bad)
    inside = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs}
    assert all(p.startswith("store/") for p in inside), inside


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_a_damaged_shard_is_repaired_by_symzoo_repair_and_a_re_run(ray_local, tmp_path):
    """A study's models file damaged on disk: the next run says which file and the command, in one line (exit 2);
    `symzoo repair` drops the shard, and the re-run retrains exactly its models: no manual file surgery."""
    import yaml

    study = {"study": "rep", "store": str(tmp_path / "store"), "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
             "output": str(tmp_path / "out"),
             "zoos": [{"name": "mlp", "task": {"name": "digits", "options": {"n_train": 64, "n_val": 32, "n_test": 32}},
                       "arch": {"name": "mlp", "config": {"width": 4, "depth": 1}}, "grid": {"seed": [0, 1, 2, 3]},
                       "epochs": 1, "population_size": 2}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert runner.invoke(app, ["run", str(path), "--plain"]).exit_code == 0
    s = Store(study["store"])
    shard = sorted(m["shard"] for m in s.manifests())[0]
    truncate(os.path.join(s.root, f"models/mlp/{shard}.parquet"))
    with open(os.path.join(s.root, "manifest", "mlp", "pop-x.json.tmp-1"), "w") as f:
        f.write("{")  # and a manifest whose writer died mid-way
    r = runner.invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 2 and "Traceback" not in r.output and f"models/mlp/{shard}.parquet" in r.output
    assert "symzoo repair" in r.output
    r = runner.invoke(app, ["repair", study["store"]])
    assert r.exit_code == 0 and "dropped 1 damaged shards (2 models) and 1 stray" in r.output, r.output
    assert Store(study["store"]).models().collect().height == 2 and Store(study["store"]).verify() == []
    again = runner.invoke(app, ["run", str(path), "--plain"])
    assert again.exit_code == 0 and "2 models to train" in again.output, again.output
    assert Store(study["store"]).models().collect().height == 4 and Store(study["store"]).verify() == []


def test_a_corrupt_manifest_is_named_in_one_line(store):
    s, (bad, _) = store
    with open(os.path.join(s.root, f"manifest/zA/{bad.shard}.json"), "w") as f:
        f.write("{not json")
    for cmd in (["ls", s.root], ["query", s.root, "select count(*) as n from models"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2 and f"manifest/zA/{bad.shard}.json" in r.output and "symzoo repair" in r.output, r.output
    r = runner.invoke(app, ["verify", s.root])
    assert r.exit_code == 1 and "unreadable manifest" in r.output


def _small_cnn(tmp_path):
    from tests.zoos.test_importers import write_small_cnn_zoo

    src = tmp_path / "scz"
    write_small_cnn_zoo(str(src), gz=False)
    return src


@pytest.mark.parametrize("damage, named", [
    (lambda src: (src / "weights.npy").write_bytes(b"not numpy at all"), "weights.npy: not a readable numpy array"),
    (lambda src: np.save(src / "weights.npy", np.array([{"a": 1}], dtype=object)), "weights.npy: not a readable numpy array"),
    (lambda src: (src / "layout.csv").write_text("varname,start_idx,end_idx,shape\nconv/kernel:0,zero,9,(3 3)\n"),
     "layout.csv row 1: not a readable layout row"),
])
def test_a_malformed_small_cnn_zoo_file_is_named_in_one_line(tmp_path, damage, named):
    src = _small_cnn(tmp_path)
    damage(src)
    r = runner.invoke(app, ["import", "small-cnn-zoo", str(src), str(tmp_path / "store")])
    assert r.exit_code == 2 and named in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "store" / "models").exists(), "nothing written"


@pytest.mark.parametrize("name, text", [("params.json", "{not json"), ("result.json", '{"a": 1}\n{broken\n')])
def test_a_malformed_model_zoos_trial_file_is_named_in_one_line(tmp_path, name, text):
    trial = tmp_path / "zoo" / "trial_0"
    write_trial(str(trial), seed=0, epochs=[1])
    (trial / name).write_text(text)
    r = runner.invoke(app, ["import", "model-zoos", str(tmp_path / "zoo"), str(tmp_path / "store")])
    assert r.exit_code == 2 and f"{name}: not a readable JSON" in r.output and "Traceback" not in r.output, r.output
