"""The architectures of published zoos (`zoos.archs.published`): the published parameter counts and Sequential
indices, and bad configurations (test_archs runs the registry-wide checks over them)."""

from __future__ import annotations

import pytest

from tasks import get_task
from zoos.archs import ArchError, build_arch
from zoos.archs.published import model_zoos_indices


def test_published_parameter_counts_and_indices():
    mnist, cifar = get_task("mnist"), get_task("cifar10")
    assert build_arch("small_cnn_zoo", mnist).num_params == 4970  # the README's count
    assert build_arch("model_zoos_cnn", mnist).num_params == 2464  # CNN-s
    assert build_arch("model_zoos_cnn", cifar, variant="CNN", preprocess={"resize": [28, 28]}).num_params == 2864
    assert build_arch("model_zoos_cnn", cifar, variant="CNN3").num_params == 10853  # CNN-m
    assert build_arch("resnet18_width", cifar, width=64).num_params == 11173962  # torchvision resnet18, CIFAR stem
    assert model_zoos_indices("CNN", 0.0) == [0, 3, 6, 9, 11]
    assert model_zoos_indices("CNN", 0.5) == [0, 4, 8, 11, 14]
    assert model_zoos_indices("CNN3", 0.0) == [0, 4, 8, 13, 16]  # the official loader's "large model zoo" indices


@pytest.mark.parametrize(
    "arch,task_name,config,match",
    [
        ("small_cnn_zoo", "digits", {}, "need larger images"),
        ("model_zoos_cnn", "mnist", dict(variant="CNN4"), "variant 'CNN4'"),
        ("model_zoos_cnn", "mnist", dict(activation="swish"), "activation 'swish'"),
        ("model_zoos_cnn", "mnist", dict(preprocess={"scale": 2}), "preprocess has no field 'scale'"),
        ("model_zoos_cnn", "mnist", dict(preprocess={"mean": [0.5, 0.5]}), "preprocess.mean has 2 values"),
        ("resnet18_width", "cifar10", dict(width=0), "width must be an integer >= 1"),
    ],
)
def test_bad_configurations_are_refused_with_the_field(arch, task_name, config, match):
    with pytest.raises(ArchError, match=match):
        build_arch(arch, get_task(task_name), **config)
