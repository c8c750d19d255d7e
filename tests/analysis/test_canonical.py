"""Canonical form: identical for a ReLU MLP and any permuted-and-rescaled copy, same function as the original."""

import torch
from torch import nn

from analysis.canonical import canonical_distance, canonical_form, mlp_layers, pairwise_canonical_distance
from zoos.permspec import PermSpec, apply_permutation


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()


SPEC = PermSpec({"h0": (("0.weight", 0), ("0.bias", 0), ("2.weight", 1)),
                 "h1": (("2.weight", 0), ("2.bias", 0), ("4.weight", 1))})


def permuted_and_rescaled(state, gen):
    """The same function: random hidden permutations, then a random positive scale per hidden neuron."""
    s = apply_permutation(SPEC, state, SPEC.random(state, gen))
    s = dict(s)
    for w, b, nxt in [("0.weight", "0.bias", "2.weight"), ("2.weight", "2.bias", "4.weight")]:
        c = torch.exp(torch.randn(s[b].shape, generator=gen, dtype=torch.float64))
        s[w], s[b], s[nxt] = s[w] * c[:, None], s[b] * c, s[nxt] / c[None, :]
    return s


def run(state, x):
    net = mlp()
    net.load_state_dict(state)
    return net(x)


def test_canonical_form_is_identical_for_equivalent_networks():
    net = mlp()
    layers = mlp_layers(net)
    state = {k: v.detach() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, dtype=torch.float64)
    canon = canonical_form(state, layers)
    torch.testing.assert_close(run(canon, x), run(state, x))  # the canonical form computes the same function
    for _ in range(3):
        other = permuted_and_rescaled(state, gen)
        torch.testing.assert_close(run(other, x), run(state, x))
        assert (other["0.weight"] - state["0.weight"]).abs().max() > 1e-2  # naively far apart
        for k, v in canonical_form(other, layers).items():
            torch.testing.assert_close(v, canon[k])
        assert canonical_distance(state, other, layers).item() < 1e-10
    assert canonical_distance(state, {k: v.detach() for k, v in mlp().state_dict().items()}, layers).item() > 0.1


def test_population_pairwise_distance():
    net = mlp()
    layers = mlp_layers(net)
    state = {k: v.detach() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    models = [state, permuted_and_rescaled(state, gen), {k: v.detach() for k, v in mlp().state_dict().items()}]
    stacked = {k: torch.stack([m[k] for m in models]) for k in state}
    d = pairwise_canonical_distance(stacked, layers)
    assert d.shape == (3, 3)
    assert d[0, 1] < 1e-6 and d[0, 2] > 0.1 and d[1, 2] > 0.1
    # vectorised canonical form equals the per-model one
    batched = canonical_form(stacked, layers)
    for i, m in enumerate(models):
        for k, v in canonical_form(m, layers).items():
            torch.testing.assert_close(batched[k][i], v)
