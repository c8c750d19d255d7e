"""Zoo specs: validation errors name the field path and what is allowed; expand and populations are deterministic."""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from zoos.spec import (
    PopulationSpec,
    SpecError,
    ZooSpec,
    build_model,
    expand,
    format_spec_errors,
    parse_checkpoints,
    parse_zoo,
    populations,
)


def zoo(**over):
    base = {"name": "z", "task": {"name": "digits"}, "arch": {"name": "mlp", "config": {"width": 8, "depth": 1}}, "epochs": 3}
    return {**base, **over}


class Study(BaseModel):
    zoos: list[ZooSpec]


def errors_of(data: dict) -> str:
    with pytest.raises(Exception) as info:
        Study.model_validate({"zoos": [zoo(), data]})
    return format_spec_errors(info.value)


def test_error_names_the_path_the_value_and_the_range():
    msg = errors_of(zoo(grid={"lr": [0.1, 0.01, -3]}))
    assert "zoos[1].grid.lr[2]" in msg and "-3" in msg and "> 0" in msg


@pytest.mark.parametrize(
    "bad, path, allowed",
    [
        ({"grid": {"dropout": [0.1, 1.0]}}, "zoos[1].grid.dropout[1]", "[0, 1)"),
        ({"grid": {"optimizer": ["rmsprop"]}}, "zoos[1].grid.optimizer[0]", "sgd, adam"),
        ({"grid": {"lr": []}}, "zoos[1].grid.lr", "at least one"),
        ({"grid": {"seed": [1, 1]}}, "zoos[1].grid.seed[1]", "twice"),
        ({"grid": {"init": ["he"]}}, "zoos[1].grid.init[0]", "kaiming_normal"),
        ({"grid": {"activation": ["swish"]}}, "zoos[1].grid.activation[0]", "relu"),
        ({"epochs": 0}, "zoos[1].epochs", "greater than or equal to 1"),
        ({"random": {"lr": {"log_uniform": [0, 1]}}, "samples": 2}, "zoos[1].random.lr.log_uniform", "low > 0"),
        ({"random": {"lr": {"normal": [0, 1]}}, "samples": 2}, "zoos[1].random.lr", "log_uniform"),
        ({"checkpoints": [0, 7]}, "zoos[1].checkpoints", "[0, 3]"),
        ({"task": {"name": "imagenet"}}, "zoos[1].task.name", "digits"),
        ({"arch": {"name": "swin"}}, "zoos[1].arch.name", "mlp"),
        ({"arch": {"name": "mlp", "config": {"heads": 2}}}, "zoos[1].arch.config.heads", "width"),
    ],
)
def test_bad_values_are_refused_with_their_path(bad, path, allowed):
    msg = errors_of(zoo(**bad))
    assert path in msg and allowed in msg, msg


def test_unknown_factor_lists_the_allowed_ones():
    msg = errors_of(zoo(grid={"temperature": [1]}))
    assert "zoos[1].grid.temperature" in msg
    for allowed in ("seed", "lr", "weight_decay", "augmentation", "equiv_reg", "width"):
        assert allowed in msg


def test_arch_shaping_factor_the_arch_lacks_is_refused():
    msg = errors_of(zoo(arch={"name": "cnn_s"}, grid={"depth": [1, 2]}))
    assert "zoos[1].grid.depth" in msg and "no config field 'depth'" in msg


def test_parse_zoo_raises_spec_error_with_paths():
    with pytest.raises(SpecError, match=r"zoo\.grid\.momentum\[0\]: momentum = 1.5"):
        parse_zoo(zoo(grid={"momentum": [1.5]}))


def test_checkpoint_schedule():
    assert parse_checkpoints("0,1,2,3,5,10,20,...,last", 100) == [0, 1, 2, 3, 5, 10, 20, 50, 100]
    assert parse_checkpoints("0,1,...,last", 7) == [0, 1, 2, 5, 7]
    assert parse_checkpoints([2], 4) == [2, 4]  # the last epoch is always stored
    assert parse_checkpoints("all", 3) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="'ten'"):
        parse_checkpoints("0,ten", 20)


def test_expand_grid_defaults_and_stable_ids():
    spec = parse_zoo(zoo(grid={"seed": [0, 1], "lr": [0.1, 0.01, 0.001]}))
    models = expand(spec, "study")
    assert len(models) == 6 and len({m.model_id for m in models}) == 6
    assert [(m.factors["seed"], m.factors["lr"]) for m in models[:3]] == [(0, 0.1), (0, 0.01), (0, 0.001)]
    m = models[0]
    assert m.factors["optimizer"] == "sgd" and m.factors["width"] == 8 and m.factors["activation"] == "relu"
    assert m.checkpoints == (0, 1, 2, 3) and m.arch_config == {"width": 8, "depth": 1}
    assert [x.model_id for x in expand(spec, "study")] == [x.model_id for x in models]
    assert expand(spec, "other")[0].model_id != m.model_id


def test_random_factors_are_drawn_in_range_and_reproducibly():
    data = zoo(grid={"seed": [0, 1]}, samples=5, sample_seed=3,
               random={"lr": {"log_uniform": [1e-3, 1e-1]}, "width": {"int": [4, 9]}, "activation": {"choice": ["relu", "tanh"]}})
    models = expand(parse_zoo(data), "s")
    assert len(models) == 10  # grid x samples
    assert all(1e-3 <= m.factors["lr"] <= 1e-1 and 4 <= m.factors["width"] <= 9 for m in models)
    assert all(m.arch_config["width"] == m.factors["width"] for m in models)
    assert [m.factors for m in models] == [m.factors for m in expand(parse_zoo(data), "s")]
    other = expand(parse_zoo({**data, "sample_seed": 4}), "s")
    assert [m.factors["lr"] for m in other] != [m.factors["lr"] for m in models]


def test_populations_group_by_program_and_chunk():
    spec = parse_zoo(zoo(grid={"seed": [0, 1, 2], "dropout": [0.0, 0.2], "batch_size": [16, 32], "lr": [0.1, 0.2]}))
    models = expand(spec, "s")
    pops = populations(models, max_size=5)
    # batch_size splits programs; seed, dropout and lr do not: 12 models per batch size, chunks of 5
    assert [len(p) for p in pops] == [5, 5, 2, 5, 5, 2]
    assert {p.shared("batch_size") for p in pops[:3]} == {16} and {p.shared("batch_size") for p in pops[3:]} == {32}
    assert sorted(m.model_id for p in pops for m in p.models) == sorted(m.model_id for m in models)
    assert [p.shard for p in pops] == [p.shard for p in populations(expand(spec, "s"), max_size=5)]
    again = pickle.loads(pickle.dumps(pops[0]))
    assert again == pops[0] and again.shard == pops[0].shard


def test_population_refuses_models_of_different_programs():
    models = expand(parse_zoo(zoo(grid={"optimizer": ["sgd", "adam"]})), "s")
    with pytest.raises(SpecError, match="optimizer"):
        PopulationSpec(tuple(models))


def test_build_model_is_seeded_and_uses_arch_factors():
    import tasks

    task = tasks.get_task("digits")
    spec = parse_zoo(zoo(grid={"seed": [0, 1], "init": ["orthogonal"]}))
    a, b = expand(spec, "s")
    m1, m2, m1_again = (build_model(spec, m.factors, task) for m in (a, b, a))
    assert m1.config["width"] == 8
    w = "net.layers.0.weight"
    assert torch.equal(m1.state_dict()[w], m1_again.state_dict()[w])
    assert not torch.equal(m1.state_dict()[w], m2.state_dict()[w])
    q = m1.state_dict()[w]  # orthogonal rows
    torch.testing.assert_close(q @ q.T, torch.eye(8), atol=1e-5, rtol=0)


def test_yaml_style_numeric_strings_are_numbers():
    import yaml

    data = yaml.safe_load("grid: {lr: [1e-3, 0.1]}\nrandom: {weight_decay: {log_uniform: [1e-5, 1e-2]}}\nsamples: 2")
    models = expand(parse_zoo(zoo(**data)), "s")
    assert data["grid"]["lr"][0] == "1e-3"  # what YAML gives
    assert models[0].factors["lr"] == 0.001 and all(1e-5 <= m.factors["weight_decay"] <= 1e-2 for m in models)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), slots=st.integers(1, 64), cap=st.integers(1, 64), groups=st.integers(1, 3))
def test_auto_populations_split_evenly_over_slots(n, slots, cap, groups):
    """population_size: auto: per group of compatible models, near-equal populations (sizes within one),
    none above the cap, a multiple of the slots (or one per model in a group smaller than the slots)."""
    from zoos.spec import populations

    models = zoo_models_for_sizes(n, groups)
    pops = populations(models, cap, slots=slots)
    assert sorted(m.model_id for p in pops for m in p.models) == sorted(m.model_id for m in models)
    for key in {m.group_key() for m in models}:
        sizes = [len(p.models) for p in pops if p.models[0].group_key() == key]
        size_g = sum(sizes)
        assert max(sizes) <= cap and max(sizes) - min(sizes) <= 1
        assert len(sizes) == min(size_g, slots * -(-size_g // (slots * cap)))  # a multiple of slots unless capped by size_g


def zoo_models_for_sizes(n, groups):
    """n one-epoch MLP models over `groups` batch sizes (models of different batch sizes train apart)."""
    zoo = parse_zoo({"name": "z", "task": {"name": "digits"}, "arch": {"name": "mlp"},
                     "grid": {"seed": list(range(-(-n // groups))), "batch_size": [16, 32, 64][:groups]}, "epochs": 1})
    return expand(zoo, "s")[:n]


def test_population_size_auto_and_bad_values():
    base = {"name": "z", "task": {"name": "digits"}, "arch": {"name": "mlp"}, "grid": {"seed": [0]}}
    assert parse_zoo({**base, "population_size": "auto"}).population_size == "auto"
    for bad in (0, "big"):
        with pytest.raises(SpecError, match="population_size"):
            parse_zoo({**base, "population_size": bad})


def test_width_counts_units_except_where_it_is_a_multiplier():
    """resnet20's width multiplies its channels (0.25 is a quarter-width ResNet); every other width counts units."""
    resnet = {"name": "z", "task": {"name": "digits"}, "arch": {"name": "resnet20", "config": {"width": 0.25}},
              "grid": {"seed": [0]}, "epochs": 1}
    assert parse_zoo(resnet).arch.config["width"] == 0.25
    assert parse_zoo({**resnet, "arch": {"name": "resnet20"}, "grid": {"width": [0.5, 2]}}).grid["width"] == [0.5, 2]
    with pytest.raises(SpecError, match=r"zoo.arch.config.width: width = 0.5 is not allowed; architecture 'cnn' counts units"):
        parse_zoo({**resnet, "arch": {"name": "cnn", "config": {"width": 0.5}}})
    with pytest.raises(SpecError, match=r"zoo.grid.width\[1\]: width = 2.5 .* 'mlp' counts units"):
        parse_zoo({**resnet, "arch": {"name": "mlp"}, "grid": {"width": [2, 2.5]}})
    with pytest.raises(SpecError) as e:  # a width <= 0 is one error, not one a check
        parse_zoo({**resnet, "arch": {"name": "cnn", "config": {"width": 0}}})
    assert str(e.value).count("zoo.arch.config.width:") == 1


def test_a_task_or_architecture_without_options_can_be_named_alone():
    """`task: digits` and `arch: mlp` are {name: digits} and {name: mlp}; anything else than a name or a mapping
    is refused at its path."""
    short = parse_zoo(zoo(task="digits", arch="mlp"))
    assert short == parse_zoo(zoo(task={"name": "digits"}, arch={"name": "mlp"}))
    assert short.task.options == {} and short.arch.config == {}
    assert "zoos[1].task: expected a name, or a mapping with `name` and its options or config" in errors_of(zoo(task=3))
    assert "zoos[1].arch: expected a name" in errors_of(zoo(arch=["mlp"]))
