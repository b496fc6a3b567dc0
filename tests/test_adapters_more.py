"""Adapters beyond LoRA, part 2 (issue 35): Bone and SparseAdapter against independent references, and
`prune --recover-adapter`.

* Bone (``adapters/bone.py``): huggingface/peft 0.21.0's MiSS (Bone renamed; default 'balance' variant) on the same
  tiny transformers LLaMA with the same weights: logits before merging, after merging, and one SGD step's update
  equal ours to 1e-5 (relative to each array's largest entry), at r = 4 (in % r = 0) and r = 5 (PEFT pads x).
* SparseAdapter (``adapters/sparse.py``, not in PEFT): its formula in numpy on one layer (forward, merge, one SGD
  step's update); on the tiny LLaMA, PEFT's plain LoRA of rank R holding our masked factors A ⊙ M_A, B ⊙ M_B
  (s = α_peft / R set to ours) gives the same logits and merged weights, and its gradients times the masks are our
  update; the pruned entries stay exactly 0 after Adam(W) steps.
* The CLI: `finetune --adapter sparse|bone` trains, its merged RUN/model equals the unmerged trained model's logits,
  a resume ends bitwise; `prune --method loraprune --select-steps ... --recover-adapter bone` recovers with Bone on
  the units of the selection run, which trains LoRA.
"""

from __future__ import annotations

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adapter_reference import logits, pure_leaf, sgd_step, torch_sgd_step
from conftest import make_hf_llama, rel_err, torch_logits
from jaxprune import load
from jaxprune.adapters import ADAPTERS, adapter_of, attach_adapter
from jaxprune.adapters.bone import BoneLinear, shard_sum_matrix
from jaxprune.adapters.sparse import DENSITY, SparseAdapterLinear, sparse_rank
from jaxprune.layers import Linear
from jaxprune.partition import add_lora, combine, partition, tree_size
from jaxprune.weights import linears, merge_lora, path_str

TOL = 1e-5
ALPHA, LR = 8.0, 0.5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A tiny transformers LLaMA (one layer, biases on) shared by the Bone and SparseAdapter references."""
    return make_hf_llama(tmp_path_factory.mktemp("adapters-more"), 3, attention_bias=True, mlp_bias=True,
                         hidden_size=32, intermediate_size=48, num_hidden_layers=1)


# ---- Bone vs PEFT's MiSS ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[4, 5], ids=["r4", "r5-padded"])
def bone_parity(request, hf_tiny):
    import peft
    import torch

    rank = request.param
    hf_dir, torch_model = hf_tiny
    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft.MissConfig(r=rank, target_modules=TARGETS))
    ours = load.load_model(hf_dir)
    add_lora(ours, rank=rank, alpha=ALPHA, seed=0)
    assert len(attach_adapter(ours, "bone")) == 7
    rng = np.random.default_rng(rank)
    inits, names = [], []
    for path, lin in linears(ours):
        if adapter_of(lin) != "bone":
            continue
        names.append(path_str(path))
        tp = pm.get_submodule("base_model.model.model." + path_str(path)).get_parameter("miss_block.default")
        inits.append((np.asarray(lin.bone_block[...]), tp.detach().numpy().copy()))
        value = rng.normal(0, 0.1, tp.shape).astype(np.float32)  # D ≠ 0: every term acts
        lin.bone_block[...] = jnp.asarray(value)
        with torch.no_grad():
            tp.copy_(torch.from_numpy(value))
    tokens = rng.integers(0, 96, (2, 12))
    before = (logits(ours, tokens), torch_logits(pm.eval(), tokens))
    new, grads, loss, graphdef, frozen, masks = sgd_step(ours, tokens, LR)
    params, tloss = torch_sgd_step(pm, tokens, LR)
    updates = {n: (-LR * pure_leaf(grads, n, "bone_block"),
                   -LR * params[f"base_model.model.model.{n}.miss_block.default"].grad.double().numpy())
               for n in names}
    combined = combine(graphdef, frozen, new, masks)
    after = (logits(combined, tokens), torch_logits(pm, tokens))
    merged = merge_lora(combined)
    merged_peft = pm.merge_and_unload()
    return dict(rank=rank, inits=inits, before=before, after=after, loss=(loss, tloss), updates=updates,
                n_params=len(params), merged=(merged, merged_peft), tokens=tokens)


def test_bone_equals_peft_miss_before_and_after_one_sgd_step(bone_parity):
    """D starts at 0 as PEFT's (ΔW = 0); logits and loss equal PEFT's; the step's update of every D equals torch's."""
    for ours, want in bone_parity["inits"]:
        assert ours.shape == want.shape == (bone_parity["rank"], ours.shape[1]) and not ours.any() and not want.any()
    assert rel_err(*bone_parity["before"]) < TOL
    assert abs(bone_parity["loss"][0] - bone_parity["loss"][1]) < TOL * abs(bone_parity["loss"][1])
    assert rel_err(*bone_parity["after"]) < TOL
    assert rel_err(bone_parity["after"][0], bone_parity["before"][0]) > 1e-3  # the step changed the model
    assert len(bone_parity["updates"]) == bone_parity["n_params"] == 7  # PEFT trains nothing we do not
    for name, (got, want) in bone_parity["updates"].items():
        assert np.abs(want).max() > 1e-8 and rel_err(got, want) < TOL, (name, rel_err(got, want))


def test_bone_merge_equals_peft_merge_and_unload(bone_parity):
    ours, pm = bone_parity["merged"]
    assert not any(adapter_of(l) for _, l in linears(ours))
    for path, lin in linears(ours):
        w = pm.get_submodule(path_str(path) if path == ("lm_head",) else "model." + path_str(path))
        assert rel_err(lin.kernel[...], w.weight.detach().numpy().T) < TOL, path_str(path)
    got = logits(ours, bone_parity["tokens"])
    assert rel_err(got, torch_logits(pm, bone_parity["tokens"])) < TOL
    assert rel_err(got, bone_parity["after"][0]) < TOL


def test_bone_layer_formula_in_numpy():
    """ΔW[i, o] = D[i mod r, o] (in = 10, r = 4: rows 8, 9 take D's rows 0, 1), trainable r·out, nothing frozen
    added; the bias is not touched."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (10, 6)).astype(np.float32)
    lin = Linear(10, 6, kernel=jnp.asarray(w), use_bias=True, bias=jnp.asarray(rng.normal(size=6), jnp.float32))
    lin.add_lora(4, ALPHA, nnx.Rngs(0))
    bone = BoneLinear(lin)
    d = rng.normal(0, 0.3, (4, 6)).astype(np.float32)
    bone.bone_block[...] = jnp.asarray(d)
    delta = np.stack([d[i % 4] for i in range(10)])
    np.testing.assert_array_equal(np.asarray(shard_sum_matrix(10, 4)) @ d, delta)
    x = rng.normal(size=(3, 10)).astype(np.float32)
    want = x.astype(np.float64) @ (w + delta) + np.asarray(lin.bias[...])
    assert rel_err(bone(jnp.asarray(x)), want) < 1e-6
    assert rel_err(bone.merged_kernel(), w + delta) < 1e-7
    _, frozen, trainable, _ = partition(bone)
    assert tree_size(trainable) == 4 * 6 and tree_size(frozen) == 10 * 6 + 6


# ---- SparseAdapter vs numpy and vs PEFT's LoRA holding the masked factors ----------------------------------
def test_sparse_layer_formula_support_and_sgd_in_numpy():
    """R = ⌈r / d⌉ = 2r; exactly round(d·size) entries of each factor kept; masks frozen (bool Params), A and B
    trainable; y = x@W + s·x@(A⊙M_A)@(B⊙M_B) + b, the merge W + s·(A⊙M_A)@(B⊙M_B), and one SGD step's update
    -lr·M ⊙ ∂L/∂(A⊙M) in float64 numpy; the pruned entries are 0 before and after."""
    rng = np.random.default_rng(1)
    n_in, n_out, r = 12, 20, 3
    w = rng.normal(0, 0.2, (n_in, n_out)).astype(np.float32)
    bias = rng.normal(size=n_out).astype(np.float32)
    lin = Linear(n_in, n_out, kernel=jnp.asarray(w), use_bias=True, bias=jnp.asarray(bias))
    lin.add_lora(r, ALPHA, nnx.Rngs(0))
    sp = SparseAdapterLinear(lin, jax.random.key(7))
    R, s = sparse_rank(r, DENSITY), ALPHA / r
    assert (R, sp.lora_scale, DENSITY) == (6, s, 0.5)
    ma, mb = np.asarray(sp.sparse_mask_a[...]), np.asarray(sp.sparse_mask_b[...])
    assert ma.shape == (n_in, R) and mb.shape == (R, n_out) and ma.dtype == mb.dtype == np.bool_
    assert ma.sum() == round(0.5 * n_in * R) and mb.sum() == round(0.5 * R * n_out)
    a0 = np.asarray(sp.lora_a[...])
    assert not a0[~ma].any() and np.all(np.abs(a0) <= 1 / np.sqrt(n_in)) and not np.asarray(sp.lora_b[...]).any()
    graphdef, frozen, trainable, masks = partition(sp)
    frozen_flat = dict(nnx.to_flat_state(frozen))
    assert isinstance(frozen_flat[("sparse_mask_a",)], nnx.Param) and ("lora_a",) not in frozen_flat
    assert tree_size(trainable) == (n_in + n_out) * R  # dense storage; live: half of it ≈ rank r's (n_in+n_out)·r

    a = rng.uniform(-0.3, 0.3, (n_in, R)) * ma
    b = rng.normal(0, 0.1, (R, n_out)) * mb
    sp.lora_a[...], sp.lora_b[...] = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    a, b = np.asarray(sp.lora_a[...], np.float64), np.asarray(sp.lora_b[...], np.float64)
    x = rng.normal(size=(5, n_in))
    merged = w + s * (a * ma) @ (b * mb)
    want = x @ merged + bias
    assert rel_err(sp(jnp.asarray(x, jnp.float32)), want) < 1e-6
    assert rel_err(sp.merged_kernel(), merged) < 1e-6

    # loss = Σ y ⊙ c; ∂/∂A = s·xᵀ(c (B⊙M_B)ᵀ) ⊙ M_A, ∂/∂B = s·((x (A⊙M_A))ᵀ c) ⊙ M_B
    c = rng.normal(size=(5, n_out))
    graphdef, frozen, trainable, masks = partition(sp)
    loss = lambda t: jnp.sum(combine(graphdef, frozen, t, masks)(jnp.asarray(x, jnp.float32)) * c)  # noqa: E731
    g = nnx.to_pure_dict(jax.grad(loss)(trainable))
    ga, gb = s * x.T @ (c @ (b * mb).T) * ma, s * (x @ (a * ma)).T @ c * mb
    assert rel_err(-LR * np.asarray(g["lora_a"]), -LR * ga) < TOL
    assert rel_err(-LR * np.asarray(g["lora_b"]), -LR * gb) < TOL
    assert not np.asarray(g["lora_a"])[~ma].any() and not np.asarray(g["lora_b"])[~mb].any()  # exactly 0


def test_sparse_pruned_entries_stay_exactly_zero_under_adamw():
    """Five AdamW steps (weight decay on): the live entries of A and B move, the pruned ones are exactly 0."""
    rng = np.random.default_rng(2)
    lin = Linear(16, 24, kernel=jnp.asarray(rng.normal(0, 0.2, (16, 24)), jnp.float32))
    lin.add_lora(4, ALPHA, nnx.Rngs(0))
    sp = SparseAdapterLinear(lin, jax.random.key(3))
    graphdef, frozen, trainable, masks = partition(sp)
    x = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
    opt = optax.adamw(1e-2, weight_decay=0.1)
    loss = lambda t: jnp.sum(jnp.sin(combine(graphdef, frozen, t, masks)(x)))  # noqa: E731

    @jax.jit
    def step(t, st):
        u, st = opt.update(jax.grad(loss)(t), st, t)
        return optax.apply_updates(t, u), st
    t, st = trainable, opt.init(trainable)
    for _ in range(5):
        t, st = step(t, st)
    ma, mb = np.asarray(sp.sparse_mask_a[...]), np.asarray(sp.sparse_mask_b[...])
    got = nnx.to_pure_dict(t)
    a1, b1, a0 = np.asarray(got["lora_a"]), np.asarray(got["lora_b"]), np.asarray(sp.lora_a[...])
    assert not a1[~ma].any() and not b1[~mb].any()
    assert np.abs(a1 - a0)[ma].min() > 0 and np.abs(b1[mb]).min() > 0  # every live entry trained


@pytest.fixture(scope="module")
def sparse_vs_lora(hf_tiny):
    """Our SparseAdapter on the tiny LLaMA, and PEFT's plain LoRA of rank R holding A ⊙ M_A, B ⊙ M_B (its
    α = s·R, so its scale is ours): one SGD step each."""
    import peft
    import torch

    r = 2
    R = sparse_rank(r, DENSITY)
    hf_dir, torch_model = hf_tiny
    pm = peft.get_peft_model(copy.deepcopy(torch_model),
                             peft.LoraConfig(r=R, lora_alpha=ALPHA / r * R, lora_dropout=0.0, target_modules=TARGETS))
    ours = load.load_model(hf_dir)
    add_lora(ours, rank=r, alpha=ALPHA, seed=0)
    assert len(attach_adapter(ours, "sparse", seed=0)) == 7
    rng = np.random.default_rng(4)
    mask_of, names = {}, []
    for path, lin in linears(ours):
        if adapter_of(lin) != "sparse":
            continue
        n = path_str(path)
        names.append(n)
        ma, mb = np.asarray(lin.sparse_mask_a[...]), np.asarray(lin.sparse_mask_b[...])
        mask_of[n] = {"lora_a": ma, "lora_b": mb}
        a = (np.asarray(lin.lora_a[...]) * 3 * ma).astype(np.float32)
        b = (rng.normal(0, 0.1, mb.shape) * mb).astype(np.float32)
        lin.lora_a[...], lin.lora_b[...] = jnp.asarray(a), jnp.asarray(b)
        mod = pm.get_submodule("base_model.model.model." + n)
        with torch.no_grad():
            mod.get_parameter("lora_A.default.weight").copy_(torch.from_numpy(a.T.copy()))
            mod.get_parameter("lora_B.default.weight").copy_(torch.from_numpy(b.T.copy()))
    tokens = rng.integers(0, 96, (2, 12))
    before = (logits(ours, tokens), torch_logits(pm.eval(), tokens))
    new, grads, loss, graphdef, frozen, masks = sgd_step(ours, tokens, LR)
    params, tloss = torch_sgd_step(pm, tokens, LR)
    tr1 = nnx.to_pure_dict(new)
    updates, new_values = {}, {}
    for n in names:
        for leaf, pname in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            m = mask_of[n][leaf]
            tg = params[f"base_model.model.model.{n}.{pname}.default.weight"].grad.double().numpy().T
            updates[f"{n}.{leaf}"] = (-LR * pure_leaf(grads, n, leaf), -LR * tg * m)
            new_values[f"{n}.{leaf}"] = (pure_leaf(tr1, n, leaf), m)
    combined = combine(graphdef, frozen, new, masks)
    return dict(before=before, loss=(loss, tloss), updates=updates, new=new_values, tokens=tokens,
                merged=merge_lora(combined), unmerged=logits(combined, tokens))


def test_sparse_adapter_equals_peft_lora_on_its_masked_factors(sparse_vs_lora):
    """Logits and loss equal PEFT's LoRA holding the masked factors; our SGD update is PEFT's gradient times the
    mask (1e-5), so the pruned entries get exactly 0 and stay 0; the merged model equals the unmerged one."""
    d = sparse_vs_lora
    assert rel_err(*d["before"]) < TOL
    assert abs(d["loss"][0] - d["loss"][1]) < TOL * abs(d["loss"][1])
    assert len(d["updates"]) == 14
    for name, (got, want) in d["updates"].items():
        assert np.abs(want).max() > 1e-8 and rel_err(got, want) < TOL, (name, rel_err(got, want))
    for name, (value, mask) in d["new"].items():
        assert not value[~mask].any(), name
    assert rel_err(logits(d["merged"], d["tokens"]), d["unmerged"]) < TOL


def _adapter_layer(name: str, w, *, mask=None, int8: bool = False, seed: int = 0) -> Linear:
    """One layer with kernel ``w`` (stored int8 with ``int8``), an element mask, and adapter ``name`` whose trained
    arrays hold trained-looking values (drawn from ``seed``)."""
    from jaxprune.ops.int8 import quantize_int8

    lin = Linear(*w.shape, kernel=jnp.asarray(w, jnp.float32))
    if int8:
        lin.set_int8_kernel(*quantize_int8(jnp.asarray(w, jnp.float32)))
    if mask is not None:
        lin.set_weight_mask(mask)
    lin.add_lora(4, ALPHA, nnx.Rngs(seed))
    lin = SparseAdapterLinear(lin, jax.random.key(seed)) if name == "sparse" else BoneLinear(lin)
    rng = np.random.default_rng(seed + 1)
    if name == "sparse":
        lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.1, lin.lora_b[...].shape) * lin.sparse_mask_b[...], jnp.float32)
    else:
        lin.bone_block[...] = jnp.asarray(rng.normal(0, 0.1, lin.bone_block[...].shape), jnp.float32)
    return lin


def _value_and_grads(lin, x):
    graphdef, frozen, trainable, masks = partition(lin)
    f = lambda t: jnp.sum(jnp.sin(combine(graphdef, frozen, t, masks)(x)))  # noqa: E731
    return jax.jit(jax.value_and_grad(f))(trainable)


@pytest.mark.parametrize("name", ["sparse", "bone"])
def test_sparse_and_bone_on_int8_masked_and_pallas_layers(name):
    """Where LoRA works, on one layer: an int8 kernel computes as the float kernel holding q·s (output and
    gradients, 1e-5); with an element mask M the merged kernel keeps M's zeros and gives the unmerged output, and
    the Pallas masked low-rank kernel (interpret mode) equals the XLA path (output and gradients, 1e-5)."""
    from jaxprune.ops.int8 import dequantize, quantize_int8

    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.2, (24, 40)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(3, 24)), jnp.float32)
    deq = np.asarray(dequantize(*quantize_int8(jnp.asarray(w))))
    (y1, g1), (y2, g2) = _value_and_grads(_adapter_layer(name, w, int8=True), x), \
        _value_and_grads(_adapter_layer(name, deq), x)
    assert abs(float(y1) - float(y2)) < 1e-5 * abs(float(y2))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert rel_err(a, b) < 1e-5

    keep = rng.random((24, 40)) > 0.5
    lin = _adapter_layer(name, w, mask=keep)
    merged = np.asarray(lin.merged_kernel())
    assert not merged[~keep].any() and rel_err(x @ merged, lin(x)) < 1e-5
    (y1, g1) = _value_and_grads(lin, x)
    lin.impl = "pallas"
    (y2, g2) = _value_and_grads(lin, x)
    assert abs(float(y1) - float(y2)) < 1e-5 * abs(float(y1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert rel_err(b, a) < 1e-5


# ---- the commands -----------------------------------------------------------------------------------------
def _unmerged_logits(model_dir, run, name: str, tokens, rank=4, alpha=8.0):
    """The trained, unmerged model of a finetune run: the base + adapter ``name`` (seed 0), its trainable pytree
    restored from RUN/checkpoints/2 (the TrainState's first leaves)."""
    from jaxprune.checkpoint import restore_pytree

    model = load.load_model(model_dir)
    add_lora(model, rank=rank, alpha=alpha, seed=0)
    attach_adapter(model, name, seed=0)
    graphdef, frozen, trainable, masks = partition(model)
    leaves = restore_pytree(run / "checkpoints" / "2" / "state")
    treedef = jax.tree.structure(trainable)
    restored = jax.tree.unflatten(treedef, [jnp.asarray(leaves[f"{i:05d}"]) for i in range(treedef.num_leaves)])
    return logits(combine(graphdef, frozen, restored, masks), tokens)


@pytest.mark.parametrize("name", ["sparse", "bone"])
def test_finetune_sparse_and_bone_train_merge_and_resume_bitwise(name, tmp_path, tiny_hf_with_tokenizer, small_text,
                                                                 capsys):
    """`finetune --adapter NAME --merge`: the trainable count is the adapter's (sparse: (in + out)·2r dense
    storage; bone: r·out), the merged RUN/model gives the unmerged trained model's logits (1e-5), and a resume from
    step 1 ends bitwise where the run did."""
    from conftest import flat_params
    from jaxprune.checkpoint import read_meta
    from jaxprune.cli import main

    model_dir, _ = tiny_hf_with_tokenizer
    run = tmp_path / "run"
    args = ["finetune", str(model_dir), "--adapter", name, "--merge", "--text", str(small_text), "--out", str(run),
            "--steps", "2", "--save-every", "1", "--val-every", "0", "--seq-len", "16", "--batch-size", "2",
            "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--warmup-steps", "0", "--no-progress", "--json"]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    ins, outs = (32, 32, 32, 32, 32, 32, 48), (32, 16, 16, 32, 48, 48, 32)  # q k v o gate up down, 2 layers
    want_params = 2 * sum((i + o) * 8 for i, o in zip(ins, outs)) if name == "sparse" else 2 * 4 * sum(outs)
    assert (out["adapter"], out["merged"], out["trainable_params"]) == (name, True, want_params)
    assert read_meta(run / "model")["lora"] == {}
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 10))
    merged = logits(load.load_model(run / "model"), tokens)
    unmerged = _unmerged_logits(model_dir, run, name, tokens)
    base = logits(load.load_model(model_dir), tokens)
    assert rel_err(merged, unmerged) < TOL and rel_err(unmerged, base) > 1e-4  # trained, and merged exactly
    want = flat_params(run / "model")
    shutil.rmtree(run / "checkpoints" / "2")
    shutil.rmtree(run / "model")
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err[-2000:]
    got = flat_params(run / "model")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_finetune_bone_rank_above_input_size_is_one_line(tmp_path, tiny_hf_with_tokenizer, small_text, capsys):
    from jaxprune.cli import main

    model_dir, _ = tiny_hf_with_tokenizer
    capsys.readouterr()
    assert main(["finetune", str(model_dir), "--adapter", "bone", "--lora-rank", "40", "--text", str(small_text),
                 "--out", str(tmp_path / "never"), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jaxprune finetune: error: --lora-rank 40: --adapter bone: rank 40 is larger than a targeted "
                   "layer's input size 32 (Bone's blocks are r rows of the weight)"]
    assert not (tmp_path / "never").exists()


def _state_leaves(ckpt_state_dir) -> list[np.ndarray]:
    """A train checkpoint's TrainState leaves, in order (trainable first, masks last)."""
    from jaxprune.checkpoint import restore_pytree

    leaves = restore_pytree(ckpt_state_dir)
    return [np.asarray(leaves[k]) for k in sorted(leaves)]


def test_prune_recover_adapter_bone_recovers_the_selected_units(tmp_path, tiny_hf_with_tokenizer, small_text,
                                                                capsys):
    """`prune --method loraprune --select-steps 4 --recover-steps 2 --recover-adapter bone`: the selection run trains
    LoRA (its checkpoint's trainable leaves are A [in, 4], B [4, out] of the 14 linears), the recovery run trains
    Bone (its trainable leaves are D [4, out]; run.json and prune.json name it; trainable_params = Σ 4·out) on the
    selection's final masks (equal leaf by leaf, units pruned), and moved the model (its D ≠ 0). Without
    --select-steps (one LoRA run) another adapter is refused in one line, leaving no run dir."""
    from jaxprune.cli import main

    model_dir, _ = tiny_hf_with_tokenizer
    base = ["prune", str(model_dir), "--method", "loraprune", "--ratio", "0.5", "--select-steps", "4",
            "--recover-steps", "2", "--lora-rank", "4", "--prune-every", "2", "--exclude-layers", "none",
            "--text", str(small_text), "--seq-len", "16", "--batch-size", "2", "--val-every", "0", "--save-every",
            "2", "--no-progress", "--json"]
    run = tmp_path / "run"
    capsys.readouterr()
    assert main([*base, "--out", str(run), "--recover-adapter", "bone"]) == 0, capsys.readouterr().err[-2000:]
    summary = json.loads((run / "prune.json").read_text())
    assert json.loads((run / "run.json").read_text())["recover_adapter"] == summary["recover_adapter"] == "bone"
    ins, outs = (32, 32, 32, 32, 32, 32, 48), (32, 16, 16, 32, 48, 48, 32)  # q k v o gate up down
    assert summary["trainable_params"] == 2 * 4 * sum(outs)
    lora_shapes = sorted(2 * [*((i, 4) for i in ins), *((4, o) for o in outs)])
    select = _state_leaves(run / "select" / "checkpoints" / "4" / "state")
    assert sorted(x.shape for x in select[:28]) == lora_shapes  # LoRA's A, B: the selection is LoRA's
    recover = _state_leaves(run / "checkpoints" / "2" / "state")
    blocks = recover[:14]
    assert sorted(x.shape for x in blocks) == sorted(2 * [(4, o) for o in outs])  # Bone's D
    assert all(np.abs(d).max() > 0 for d in blocks)  # D starts at 0: recovery trained it
    n_masks = 4  # head_mask, channel_mask of 2 layers: the TrainState's last leaves
    assert all(np.array_equal(a, b) for a, b in zip(select[-n_masks:], recover[-n_masks:]))
    assert sum(int((~m).sum()) for m in select[-n_masks:]) > 0  # units were pruned

    capsys.readouterr()
    assert main([*base[:6], *base[10:], "--out", str(tmp_path / "never"), "--recover-adapter", "bone"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jaxprune prune: error: --recover-adapter bone: loraprune without --select-steps prunes while it "
                   "trains, in one LoRA run whose importance reads LoRA's A, B gradients: there is no separate "
                   "recovery stage; give --select-steps N to recover with another adapter"]
    assert not (tmp_path / "never").exists()
    assert main(["prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--recover-adapter", "dora",
                 "--out", str(tmp_path / "never")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "jaxprune prune: error: --recover-adapter dora: element-wise pruning writes a checkpoint without recovery; "
        "recover it with `jaxprune finetune CKPT --keep-sparsity --adapter dora`"]
    assert not (tmp_path / "never").exists()


def test_registry_names_and_flags_include_sparse_and_bone():
    from jaxprune.cli import build_parser

    assert ADAPTERS.names()[-2:] == ("sparse", "bone")
    for n in ("sparse", "bone"):
        a = ADAPTERS.get(n)
        assert a.summary and "arXiv" in a.citation and "peft" in a.citation and not a.saves_unmerged
    assert ADAPTERS.get("sparse").lora_guided and not ADAPTERS.get("bone").lora_guided
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for cmd, dest in (("finetune", "adapter"), ("prune", "recover_adapter")):
        flag = next(a for a in commands[cmd]._actions if a.dest == dest)
        assert tuple(flag.choices) == ADAPTERS.names() and flag.default == "lora"
