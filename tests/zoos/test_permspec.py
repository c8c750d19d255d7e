"""Permutation specs with block structure (attention heads): the permutations a spec allows form a group, are
drawn uniformly from it, and on a transformer every one of them (head and independent within-head permutations)
leaves the function unchanged while permutations across heads do not."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import get_task
from zoos.archs import build_arch
from zoos.archs.checks import relative_orbit_error
from zoos.permspec import PermSpec, apply_permutation, compose, from_blocks, invert, to_blocks

HEADS = PermSpec(
    {"qk": (("q", 0), ("k", 0)), "vo": (("v", 0), ("o", 1)), "plain": (("o", 0),)},
    {"qk": ("heads", 3), "vo": ("heads", 3)},
)
STATE = {"q": torch.zeros(6, 2), "k": torch.zeros(6, 2), "v": torch.zeros(6, 2), "o": torch.zeros(5, 6)}


def block_perm(n: int, m: int) -> st.SearchStrategy:
    """(sigma [n], tau [n, m]): a block permutation as its parts."""
    perm = lambda k: st.permutations(range(k)).map(torch.tensor)  # noqa: E731
    return st.tuples(perm(n), st.lists(perm(m), min_size=n, max_size=n).map(torch.stack))


def allowed(draw_sigma: torch.Tensor, taus: list[torch.Tensor], plain: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"qk": from_blocks(draw_sigma, taus[0]), "vo": from_blocks(draw_sigma, taus[1]), "plain": plain}


@settings(max_examples=40, deadline=None)
@given(block_perm(3, 2), block_perm(3, 2), st.permutations(range(5)), st.permutations(range(5)))
def test_allowed_permutations_form_a_group(p, q, plain_p, plain_q):
    """Blocks and their parts round-trip; inverses and compositions of allowed permutations are allowed."""
    (sp, tp), (sq, tq) = p, q
    assert all(torch.equal(x, y) for x, y in zip(to_blocks(from_blocks(sp, tp), 3), (sp, tp)))
    first = allowed(sp, [tp, tp.flip(0)], torch.tensor(plain_p))
    then = allowed(sq, [tq, tq.roll(1, 1)], torch.tensor(plain_q))
    for perms in (first, invert(first), compose(first, then), compose(invert(then), first)):
        HEADS.check(perms)
    w = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in STATE.items()}
    twice = apply_permutation(HEADS, apply_permutation(HEADS, w, first), then)
    once = apply_permutation(HEADS, w, compose(first, then))
    assert all(torch.equal(twice[k], once[k]) for k in w)


def test_random_draws_only_allowed_permutations_and_all_of_them():
    spec = PermSpec({"qk": (("q", 0),), "vo": (("v", 0),)}, {"qk": ("heads", 2), "vo": ("heads", 2)})
    state = {"q": torch.zeros(4), "v": torch.zeros(4)}
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(800):
        perms = spec.random(state, g)
        spec.check(perms)
        seen.add((tuple(perms["qk"].tolist()), tuple(perms["vo"].tolist())))
    assert len(seen) == 2 * 2 ** 2 * 2 ** 2  # 2! head orders x 2^2 within-head choices for qk and for vo


def test_check_refuses_what_the_spec_does_not_allow():
    ok = HEADS.identity(STATE)
    with pytest.raises(ValueError, match="moves entries across its 3 blocks"):
        HEADS.check({**ok, "qk": torch.tensor([1, 2, 0, 3, 4, 5])})
    with pytest.raises(ValueError, match="move the blocks differently"):
        HEADS.check({**ok, "qk": from_blocks(torch.tensor([1, 0, 2]), torch.arange(2).expand(3, 2))})
    with pytest.raises(ValueError, match="not a permutation"):
        HEADS.check({**ok, "plain": torch.tensor([0, 0, 1, 2, 3])})
    HEADS.unstructured().check({**ok, "qk": torch.tensor([1, 2, 0, 3, 4, 5])})  # head-unaware: any permutation


def test_a_spec_without_blocks_draws_as_it_always_did():
    plain = PermSpec(dict(HEADS.perms))
    got = plain.random(STATE, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert all(torch.equal(got[k], torch.randperm(n, generator=g)) for k, n in plain.sizes(STATE).items())


@pytest.mark.parametrize("blocks,match", [
    ({"nope": ("heads", 2)}, "names permutation 'nope'"),
    ({"qk": ("heads", 0)}, "integer >= 1, got 0"),
    ({"qk": ("heads", 3), "vo": ("heads", 2)}, "'vo' has 2 blocks, another member 3"),
])
def test_bad_blocks_are_refused_by_name(blocks, match):
    with pytest.raises(ValueError, match=match):
        PermSpec(dict(HEADS.perms), blocks)


def test_sizes_refuse_an_axis_that_does_not_split_into_the_blocks():
    with pytest.raises(ValueError, match="size 6, not a multiple of its 4 blocks"):
        PermSpec(dict(HEADS.perms), {"qk": ("heads", 4)}).sizes(STATE)


# --- on the transformers: every allowed permutation keeps the function, a permutation across heads does not


@functools.cache
def _transformer(arch: str):
    task = get_task("digits") if arch == "vit" else get_task("convex_hull")
    torch.manual_seed(0)
    model = build_arch(arch, task, width=12, depth=2, heads=3).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = task.load("test", 0)[0][:8].double()
    return model, x


@pytest.mark.parametrize("arch", ["vit", "set_transformer"])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_head_and_independent_within_head_permutations_keep_the_function(arch, data):
    model, x = _transformer(arch)
    spec, state = model.perm_spec(), {k: v.clone() for k, v in model.state_dict().items()}
    model = copy.deepcopy(model)
    sizes = spec.sizes(state)
    perms = {}
    for group, names in spec.groups().items():
        sigma, _ = data.draw(block_perm(3, 4), label=group)
        for name in names:  # each of qk and vo its own within-head permutations
            perms[name] = from_blocks(sigma, data.draw(block_perm(3, 4), label=name)[1])
    for name, n in sizes.items():
        if name not in perms:
            perms[name] = torch.tensor(data.draw(st.permutations(range(n)), label=name))
    spec.check(perms)
    with torch.no_grad():
        ref = model(x)
        model.load_state_dict(apply_permutation(spec, state, perms))
        assert relative_orbit_error(model(x), ref) < 1e-10


@pytest.mark.parametrize("arch", ["vit", "set_transformer"])
def test_permutations_across_heads_change_the_function(arch):
    """Head-unaware permutations (qk or vo as any permutation of all head dimensions) are not symmetries."""
    model, x = _transformer(arch)
    spec, state = model.perm_spec(), {k: v.clone() for k, v in model.state_dict().items()}
    model = copy.deepcopy(model)
    flat = {k: v for k, v in spec.unstructured().random(state, torch.Generator().manual_seed(1)).items()}
    with torch.no_grad():
        ref = model(x)
        for name in spec.blocks:
            one = {**spec.identity(state), name: flat[name]}
            with pytest.raises(ValueError, match="across its 3 blocks"):
                spec.check(one)
            model.load_state_dict(apply_permutation(spec, state, one))
            assert relative_orbit_error(model(x), ref) > 1e-4, name
