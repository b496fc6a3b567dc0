"""The cubic sparsity schedule and structured mask updates (issue 5, items 4 and 5)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxprune.config import ModelConfig
from jaxprune.layers import Mask
from jaxprune.prune.groups import excluded_layers_default
from jaxprune.prune.masks import grow_pruned, structured_sparsity, update_structured_masks
from jaxprune.prune.schedule import CubicSchedule
from jaxprune.weights import abstract_model

# 12 query heads over 3 KV heads (groups of 4), 20 MLP channels, 4 layers
CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=20, num_layers=4, num_heads=12,
                  num_kv_heads=3, head_dim=4, max_position_embeddings=32)


# ---- 4. schedule ---------------------------------------------------------------------------------
def test_cubic_schedule_values_and_prune_steps():
    sf = 0.5
    s = CubicSchedule(total_steps=100, final_ratio=sf)  # warm-up 0.1, cool-down 0.1, every 10
    assert (s.start, s.end) == (10, 90)
    cubic = lambda t: sf + (0.0 - sf) * (1 - (t - 10) / 80) ** 3  # noqa: E731  the formula, wT=10, (1-w-c)T=80
    assert s.ratio(0) == 0.0 and s.ratio(5) == 0.0 and s.ratio(9) == 0.0
    assert s.ratio(10) == 0.0  # t = wT: (1 - 0)³ = 1, so s = s_i = 0
    assert s.ratio(50) == pytest.approx(sf * (1 - 0.5 ** 3)) == pytest.approx(0.4375)
    for t in (11, 30, 50, 70, 89):
        assert s.ratio(t) == pytest.approx(cubic(t), abs=1e-12)
    assert s.ratio(90) == sf and s.ratio(99) == sf and s.ratio(100) == sf
    vals = [s.ratio(t) for t in range(101)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))  # never decreases
    assert [t for t in range(101) if s.is_prune_step(t)] == [10, 20, 30, 40, 50, 60, 70, 80, 90]

    # the end step is always a prune step, also when off the `every` grid; s_i > 0
    s = CubicSchedule(total_steps=95, final_ratio=0.6, initial_ratio=0.1, every=10)
    assert (s.start, s.end) == (9, 85)
    assert [t for t in range(96) if s.is_prune_step(t)] == [9, 19, 29, 39, 49, 59, 69, 79, 85]
    assert s.ratio(9) == pytest.approx(0.1)
    assert s.ratio(47) == pytest.approx(0.6 + (0.1 - 0.6) * (1 - 38 / 76) ** 3)
    assert s.ratio(84) < 0.6 and s.ratio(85) == 0.6


def test_cli_schedule_reaches_final_ratio_with_few_steps():
    """What `prune --steps 30` uses (t = step + 1 in 1..30): prune steps 3, 13, 23, 27; last one at s_f."""
    s = CubicSchedule(30, 0.5)
    steps = [t for t in range(1, 31) if s.is_prune_step(t)]
    assert steps == [3, 13, 23, 27]
    assert s.ratio(steps[-1]) == 0.5


def test_excluded_layers_default():
    assert excluded_layers_default(30) == (0, 1, 2, 29)
    assert excluded_layers_default(4) == (3,)


# ---- 5. masks ------------------------------------------------------------------------------------
def fresh_masks(cfg=CFG) -> nnx.State:
    """All-True masks of a model of ``cfg`` (built from shapes only)."""
    import jax.numpy as jnp

    state = nnx.state(abstract_model(cfg), Mask)
    return nnx.from_flat_state([(p, v.replace(jnp.ones(v.get_value().shape, jnp.bool_)))
                                for p, v in nnx.to_flat_state(state)])


def _heads(masks, i):
    return np.asarray(nnx.to_pure_dict(masks)["layers"][i]["self_attn"]["head_mask"])


def _chans(masks, i):
    return np.asarray(nnx.to_pure_dict(masks)["layers"][i]["mlp"]["channel_mask"])


def test_grow_pruned_takes_lowest_scores_and_keeps_old_set():
    scores = np.array([5.0, 1.0, np.nan, 3.0, 0.5, 2.0])
    p = grow_pruned(scores, np.zeros(6, bool), 2)
    assert np.flatnonzero(p).tolist() == [1, 4]
    p2 = grow_pruned(scores, p, 4)  # next lowest among kept: 2.0 (5), 3.0 (3); NaN counts as +inf
    assert np.flatnonzero(p2).tolist() == [1, 3, 4, 5]
    old = np.array([1, 0, 0, 0, 0, 0], bool)  # a unit with a high score pruned earlier stays pruned
    assert np.flatnonzero(grow_pruned(scores, old, 3)).tolist() == [0, 1, 4]
    assert np.array_equal(grow_pruned(scores, p2, 1), p2)  # a lower target never un-prunes


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
def test_masks_never_shrink(unit):
    """Random scores at each update; ratios rise, dip once, rise again. Layer 1 is excluded."""
    rng = np.random.default_rng(0)
    H, KV, G, M = 12, 3, 4, 20
    layers = [0, 2, 3]
    masks = fresh_masks()
    prev_h = {i: np.ones(H, bool) for i in range(4)}
    prev_c = {i: np.ones(M, bool) for i in range(4)}
    n_attn = KV if unit == "kv_group" else H
    reached = 0.0
    for ratio in (0.1, 0.25, 0.4, 0.3, 0.5, 0.75):
        attn = tuple(rng.random(n_attn).astype(np.float32) for _ in range(4))
        mlp = tuple(rng.random(M).astype(np.float32) for _ in range(4))
        masks = update_structured_masks(masks, (attn, mlp), ratio, CFG, unit, layers)
        reached = max(reached, ratio)
        for i in range(4):
            h, c = _heads(masks, i), _chans(masks, i)
            assert h.dtype == bool and h.shape == (H,) and c.shape == (M,)
            if i not in layers:
                assert h.all() and c.all()
                continue
            # pruned sets only grow
            assert np.all(~h >= ~prev_h[i]) and np.all(~c >= ~prev_c[i])
            # counts: int(ratio·n) of the highest ratio so far
            assert (~c).sum() == int(reached * M)
            groups = h.reshape(KV, G)
            if unit == "kv_group":  # whole groups go
                assert np.all(groups.all(1) | ~groups.any(1))
                assert (~groups.any(1)).sum() == int(reached * KV)
            else:  # same count in every KV group
                assert ((~groups).sum(1) == int(reached * G)).all()
            # the newly pruned units are the lowest-scored of those still kept
            new_c = ~c & prev_c[i]
            if new_c.any():
                kept_scores = mlp[i][prev_c[i]]
                assert mlp[i][new_c].max() <= np.sort(kept_scores)[new_c.sum() - 1]
            if unit == "kv_group":
                new_g = ~groups.any(1) & prev_h[i].reshape(KV, G).any(1)
                if new_g.any():
                    kept = attn[i][prev_h[i].reshape(KV, G).any(1)]
                    assert attn[i][new_g].max() <= np.sort(kept)[new_g.sum() - 1]
            prev_h[i], prev_c[i] = h, c
    sp = structured_sparsity(masks, CFG, layers)
    want_heads = int(0.75 * KV) / KV if unit == "kv_group" else int(0.75 * G) / G
    assert sp == {"heads_pruned": pytest.approx(want_heads), "channels_pruned": pytest.approx(int(0.75 * M) / M)}
    all_layers = structured_sparsity(masks, CFG)
    assert all_layers["channels_pruned"] == pytest.approx(3 * int(0.75 * M) / (4 * M))


def test_q_head_ratio_applies_per_group():
    """q_head with ratio 0.5 on groups of 4: 2 heads per group, the lowest two of each group
    (even if another group's heads all score lower)."""
    masks = fresh_masks()
    scores = np.array([9, 8, 1, 2, 0.1, 0.2, 0.3, 0.4, 7, 3, 6, 5], np.float32)
    attn = (scores,) * 4
    mlp = tuple(np.arange(20, dtype=np.float32) for _ in range(4))
    masks = update_structured_masks(masks, (attn, mlp), 0.5, CFG, "q_head", [0])
    assert np.flatnonzero(~_heads(masks, 0)).tolist() == [2, 3, 4, 5, 9, 11]
    assert np.flatnonzero(~_chans(masks, 0)).tolist() == list(range(10))
    masks = update_structured_masks(fresh_masks(), (tuple(scores[:3] for _ in range(4)), mlp), 0.5, CFG,
                                     "kv_group", [0])
    # kv scores [9, 8, 1]: int(0.5·3) = 1 group, the third
    assert np.flatnonzero(~_heads(masks, 0)).tolist() == [8, 9, 10, 11]
