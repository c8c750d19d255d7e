"""The analysis stages a study can name, by name. Each stage module defines one `Stage` subclass."""

from pipeline.stages.common import Settings, Stage
from pipeline.stages.equivariance import Equivariance
from pipeline.stages.interpolation import Interpolation, InterpolationCross
from pipeline.stages.bezier import Bezier
from pipeline.stages.landscape import Landscape
from pipeline.stages.lie import Lie
from pipeline.stages.weightspace import Weightspace
from pipeline.stages.similarity import Funcdim, Similarity

STAGES: dict[str, Stage] = {s.name: s for s in (Interpolation(), Equivariance(), Landscape(), Weightspace(), Lie(),
                                          InterpolationCross(), Bezier(), Similarity(), Funcdim())}

__all__ = ["STAGES", "Settings", "Stage"]
