"""The stage registry: every stage a module defines is registered, once, under the name a study uses."""

import inspect

from pipeline.stages import STAGES, Stage


def _subclasses(cls: type) -> set[type]:
    return {s for c in cls.__subclasses__() for s in {c, *_subclasses(c)}}


def test_every_concrete_stage_is_registered_under_its_name():
    concrete = {c for c in _subclasses(Stage) if not inspect.isabstract(c) and c.__module__.startswith("pipeline.")}
    assert {type(s) for s in STAGES.values()} == concrete
    assert all(name == stage.name for name, stage in STAGES.items())
