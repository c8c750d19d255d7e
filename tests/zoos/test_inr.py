"""INR zoos: the per-image task, SIREN / Fourier-feature MLPs, the trainer's per-model data path,
PSNR per checkpoint, and the stored zoo as NFN / DWSNets data with polars queries by digit and PSNR."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from tasks import TaskError, get_task
from zoos.archs import ArchError, build_arch
from zoos.export import export_nfn
from zoos.spec import PopulationSpec, SpecError, expand, parse_zoo, populations
from zoos.store import Store
from zoos.trainer import TrainError, train_population

IMAGES = [0, 1, 2, 3, 1300, 1796]  # train (0-3), val (1300), test (1796) images of digits' seed-0 split


def inr_zoo(images=IMAGES, seeds=(0,), epochs=50, arch=None, **over):
    data = {"name": "inr", "task": {"name": "inr", "options": {}},
            "arch": arch or {"name": "siren", "config": {"width": 16}},
            "grid": {"image": list(images), "seed": list(seeds), "optimizer": ["adam"], "lr": [3e-3]},
            "epochs": epochs, "checkpoints": [0, epochs // 2, epochs], **over}
    return expand(parse_zoo(data), "study")


@pytest.fixture(scope="module")
def trained():
    models = inr_zoo()
    return models, train_population(populations(models)[0])


def test_image_index_split_and_label_follow_the_source_task():
    task, digits = get_task("inr"), get_task("digits")
    x, y = task.load_models("test", 0, [1300, 0])
    assert x.shape == (64, 2) and y.shape == (2, 64, 1)
    assert x.min() == -1 and x.max() == 1
    val_x, val_y = digits.load("val", 0)  # image 1300 = val image 103 (1197 train images come first)
    assert torch.equal(y[0, :, 0], val_x[1300 - 1197].flatten())
    assert task.model_columns([1300, 1796]) == [{"split": "val", "label": int(val_y[1300 - 1197])},
                                                {"split": "test", "label": int(digits.load("test", 0)[1][-1])}]
    one = get_task("inr", image=1300)
    assert torch.equal(one.load("train")[1], y[0])
    with pytest.raises(TaskError, match=r"image=1797.*\[0, 1797\)"):
        task.load_models("train", 0, [1797])
    with pytest.raises(TaskError, match="image=<index>"):
        task.load("train")
    with pytest.raises(TaskError, match="source='svhn'"):
        get_task("inr", source="svhn")


@pytest.mark.parametrize("group", ["C4", "D4"])
def test_group_moves_coordinates_as_the_image_group_moves_pixels(group):
    task = get_task("inr", group=group)
    g_ = task.group
    images = task.images()[0][:5]
    x = task.load_models("train", 0, [0])[0]
    for g in g_.elements():
        moved = g_.images.act_in(g_.inverse(g), images).flatten(1)  # the images moved by g^-1
        src = g_.act_in(g, x)  # ... equal the images read at act_in(g, p)
        idx = ((src[:, 1] + 1) * 3.5).round().long() * 8 + ((src[:, 0] + 1) * 3.5).round().long()
        assert torch.equal(moved, images.flatten(1)[:, idx])
        for h in g_.elements():  # a left action
            assert torch.allclose(g_.act_in(g, g_.act_in(h, x)), g_.act_in(g_.compose(g, h), x))


def test_siren_init_variants_and_the_published_size():
    task = get_task("inr")
    torch.manual_seed(0)
    dws = build_arch("siren", task)  # DWSNets / NFN: 2 -> 32 -> 32 -> 1
    assert dws.num_params == 2 * 32 + 32 + 32 * 32 + 32 + 32 + 1
    w0, w1 = dws.layers[0].weight, dws.layers[1].weight
    assert w0.abs().max() <= 1 / 2 and w0.abs().max() > 0.4  # U(-1/in, 1/in), in = 2
    bound = math.sqrt(6 / 32) / 30
    assert w1.abs().max() <= bound and w1.abs().max() > 0.9 * bound
    zero = build_arch("siren", task, bias_init="zero", output_offset=0.5, omega_0=10.0)
    assert all(float(layer.bias.detach().abs().max()) == 0 for layer in zero.layers)
    assert torch.allclose(zero(torch.zeros(3, 2)), torch.full((3, 1), 0.5))  # sin(0) = 0: only the offset is left
    plain = build_arch("siren", task, weight_init="pytorch")
    assert plain.layers[1].weight.abs().max() > 5 * bound  # nn.Linear's default, not SIREN's
    with pytest.raises(ArchError, match="weight_init 'xavier'"):
        build_arch("siren", task, weight_init="xavier")
    with pytest.raises(ArchError, match="omega_0 must be a positive"):
        build_arch("siren", task, omega_0=0)
    ff = build_arch("fourier_mlp", task, encoding="positional", n_freqs=3)
    assert ff.freqs.tolist() == [[0.5, 0], [1, 0], [2, 0], [0, 0.5], [0, 1], [0, 2]]


def test_zoo_spec_ranges_and_the_image_factor():
    spec = {"name": "z", "task": {"name": "inr"}, "arch": {"name": "siren"}, "grid": {"image": {"range": [0, 1797, 600]}}}
    assert [m.factors["image"] for m in expand(parse_zoo(spec), "s")] == [0, 600, 1200]
    with pytest.raises(SpecError, match=r"zoo.grid: task 'inr' .* factor 'image'"):
        parse_zoo({**spec, "grid": {"seed": [0]}})
    with pytest.raises(SpecError, match=r"zoo.grid.image: .*range"):
        parse_zoo({**spec, "grid": {"image": {"range": [5, 5]}}})
    with pytest.raises(SpecError, match="unknown factor 'image'"):
        parse_zoo({**spec, "task": {"name": "digits"}, "arch": {"name": "mlp"}, "grid": {"image": [0]}})


def test_population_fits_each_model_to_its_own_image(trained):
    models, result = trained
    task = get_task("inr")
    psnr, loss = result.metrics["test_psnr"], result.metrics["test_loss"]
    assert psnr.shape == (len(IMAGES), 3) and result.epochs == [0, 25, 50]
    np.testing.assert_allclose(psnr, -10 * np.log10(loss), rtol=1e-4)  # PSNR over the whole image, per checkpoint
    assert (psnr[:, -1] > psnr[:, 0] + 10).all()
    # each INR reproduces its own image, not its neighbour's: the targets were gathered per model
    module = build_arch("siren", task, width=16).eval()
    x, y = task.load_models("test", 0, IMAGES)
    preds = torch.stack([torch.func.functional_call(module, {k: torch.from_numpy(v[i, -1]) for k, v in result.weights.items()}, (x,))
                         for i in range(len(IMAGES))])
    own = ((preds - y) ** 2).mean((1, 2))
    other = ((preds - y.roll(1, 0)) ** 2).mean((1, 2))
    assert (own * 5 < other).all()
    rows = result.models
    assert [r["image"] for r in rows] == IMAGES and [r["split"] for r in rows] == ["train"] * 4 + ["val", "test"]
    assert [r["label"] for r in rows] == [int(task.images()[1][i]) for i in IMAGES]
    options = json.loads(rows[4]["task_config"])
    assert options.pop("name") == "inr" and get_task("inr", **options).image == 1300  # each row names its own image


def test_a_model_trains_the_same_alone_and_in_a_population(trained):
    models, together = trained
    alone = train_population(PopulationSpec((models[3],)))
    for k, v in together.weights.items():
        np.testing.assert_allclose(v[3], alone.weights[k][0], atol=1e-5, rtol=1e-4)


def test_fourier_mlp_fits_and_augmentation_is_refused():
    models = inr_zoo(images=[0, 7], epochs=30, arch={"name": "fourier_mlp", "config": {"width": 32, "n_freqs": 8}})
    result = train_population(populations(models)[0])
    assert (result.metrics["test_psnr"][:, -1] > result.metrics["test_psnr"][:, 0] + 5).all()
    spec = {"name": "z", "task": {"name": "inr"}, "arch": {"name": "siren"}, "grid": {"image": [0], "augmentation": [True]}}
    with pytest.raises(TrainError, match="augmentation = true is not allowed for task 'inr'"):
        train_population(populations(expand(parse_zoo(spec), "s"))[0])


def test_stored_zoo_exports_in_nfn_layout_and_queries_by_digit_and_psnr(trained, tmp_path):
    models, result = trained
    store = Store(str(tmp_path / "store"))
    store.write_population(result)
    weights, biases, ids = export_nfn(store)
    assert [tuple(w.shape) for w in weights] == [(6, 16, 2), (6, 16, 16), (6, 1, 16)]
    assert [tuple(b.shape) for b in biases] == [(6, 16), (6, 16), (6, 1)]
    i = ids.index(result.models[2]["model_id"])
    assert torch.equal(weights[1][i], torch.from_numpy(result.weights["layers.1.weight"][2, -1]))
    splits = {s: export_nfn(store, filter=pl.col("split") == s)[2] for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    threes = store.models().filter((pl.col("label") == 3) & (pl.col("test_psnr") > 30)).collect()
    expected = {r["model_id"] for r in result.models if r["label"] == 3 and r["test_psnr"] > 30}
    assert set(threes["model_id"]) == expected and len(expected) >= 1
