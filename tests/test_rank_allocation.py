"""Rank allocation (``finetune --rank-allocation``, ``jaxprune/adapters/rank_allocation.py``) against independent
references:

1. AdaLoRA's budget schedule, sensitivity / uncertainty EMA and masking decision equal huggingface/peft 0.21.0's
   ``RankAllocator`` (torch) fed the same weights and gradients (EMA to 1e-6 relative; budgets and masks exactly).
2. CLI runs on the tiny model (adalora, increlora, dylora): the ranks kept after each allocation step equal a numpy
   re-computation of the schedule (written here, from the papers' formulas) on the scores the run recorded in
   metrics.jsonl; AdaLoRA's recorded scores equal I-bar·U-bar recomputed from the checkpointed EMA; DyLoRA's
   sampled ranks equal the seed's draw and the first update leaves the B rows >= b at 0; a run cut after its
   step-2 checkpoint and resumed ends bitwise equal to the uninterrupted one (losses, RUN/model); and the merged
   RUN/model kernels equal W0 + s·A·diag(m)·B computed in numpy from the base and the final checkpoint's A, B, m.
3. Bad input is one line, exit 2.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import main_in_process
from jaxprune.adapters import rank_allocation as ra

R, STEPS = 4, 6


# ---- 1. AdaLoRA vs PEFT's RankAllocator ----------------------------------------------------------------------------
def _peft_allocator(shapes, **schedule):
    """A torch module holding PEFT-named lora_A [r, in], lora_E [r, 1], lora_B [out, r] per layer, and PEFT's
    RankAllocator over it."""
    import torch
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator

    class Layer(torch.nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(R, i))})
            self.lora_E = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(R, 1))})
            self.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(o, R))})

    model = torch.nn.ModuleDict({f"l{j}": Layer(i, o) for j, (i, o) in enumerate(shapes)})
    cfg = AdaLoraConfig(init_r=R, target_r=2, beta1=0.85, beta2=0.85, target_modules=["x"], **schedule)
    return model, RankAllocator(model, cfg, "default")


def test_adalora_budget_ema_and_mask_equal_peft_rank_allocator():
    import torch

    schedule = dict(tinit=3, tfinal=4, deltaT=2, total_step=20)
    shapes = [(8, 6), (5, 7), (6, 6)]
    model, peft_alloc = _peft_allocator(shapes, **schedule)
    c = ra.RankAllocationConfig(kind="adalora", rank=R, target=2, tinit=3, tfinal=4, every=2, total=20)
    assert peft_alloc.init_bgt == R * 3 and peft_alloc.target_bgt == 2 * 3
    budgets = []
    for t in range(0, 22):
        want = peft_alloc.budget_schedule(t)
        got = ra.adalora_budget(t, R * 3, 2 * 3, 3, 4, 20, 2)
        assert (got[0], bool(got[1])) == (want[0], bool(want[1])), t
        budgets.append(got[0])
    assert budgets[:4] == [12] * 4 and budgets[5] == 9 and budgets[16:] == [6] * 6  # 6·(11/13)³ + 6 = 9.63

    rng = np.random.default_rng(0)
    hook = ra.sensitivity_hook(c)
    zeros = {f"l{j}": {"lora_a": jnp.zeros((i, R)), "lora_b": jnp.zeros((R, o))} for j, (i, o) in enumerate(shapes)}
    state = (zeros, zeros)
    for step in range(3):  # three steps of weights and gradients, fed to both
        w = {f"l{j}": {"lora_a": rng.normal(size=(i, R)).astype(np.float32),
                       "lora_b": rng.normal(size=(R, o)).astype(np.float32)} for j, (i, o) in enumerate(shapes)}
        g = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), w)
        for name, layer in model.items():
            layer.lora_A["default"].data = torch.tensor(w[name]["lora_a"].T.copy())
            layer.lora_A["default"].grad = torch.tensor(g[name]["lora_a"].T.copy())
            layer.lora_B["default"].data = torch.tensor(w[name]["lora_b"].T.copy())
            layer.lora_B["default"].grad = torch.tensor(g[name]["lora_b"].T.copy())
            layer.lora_E["default"].grad = torch.zeros(R, 1)  # no Λ here: its score is 0 in PEFT's triplet sum
        peft_alloc.update_ipt(model)
        state = hook(state, jax.tree.map(jnp.asarray, w), jax.tree.map(jnp.asarray, g), None, None, jnp.int32(step))
    ibar, ubar = state
    for name in model:
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            key = f"{name}.{theirs}.default"
            for mine, peft_t in ((ibar, peft_alloc.exp_avg_ipt), (ubar, peft_alloc.exp_avg_unc)):
                np.testing.assert_allclose(np.asarray(mine[name][ours]), peft_t[key].numpy().T, rtol=1e-6, atol=0)

    scores = [ra.component_scores(ibar[n]["lora_a"], ubar[n]["lora_a"], ibar[n]["lora_b"], ubar[n]["lora_b"])
              for n in model]
    for budget in (11, 9, 7, 6):
        pattern = peft_alloc.mask_to_budget(model, budget)
        ours = ra.adalora_mask(scores, budget)
        for n, keep in zip(model, ours):
            assert keep.tolist() == pattern[f"{n}.lora_E.default"], (budget, n)
        assert sum(int(k.sum()) for k in ours) == budget


# ---- independent numpy re-computations of the schedules ------------------------------------------------------------
def cubic_budget(t, b0, bt, tinit, tfinal, total):
    """AdaLoRA Eq. 12 (arXiv 2303.10512): b0 until tinit, then bt + (b0 - bt)·(1 - (t - tinit)/(T - tfinal - tinit))³
    (floored), bt after T - tfinal."""
    if t <= tinit:
        return b0
    return bt if t > total - tfinal else int(bt + (b0 - bt) * (1 - (t - tinit) / (total - tfinal - tinit)) ** 3)


def keep_top(scores: dict, budget: int) -> dict:
    """Keep the ``budget`` highest scores over every layer (ties: the earlier layer / component first)."""
    entries = [(-s, li, j) for li, (name, row) in enumerate(scores.items()) for j, s in enumerate(row)]
    kept = sorted(entries)[:budget]
    names = list(scores)
    return {name: sorted(j for _, li, j in kept if names[li] == name) for name in names}


# ---- 2. the CLI runs -----------------------------------------------------------------------------------------------
COMMON = ["--steps", STEPS, "--batch-size", 2, "--seq-len", 32, "--lora-rank", R, "--lora-alpha", 8, "--lr", 5e-3,
          "--warmup-steps", 1, "--save-every", 2, "--keep", 5, "--val-every", 0, "--no-progress",
          "--merge", "--json"]
METHODS = {
    "adalora": ["--rank-target", 2, "--rank-tinit", 2, "--rank-tfinal", 1, "--rank-every", 1],
    "increlora": ["--rank-init", 1, "--rank-target", 2, "--rank-tinit", 2, "--rank-tfinal", 1, "--rank-grow", 3],
    "dylora": [],
}


@pytest.fixture(scope="module", params=list(METHODS))
def run(request, tmp_path_factory, tiny_hf_with_tokenizer, small_text):
    """One uninterrupted run with --merge, and a copy cut back to its step-2 checkpoint and resumed."""
    kind = request.param
    model_dir, _ = tiny_hf_with_tokenizer
    root = tmp_path_factory.mktemp(f"rank-{kind}")
    args = ["finetune", model_dir, "--text", small_text, *COMMON, "--rank-allocation", kind, *METHODS[kind]]
    full = main_in_process(*args, "--out", root / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    cut = root / "cut"
    shutil.copytree(root / "full", cut)
    shutil.rmtree(cut / "model")
    record = json.loads((cut / "run.json").read_text())
    (cut / "run.json").write_text(json.dumps({**record, "out": str(cut)}))  # as if it had run there
    for step in (4, 6):
        shutil.rmtree(cut / "checkpoints" / str(step))
    resumed = main_in_process(*args, "--out", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return dict(kind=kind, model_dir=model_dir, root=root, out=json.loads(full.stdout.splitlines()[-1]),
                metrics=[json.loads(l) for l in (root / "full" / "metrics.jsonl").read_text().splitlines()])


def final_state(model_dir, run_dir, kind):
    """(base model, final TrainState) restored from RUN/checkpoints/STEPS, the structure built the run's way."""
    from jaxprune import load
    from jaxprune.partition import add_lora, partition
    from jaxprune.train import OptimConfig, TrainCheckpoints, TrainState, make_optimizer

    c = ra.RankAllocationConfig(kind=kind, rank=R, target=2, total=STEPS)
    model = load.load_model(model_dir)
    add_lora(model, rank=R, alpha=8.0)
    ra.attach_rank_masks(model, c)
    _, _, trainable, masks = partition(model)
    hook = () if kind == "dylora" else (jax.tree.map(jnp.zeros_like, trainable),) * 2
    like = TrainState(trainable, make_optimizer(OptimConfig()).init(trainable), hook, masks)
    ckpts = TrainCheckpoints(run_dir / "checkpoints")
    try:
        state, extra = ckpts.restore(STEPS, like)
    finally:
        ckpts.close()
    assert extra["step"] == STEPS
    return load.load_model(model_dir), state


def layer(model, name):
    """The Linear at dotted ``name`` (``layers.0.self_attn.q_proj``)."""
    node = model
    for key in name.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def leaves(tree, name):
    """{layer path: array} of the leaves called ``name`` in an nnx State."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if keys[-1] == name:
            out[".".join(map(str, keys[:-1]))] = np.asarray(x)
    return out


def test_ranks_follow_an_independent_recomputation_of_the_schedule(run):
    kind, metrics = run["kind"], run["metrics"]
    events = {m["step"]: m for m in metrics if "rank_budget" in m or "rank_sample" in m}
    layers = 14
    if kind == "adalora":  # tinit 2, tfinal 1, ΔT 1: masking after steps 3, 4 and 5 (forced), fixed at 6
        assert sorted(events) == [3, 4, 5]
        for t, m in events.items():
            assert m["rank_budget"] == cubic_budget(t, R * layers, 2 * layers, 2, 1, STEPS)
            assert m["rank_keep"] == keep_top(m["rank_scores"], m["rank_budget"]), t
            assert len({s for row in m["rank_scores"].values() for s in row}) > 40  # real, distinct scores
        assert [m["rank_budget"] for m in events.values()] == [36, 29, 28]
        final = events[5]["rank_keep"]
    elif kind == "increlora":  # start at 1, +1 for the 3 best layers after steps 3, 4, 5, up to 2 per layer on average
        assert sorted(events) == [3, 4, 5]
        ranks = {name: 1 for name in events[3]["rank_scores"]}
        for t in (3, 4, 5):
            scores = events[t]["rank_scores"]
            room = [n for n in scores if ranks[n] < R]
            for n in sorted(room, key=lambda n: (-scores[n], list(scores).index(n)))[:min(3, 2 * layers - sum(
                    ranks.values()))]:
                ranks[n] += 1
            assert {n: len(k) for n, k in events[t]["rank_keep"].items()} == ranks, t
            assert all(k == list(range(len(k))) for k in events[t]["rank_keep"].values())
        assert sum(ranks.values()) == 14 + 9
        final = {n: list(range(r)) for n, r in ranks.items()}
    else:  # a rank b ~ U{1..r} per step from the seed; the saved model is the full rank
        assert sorted(events) == list(range(1, STEPS + 1))
        for t, m in events.items():
            b = int(jax.random.randint(jax.random.fold_in(jax.random.key(0 + 7919), t - 1), (), 1, R + 1))
            assert m["rank_sample"] == b
        final = None
    base, state = final_state(run["model_dir"], run["root"] / "full", kind)
    masks = leaves(state.masks, "lora_rank_mask")
    assert len(masks) == layers
    if final is not None:
        assert {n: np.flatnonzero(m).tolist() for n, m in masks.items()} == final
        assert run["out"]["ranks_kept"] == sum(len(k) for k in final.values())
    else:
        assert all(m.all() for m in masks.values()) and run["out"]["ranks_kept"] == R * layers
    if kind == "adalora":  # the recorded scores are I-bar·U-bar of the checkpointed EMA (frozen from step 5 on)
        ia, ua = leaves(state.hook_state[0], "lora_a"), leaves(state.hook_state[1], "lora_a")
        ib, ub = leaves(state.hook_state[0], "lora_b"), leaves(state.hook_state[1], "lora_b")
        for n, row in events[5]["rank_scores"].items():
            want = (ia[n] * ua[n]).mean(axis=0) + (ib[n] * ub[n]).mean(axis=1)
            np.testing.assert_allclose(row, want, rtol=1e-6, atol=0)


def test_dylora_first_update_trains_only_the_sampled_components(run, tmp_path):
    """Step 1 has lr 0 (warm-up) but fills Adam's moments with the gradients of A[:, :b1], B[:b1]; step 2 trains
    with b2: rows of B at or past max(b1, b2) never got a gradient, so they are still exactly 0 at step 2."""
    if run["kind"] != "dylora":
        pytest.skip("DyLoRA only")
    from jaxprune.train import OptimConfig, TrainCheckpoints, TrainState, make_optimizer
    from jaxprune import load
    from jaxprune.partition import add_lora, partition

    b = [run["metrics"][i]["rank_sample"] for i in (0, 1)]
    model = load.load_model(run["model_dir"])
    add_lora(model, rank=R, alpha=8.0)
    ra.attach_rank_masks(model, ra.RankAllocationConfig(kind="dylora", rank=R))
    _, _, trainable, masks = partition(model)
    ckpts = TrainCheckpoints(run["root"] / "full" / "checkpoints")
    try:
        state, _ = ckpts.restore(2, TrainState(trainable, make_optimizer(OptimConfig()).init(trainable), (), masks))
    finally:
        ckpts.close()
    bs = leaves(state.trainable, "lora_b")
    hi = max(b)
    assert all(np.all(v[hi:] == 0) for v in bs.values())
    assert all(np.abs(v[:b[1]]).max() > 0 for v in bs.values())


def test_resume_is_bitwise_and_merge_equals_w0_plus_masked_update(run):
    from jaxprune.checkpoint import restore_pytree

    root = run["root"]
    full = [json.loads(l) for l in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(l) for l in (root / "cut" / "metrics.jsonl").read_text().splitlines()]
    drop = lambda m: {k: v for k, v in m.items() if k != "tokens_per_s"}  # noqa: E731
    assert [drop(m) for m in cut] == [drop(m) for m in full]
    a = jax.tree.leaves(restore_pytree(root / "full" / "model" / "params"))
    b = jax.tree.leaves(restore_pytree(root / "cut" / "model" / "params"))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    from jaxprune import load
    base, state = final_state(run["model_dir"], root / "full", run["kind"])
    merged = load.load_model(root / "full")
    A, B = leaves(state.trainable, "lora_a"), leaves(state.trainable, "lora_b")
    M = leaves(state.masks, "lora_rank_mask")
    s = 8.0 / R
    assert len(A) == 14
    for name in A:
        w0, m = np.asarray(layer(base, name).kernel[...], np.float64), M[name]
        want = w0 + s * (A[name].astype(np.float64) * m) @ B[name]  # DyLoRA's final mask is full: r/Σm = 1
        got = np.asarray(layer(merged, name).kernel[...])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    if run["kind"] == "adalora":  # masked components had trained (B rows moved): the mask changes the merge
        assert max(np.abs(B[n][~M[n]]).max(initial=0.0) for n in A) > 1e-4


# ---- 3. bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--rank-allocation", "adalora", "--adapter", "dora"], "--rank-allocation adalora masks LoRA's rank components"),
    (["--rank-allocation", "adalora", "--rank-target", "9"], "--rank-target must be in [1, --lora-rank = 4]"),
    (["--rank-allocation", "increlora", "--rank-tinit", "6"], "leave no allocation steps in 6 steps"),
])
def test_bad_rank_allocation_input_is_one_line(extra, needle, tiny_hf_with_tokenizer, small_text, tmp_path):
    model_dir, _ = tiny_hf_with_tokenizer
    r = main_in_process("finetune", model_dir, "--text", small_text, "--out", tmp_path / "never", "--steps", 6,
                        "--lora-rank", R, *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "never").exists()
