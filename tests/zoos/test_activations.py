"""The one activation table (zoos.archs.base.ACTIVATIONS): what it says of each activation holds, and the code
that fuses or relies on those properties agrees with it."""

import pytest
import torch

from zoos import popconv
from zoos.archs.base import ACTIVATIONS, make_activation


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_properties_hold(name):
    info, act = ACTIVATIONS[name], make_activation(name)
    z = torch.linspace(-4, 4, 81, dtype=torch.float64)
    assert isinstance(act, info.module)
    assert info.monotone == bool((act(z).diff() >= 0).all())
    assert info.homogeneous == all(torch.allclose(act(c * z), c * act(z)) for c in (0.5, 3.0))
    # a monotone one commutes with a max-pool: the population program's fused conv + pool epilogue applies it
    assert not info.monotone or name in popconv.EPILOGUE_ACTIVATIONS
