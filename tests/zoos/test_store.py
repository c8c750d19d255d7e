"""The weight store: round trips, zero-copy stacked reads, shard completeness, integrity, URIs, safety."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest
import torch

from zoos.population import PopulationResult, model_id
from zoos.store import MARKER, StackedWeights, Store, StoreError

SHAPES = {"conv.weight": (3, 1, 2, 2), "conv.bias": (3,), "fc.weight": (2, 3), "fc.bias": (2,), "drop.p": ()}


def make_pop(zoo: str, seeds: list[int], epochs=(0, 2, 5), seed: int = 0, shapes=SHAPES) -> PopulationResult:
    """A population with random weights, metrics and curves (no trainer needed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        factors = {"seed": s, "lr": 0.1 / (s + 1), "activation": "relu" if s % 2 else "tanh"}
        rows.append(
            {
                "model_id": model_id("study", zoo, factors),
                "study": "study",
                "zoo": zoo,
                "task": "digits",
                "task_config": json.dumps({"name": "digits"}),
                "arch": "mlp",
                "arch_config": "{}",
                **factors,
                "status": "diverged" if s == 1 else "ok",
                "test_acc": float(rng.random()),
                "n_params": 23,
                "epochs": max(epochs),
            }
        )
    n, c = len(seeds), len(epochs)
    weights = {k: rng.standard_normal((n, c, *shape)).astype(np.float32) for k, shape in shapes.items()}
    metrics = {"test_acc": rng.random((n, c)), "train_loss": rng.random((n, c))}
    curves = {"test_acc": rng.random((n, max(epochs) + 1))}
    return PopulationResult(rows, list(epochs), metrics, weights, curves)


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "store"))
    pops = [make_pop("zA", [0, 1, 2], seed=1), make_pop("zA", [3, 4], seed=2), make_pop("zB", [0, 1], seed=3)]
    for p in pops:
        s.write_population(p)
    return s, pops


def test_round_trip_rows_curves_checkpoints(store):
    s, pops = store
    models = s.models().collect()
    assert models.height == 7 and set(models["zoo"]) == {"zA", "zB"}
    assert models.schema["seed"] == pl.Int64 and models.schema["lr"] == pl.Float64
    assert models.schema["activation"] == pl.String and models.schema["n_params"] == pl.Int64
    p = pops[0]
    row = models.filter(pl.col("model_id") == p.ids[2]).row(0, named=True)
    assert row["test_acc"] == p.models[2]["test_acc"] and row["shard"] == p.shard

    curves = s.curves().filter(pl.col("model_id") == p.ids[1]).sort("epoch").collect()
    assert curves["epoch"].to_list() == list(range(6))
    np.testing.assert_array_equal(curves["test_acc"].to_numpy(), p.curves["test_acc"][1])

    ck = s.checkpoints(zoo="zA").collect()
    assert ck.height == 5 * 3
    got = ck.filter((pl.col("model_id") == p.ids[0]) & (pl.col("epoch") == 2))["train_loss"].item()
    assert got == p.metrics["train_loss"][0, 1]
    last = s.checkpoints(epochs="last").collect()
    assert last.height == 7 and set(last["epoch"]) == {5}


def test_every_stored_weight_comes_back(store):
    s, pops = store
    for p in pops:
        for j, ep in enumerate(p.epochs):
            for i, mid in enumerate(p.ids):
                sd = s.state_dict(mid, epoch=ep)
                for k, a in p.weights.items():
                    np.testing.assert_array_equal(sd[k].numpy(), a[i, j])
                    assert tuple(sd[k].shape) == SHAPES[k]


def test_to_torch_stacks_filters_and_orders(store):
    s, pops = store
    tensors, ids = s.to_torch(filter=pl.col("zoo") == "zA")
    assert len(ids) == 5 and tensors["conv.weight"].shape == (5, 3, 1, 2, 2)
    for p in pops[:2]:
        for i, mid in enumerate(p.ids):
            k = ids.index(mid)
            np.testing.assert_array_equal(tensors["fc.weight"][k].numpy(), p.weights["fc.weight"][i, -1])

    sub = s.to_torch(filter=(pl.col("zoo") == "zA") & (pl.col("seed") != 1), epoch=2, keys=["fc.bias"])
    assert isinstance(sub, StackedWeights) and list(sub.tensors) == ["fc.bias"] and len(sub) == 4
    assert pops[0].ids[1] not in sub.model_ids and sub.epochs == [2] * 4
    p = pops[0]
    np.testing.assert_array_equal(sub["fc.bias"][sub.model_ids.index(p.ids[2])].numpy(), p.weights["fc.bias"][2, 1])

    with pytest.raises(StoreError, match="no stored weights"):
        s.to_torch(epoch=3)
    with pytest.raises(StoreError, match="weight column 'nope'"):
        s.to_torch(keys=["nope"])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps to locate the mapping")
def test_one_shard_layer_is_a_view_of_the_memory_map(store):
    s, pops = store
    p = pops[0]
    tensors, ids = s.to_torch(filter=pl.col("model_id").is_in(p.ids))
    path = os.path.realpath(os.path.join(s.root, f"checkpoints/zA/{p.shard}.arrow"))
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(path):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((lo, hi))
    assert ranges, "the weight file is not memory-mapped"
    for t in tensors.values():
        assert t.is_contiguous()
        assert any(lo <= t.data_ptr() < hi for lo, hi in ranges), "layer was copied out of the mapping"


def test_metadata_queries_open_no_weight_file(store):
    s, _ = store
    s.opened.clear()
    s.models().filter(pl.col("test_acc") > 0.5).collect()
    s.checkpoints(epochs="last").select("model_id", "epoch", "test_acc").collect()
    s.curves().collect()
    assert s.opened and not [r for r in s.opened if r.endswith(".arrow")]
    s.checkpoints(columns=["fc.bias"], epochs=[0]).collect()
    assert [r for r in s.opened if r.endswith(".arrow")]


def test_checkpoints_with_weight_columns(store):
    s, pops = store
    df = s.checkpoints(columns=["conv.bias"], epochs=[2]).collect()
    assert df.height == 7 and df.schema["conv.bias"] == pl.Array(pl.Float32, 3)
    p = pops[2]
    r = df.filter(pl.col("model_id") == p.ids[1])
    np.testing.assert_array_equal(r["conv.bias"].to_numpy()[0], p.weights["conv.bias"][1, 1])
    assert r["test_acc"].item() == p.metrics["test_acc"][1, 1]
    assert "fc.weight" in s.checkpoints(columns="all", epochs="last").collect_schema()


def test_incomplete_shard_is_invisible_and_verify_reports(store):
    s, pops = store
    p = pops[1]
    os.remove(os.path.join(s.root, f"manifest/zA/{p.shard}.json"))
    assert s.stored_ids() == set(pops[0].ids) | set(pops[2].ids)
    assert s.models().collect().height == 5
    problems = s.verify()
    assert {pr["file"] for pr in problems} >= {f"models/zA/{p.shard}.parquet", f"checkpoints/zA/{p.shard}.arrow"}

    s.write_population(p)  # a retry rewrites the whole shard
    assert s.verify() == []
    q = pops[0]
    with open(os.path.join(s.root, f"checkpoints/zA/{q.shard}.arrow"), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    (pr,) = s.verify()
    assert pr["file"] == f"checkpoints/zA/{q.shard}.arrow" and set(pr["model_ids"]) == set(q.ids)
    assert "sha256" in pr["problem"]


def test_rewriting_a_shard_replaces_it(tmp_path):
    s = Store(str(tmp_path))
    s.write_population(make_pop("z", [0, 1], seed=1))
    p2 = make_pop("z", [0, 1], seed=9)
    s.write_population(p2)
    assert s.models().collect().height == 2
    np.testing.assert_array_equal(s.to_torch()["fc.weight"].numpy(), p2.weights["fc.weight"][:, -1])
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if ".tmp-" in f]


def test_removing_models_drops_their_shards_and_writes_the_others_again_unchanged(store):
    """A shard holding only removed models is dropped; one holding others too is written again without them (its
    remaining models' weights, checkpoint metrics and curves to the bit, under their own shard name); the shards
    kept and the other zoos are not touched."""
    from zoos.population import population_id

    s, pops = store
    before = {mid: {ep: s.state_dict(mid, epoch=ep) for ep in (0, 2, 5)} for mid in pops[0].ids}
    curves = s.curves(zoo="zA").collect()
    gone = {pops[0].ids[1], pops[1].ids[0], pops[1].ids[1], pops[2].ids[0]}  # zB's is another zoo's: kept
    assert s.remove_models("zA", gone) == 3
    kept = [pops[0].ids[0], pops[0].ids[2]]
    assert [m["shard"] for m in s.manifests("zA")] == [population_id(kept)]
    assert s.stored_ids() == set(kept) | set(pops[2].ids) and s.verify() == []
    models = s.models(zoo="zA").collect()
    assert sorted(models["model_id"]) == sorted(kept) and set(models["shard"]) == {population_id(kept)}
    for mid in kept:
        for ep, sd in before[mid].items():
            got = s.state_dict(mid, epoch=ep)
            assert all(torch.equal(got[k], v) for k, v in sd.items())
    ck = s.checkpoints(zoo="zA").collect()
    assert ck.height == 2 * 3 and ck["epoch"].to_list() == [0, 0, 2, 2, 5, 5]
    got = ck.filter((pl.col("model_id") == kept[1]) & (pl.col("epoch") == 2))["train_loss"].item()
    assert got == pops[0].metrics["train_loss"][2, 1]
    assert s.curves(zoo="zA").collect().sort("model_id", "epoch").equals(
        curves.filter(pl.col("model_id").is_in(kept)).sort("model_id", "epoch"))
    assert s.remove_models("zA", set(kept), keep=[population_id(kept)]) == 0  # a kept shard is left as it is
    leftovers = {f.split(".")[0] for _, _, fs in os.walk(s.root) for f in fs} - {"symzoo-store"}
    assert leftovers == {population_id(kept), pops[2].shard}  # no file of a dropped shard stays


def test_removing_models_from_a_damaged_shard_is_refused_before_anything_changes(store):
    s, pops = store
    q = pops[0]
    with open(os.path.join(s.root, f"checkpoints/zA/{q.shard}.arrow"), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(s.root) for f in fs)
    with pytest.raises(StoreError, match="damaged file .*symzoo repair"):
        s.remove_models("zA", {q.ids[0], pops[1].ids[0]})
    assert sorted(os.path.join(d, f) for d, _, fs in os.walk(s.root) for f in fs) == files


def test_repair_keeps_the_older_copy_of_a_model_whose_newer_shard_is_damaged(tmp_path):
    """Repair drops damaged shards before it picks the copies to keep: a model whose newer copy was damaged keeps
    its older one (still held once), not none."""
    s = Store(str(tmp_path / "store"))
    old, new = make_pop("z", [0, 1, 2], seed=1), make_pop("z", [2, 3], seed=2)
    for p in (old, new):
        s.write_population(p)
    rel = os.path.join(s.root, f"manifest/z/{old.shard}.json")
    with open(rel) as f:
        manifest = json.load(f)
    with open(rel, "w") as f:
        json.dump({**manifest, "written": "2026-12-05T10:00:00+0000"}, f)
    assert [p["duplicates"] for p in s.verify()] == [[old.ids[2]]]
    with open(os.path.join(s.root, f"checkpoints/z/{new.shard}.arrow"), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    mended = s.repair()
    assert [p["shard"] for p in mended if p["manifest"]] == [new.shard] and not any(p.get("duplicates") for p in mended)
    assert sorted(s.stored_ids()) == sorted(old.ids) and s.verify() == []


def test_file_uri_and_analysis(tmp_path):
    s = Store("file://" + str(tmp_path / "uri-store"))
    p = make_pop("zU", [0, 1, 2])
    s.write_population(p)
    s.write_analysis("barrier", "pairs-0", [{"model_id": p.ids[0], "barrier": 0.5, "curve": [0.1, 0.5, 0.2]}])
    s.write_analysis("barrier", "pairs-1", pl.DataFrame({"model_id": [p.ids[1]], "barrier": [0.25]}))
    assert s.stages() == ["barrier"]
    a = s.analysis("barrier").sort("barrier").collect()
    assert a["barrier"].to_list() == [0.25, 0.5]
    assert s.models().collect().height == 3 and s.to_torch()["conv.weight"].shape == (3, 3, 1, 2, 2)
    local = Store(str(tmp_path / "uri-store"))
    assert local.stored_ids() == set(p.ids) and local.verify() == []


def test_refuses_bad_names_missing_and_newer_stores(tmp_path):
    s = Store(str(tmp_path / "s"))
    with pytest.raises(StoreError, match="no symzoo store"):
        s.models()
    assert s.stored_ids() == set()
    for bad in ["..", "a/b", "", "../x", ".hidden"]:
        with pytest.raises(StoreError, match="not a safe path component"):
            s.write_population(make_pop(bad, [0]))
        with pytest.raises(StoreError, match="stage name"):
            s.write_analysis(bad, "x", [{"a": 1}])
    s.write_population(make_pop("ok", [0]))
    with open(os.path.join(s.root, MARKER), "w") as f:
        json.dump({"schema_version": 99, "created": "later"}, f)
    with pytest.raises(StoreError, match="schema version 99"):
        Store(s.root)


def test_load_model_rebuilds_and_loads_strictly(tmp_path):
    archs = pytest.importorskip("zoos.archs", exc_type=ImportError)
    tasks = pytest.importorskip("tasks", exc_type=ImportError)
    task = tasks.get_task("digits")
    nets = [archs.build_arch("mlp", task) for _ in range(2)]
    sd = [n.state_dict() for n in nets]
    weights = {k: np.stack([[d[k].numpy()] for d in sd]).astype(np.float32) for k in sd[0]}
    rows = [
        {"model_id": f"m{i}", "zoo": "z", "task": "digits", "task_config": json.dumps(task.config()),
         "arch": "mlp", "arch_config": json.dumps(nets[i].config), "status": "ok"}
        for i in range(2)
    ]
    s = Store(str(tmp_path))
    s.write_population(PopulationResult(rows, [3], {}, weights))
    m = s.load_model("m1")
    x = task.load("test")[0][:4]
    torch.testing.assert_close(m(x), nets[1].eval()(x))
    with pytest.raises(StoreError, match="'nope' is not in store"):
        s.load_model("nope")


def test_a_loaded_model_on_its_loaded_task_gives_the_stored_metric(tmp_path):
    """What a user does with a stored model: load it and its task, evaluate on the task's test split."""
    from tests.zoos.test_trainer import one_population, zoo_models
    from zoos.trainer import train_population

    pop = one_population(zoo_models({"seed": [0, 1]}, epochs=2))
    store = Store(str(tmp_path / "s"))
    store.write_population(train_population(pop))
    for row in store.models().collect().iter_rows(named=True):
        model, task = store.load_model(row["model_id"]), store.load_task(row["model_id"])
        x, y = task.load("test")
        with torch.no_grad():
            assert float(task.metric(model(x), y)) == pytest.approx(row["test_acc"], abs=1e-6)
