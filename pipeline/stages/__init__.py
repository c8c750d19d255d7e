"""The analysis stages a study can name, by name. Each stage module registers its `Stage` subclasses with
`@register_stage`; a study runs its stages in the order it lists them."""

from pipeline.stages.common import STAGES, Settings, Stage, register_stage

# Importing the stage modules registers them.
from pipeline.stages import bezier as _bezier  # noqa: E402,F401
from pipeline.stages import equivariance as _equivariance  # noqa: E402,F401
from pipeline.stages import interpolation as _interpolation  # noqa: E402,F401
from pipeline.stages import landscape as _landscape  # noqa: E402,F401
from pipeline.stages import lie as _lie  # noqa: E402,F401
from pipeline.stages import similarity as _similarity  # noqa: E402,F401
from pipeline.stages import weightspace as _weightspace  # noqa: E402,F401

__all__ = ["STAGES", "Settings", "Stage", "register_stage"]
