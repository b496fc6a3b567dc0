"""Adapters (``finetune --adapter``, ``jaxprune/adapters``): the registry, and DoRA and RandLoRA against an
independent reference, huggingface/peft 0.21.0 (torch), building the same adapter on the same tiny transformers
LLaMA with the same weights: logits before merging, after merging, and one SGD step's update equal ours to 1e-5
(relative to each array's largest entry; measured: logits <= 4e-7, updates <= 2e-6). Then the adapters where LoRA
works: int8 base with --remat, element / structured masks (DoRA and RandLoRA), a mesh and the Pallas path (DoRA),
and the CLI (DoRA: resume bitwise, merged save, export).

Fast on purpose (~45-55 s of CPU cold): one-layer models, every test-side jit compiled once per model structure at
XLA's backend optimisation level 0 (``compiled_once``)."""

from __future__ import annotations

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adapter_reference import compiled_once, pure_leaf, sgd_step, torch_sgd_step
from adapter_reference import logits as reference_logits
from conftest import make_hf_llama, random_llama, rel_err, torch_logits
from jaxprune import load
from jaxprune.adapters import ADAPTERS, Adapter, adapter_of, attach_adapter
from jaxprune.adapters.dora import DoRALinear
from jaxprune.config import tiny_config
from jaxprune.errors import UserError
from jaxprune.layers import Linear
from jaxprune.partition import add_lora, combine, partition, tree_size
from jaxprune.quantize import quantize_base
from jaxprune.train import make_loss_fn
from jaxprune.weights import linears, merge_lora, path_str

TOL = 1e-5  # PEFT parity: max |ours - PEFT| / max |PEFT|, per array
RANK, ALPHA, LR = 4, 8.0, 0.5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- the registry ------------------------------------------------------------------------------------------
def test_registry_lists_each_adapter_with_its_formula_and_citation():
    from jaxprune.cli import build_parser

    assert ADAPTERS.names()[:3] == ("lora", "dora", "randlora")
    for a in ADAPTERS:
        assert a.summary and "arXiv" in a.citation and "peft" in a.citation, a.name
    finetune = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    flag = next(a for a in finetune._actions if a.dest == "adapter")
    assert tuple(flag.choices) == ADAPTERS.names() and flag.default == "lora"
    with pytest.raises(UserError, match="unknown adapter 'vera': expected one of lora, dora, randlora"):
        ADAPTERS.get("vera")
    with pytest.raises(UserError, match="unknown feature 'fp8'"):
        Adapter("x", "y", unsupported=(("fp8", "no"),))
    with pytest.raises(UserError, match="registered twice"):
        ADAPTERS.register(Adapter("dora", "again"))


# ---- DoRA and RandLoRA vs PEFT ----------------------------------------------------------------------------
#: per adapter: PEFT's config, and each trained array as (our leaf, PEFT's parameter under the layer, whether
#: PEFT stores its transpose); the arrays whose initial values are compared too
PEFT_SPECS = {
    "dora": dict(config=lambda peft: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, use_dora=True,
                                                     target_modules=TARGETS),
                 leaves=(("lora_a", "lora_A.default.weight", True), ("lora_b", "lora_B.default.weight", True),
                         ("dora_magnitude", "lora_magnitude_vector.default.weight", False)),
                 same_init=("dora_magnitude",)),
    "randlora": dict(config=lambda peft: peft.RandLoraConfig(r=RANK, randlora_alpha=ALPHA, randlora_dropout=0.0,
                                                             target_modules=TARGETS),
                     leaves=(("randlora_lambda", "randlora_lambda.default", False),
                             ("randlora_gamma", "randlora_gamma.default", False)),
                     same_init=("randlora_lambda", "randlora_gamma")),
}


def moved(leaf: str, init: np.ndarray, rng) -> np.ndarray:
    """A trained-looking value for ``leaf`` (B ≠ 0, m ≠ ‖W‖, λ ≠ 0, ...), so that every term of the formula acts."""
    draw = {"lora_a": lambda: rng.uniform(-0.3, 0.3, init.shape), "lora_b": lambda: rng.normal(0, 0.1, init.shape),
            "dora_magnitude": lambda: init * rng.uniform(0.8, 1.2, init.shape),
            "randlora_lambda": lambda: rng.normal(0, 0.1, init.shape),
            "randlora_gamma": lambda: init * rng.uniform(0.5, 1.5, init.shape)}[leaf]
    return np.asarray(draw(), np.float32)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A tiny transformers LLaMA with q/k/v/o and MLP biases (PEFT's DoRA leaves the bias out of its rescaling)."""
    return make_hf_llama(tmp_path_factory.mktemp("adapters"), 3, attention_bias=True, mlp_bias=True, hidden_size=32,
                         intermediate_size=48, num_hidden_layers=1)


@pytest.fixture(scope="module", params=list(PEFT_SPECS))
def parity(request, hf_tiny):
    """The same tiny LLaMA as ours and as PEFT's model with the adapter, the same trained-looking values copied
    into both (RandLoRA: PEFT's random bases copied into ours), and one SGD step taken by each."""
    import peft
    import torch

    name, spec = request.param, PEFT_SPECS[request.param]
    hf_dir, torch_model = hf_tiny
    pm = peft.get_peft_model(copy.deepcopy(torch_model), spec["config"](peft))
    ours = load.load_model(hf_dir)
    add_lora(ours, rank=RANK, alpha=ALPHA, seed=0)
    assert len(attach_adapter(ours, name)) == 7
    if name == "randlora":  # PEFT's shared bases (drawn in bf16 / fp16) as float32, in both models
        tuner = pm.base_model
        a, b = (tuner.randlora_A["default"].float(), tuner.randlora_B["default"].float())
        tuner.randlora_A["default"], tuner.randlora_B["default"] = a, b
        bases = ours.layers[0].self_attn.q_proj.randlora_bases
        assert bases is ours.layers[0].mlp.down_proj.randlora_bases  # one copy, shared
        assert bases.a[...].shape == (a.shape[0], a.shape[2]) and bases.b[...].shape == tuple(b.shape)
        bases.a[...], bases.b[...] = jnp.asarray(a[:, 0].numpy()), jnp.asarray(b.numpy())
    rng = np.random.default_rng(0)
    same_init, mods = {}, {}
    for path, lin in linears(ours):
        if adapter_of(lin) != name:
            continue
        mod = pm.get_submodule("base_model.model.model." + path_str(path))
        mods[path_str(path)] = mod
        for leaf, pname, transposed in spec["leaves"]:
            tp = mod.get_parameter(pname)
            init = np.asarray(getattr(lin, leaf)[...])
            if leaf in spec["same_init"]:
                same_init[f"{path_str(path)}.{leaf}"] = (init, tp.detach().numpy().copy())
            value = moved(leaf, init, rng)
            getattr(lin, leaf)[...] = jnp.asarray(value)
            with torch.no_grad():
                tp.copy_(torch.from_numpy(value.T.copy() if transposed else value))
    tokens = rng.integers(0, 96, (2, 12))
    graphdef, frozen, trainable, masks = partition(ours)
    forward = lambda t: logits(combine(graphdef, frozen, t, masks), tokens)  # noqa: E731
    before = dict(ours=forward(trainable), peft=torch_logits(pm.eval(), tokens))

    # one SGD step: ours through the train step (the loss and gradient of every run), PEFT through torch autograd
    # (the update -lr·g each applies is compared as such: new - old in float32 would lose ~1e-4 of it to rounding)
    new_trainable, grads, loss, graphdef, frozen, masks = sgd_step(ours, tokens, LR)
    params, torch_loss = torch_sgd_step(pm, tokens, LR)
    updates, new = {}, {}
    tr1 = nnx.to_pure_dict(new_trainable)
    for lname in mods:
        for leaf, pname, transposed in spec["leaves"]:
            key = f"base_model.model.model.{lname}.{pname}"
            t = (lambda a: a.T) if transposed else (lambda a: a)  # noqa: E731
            updates[f"{lname}.{leaf}"] = (-LR * pure_leaf(grads, lname, leaf), t(-LR * params[key].grad.double().numpy()))
            new[f"{lname}.{leaf}"] = (pure_leaf(tr1, lname, leaf), t(params[key].detach().numpy()))
    assert len(updates) == len(params)  # PEFT trains nothing we do not
    combined = combine(graphdef, frozen, new_trainable, masks)
    after = dict(ours=forward(new_trainable), peft=torch_logits(pm, tokens))
    merged = dict(ours=merge_lora(combined), peft=pm.merge_and_unload())
    return dict(name=name, same_init=same_init, before=before, after=after, updates=updates, new=new,
                tokens=tokens, merged=merged, loss=(loss, torch_loss))


def test_initial_values_equal_peft(parity):
    """DoRA's m starts at the column norms PEFT computes (‖W‖ over each output feature's inputs); RandLoRA's λ at
    0 and γ at 1 / max(n, min)."""
    assert parity["same_init"]
    for name, (ours, want) in parity["same_init"].items():
        assert ours.shape == want.shape and np.abs(ours - want).max() <= 1e-6 * max(np.abs(want).max(), 1), name


def test_logits_and_loss_equal_peft_before_and_after_one_sgd_step(parity):
    assert rel_err(parity["before"]["ours"], parity["before"]["peft"]) < TOL
    assert abs(parity["loss"][0] - parity["loss"][1]) < TOL * abs(parity["loss"][1])
    assert rel_err(parity["after"]["ours"], parity["after"]["peft"]) < TOL
    assert rel_err(parity["after"]["ours"], parity["before"]["ours"]) > 1e-3  # the step changed the model


def test_sgd_update_equals_peft(parity):
    """Every trained array of all 7 linears moves as PEFT's does (DoRA: the norm a constant to the gradient, m
    trained, the norm over each output feature's inputs; RandLoRA: λ and γ through the shared bases)."""
    for name, (got, want) in parity["updates"].items():
        assert got.shape == want.shape, name
        assert np.abs(want).max() > 1e-8, name  # every array gets a gradient
        assert rel_err(got, want) < TOL, (name, rel_err(got, want))
    for name, (got, want) in parity["new"].items():  # and the weights after the step
        assert rel_err(got, want) < 1e-6, (name, rel_err(got, want))


def test_merged_model_equals_peft_merge_and_unload(parity):
    ours, pm = parity["merged"]["ours"], parity["merged"]["peft"]
    assert not any(adapter_of(l) for _, l in linears(ours))
    for path, lin in linears(ours):
        w = pm.get_submodule(path_str(path) if path == ("lm_head",) else "model." + path_str(path))
        w = w.weight.detach().numpy().T
        assert rel_err(lin.kernel[...], w) < TOL, path_str(path)
    got, want = logits(ours, parity["tokens"]), torch_logits(pm, parity["tokens"])
    assert rel_err(got, want) < TOL and rel_err(got, parity["after"]["ours"]) < TOL


# ---- DoRA and RandLoRA where LoRA works ------------------------------------------------------------------
TINY = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
                   num_layers=1)
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 10)), jnp.int32)
ADAPTED = ("dora", "randlora")


def adapted_model(name: str, base=None, *, move: bool = True, seed: int = 0):
    """A tiny random model (or a copy of ``base``) with adapter ``name`` on every decoder linear; ``move``: its
    trained arrays set to trained-looking values (``moved``)."""
    model = nnx.clone(base) if base is not None else random_llama(TINY, seed)
    add_lora(model, rank=RANK, alpha=ALPHA, seed=seed)
    attach_adapter(model, name, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _, lin in linears(model):
        if move and adapter_of(lin) == name:
            for leaf, _, _ in PEFT_SPECS[name]["leaves"]:
                getattr(lin, leaf)[...] = jnp.asarray(moved(leaf, np.asarray(getattr(lin, leaf)[...]), rng))
    return model


def logits(model, tokens=TOKENS) -> np.ndarray:
    """The model's logits (compiled once per model structure)."""
    return reference_logits(model, tokens)


@compiled_once
def _loss_and_grads(graphdef, trainable, frozen, masks, tokens):
    return jax.value_and_grad(lambda t: make_loss_fn(graphdef)(t, frozen, masks, tokens)[0])(trainable)


def loss_and_grads(model, tokens=TOKENS):
    graphdef, frozen, trainable, masks = partition(model)
    return _loss_and_grads(graphdef, trainable, frozen, masks, tokens)


def assert_trees_close(a, b, tol):
    fa, fb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert rel_err(x, y) < tol, rel_err(x, y)


def test_adapter_layers_partition_as_the_design_says():
    """What trains is in the trainable pytree (DoRA: A, B and m [out], fp32, with the output's logical axis;
    RandLoRA: λ, γ), the rest frozen (RandLoRA's bases: one copy for the model); attaching leaves the logits
    unchanged (B = 0, λ = 0); a layer keeps LoRA's draws at one seed; adapter_of names each layer's adapter."""
    base = random_llama(TINY, 0)
    lora = nnx.clone(base)
    add_lora(lora, rank=RANK, alpha=ALPHA)
    lora_logits = logits(lora, TOKENS)
    lora_size = tree_size(partition(lora)[2])
    assert adapter_of(lora.layers[0].mlp.up_proj) == "lora" and adapter_of(lora.lm_head) is None
    lins = [l for _, l in linears(lora) if l.has_lora]

    dora = adapted_model("dora", base, move=False)
    np.testing.assert_allclose(logits(dora, TOKENS), lora_logits, rtol=0, atol=1e-5)  # m / ‖W‖ = 1
    _, frozen, trainable, _ = partition(dora)
    assert tree_size(trainable) == lora_size + sum(l.out_features for l in lins)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))
    q = dora.layers[0].self_attn.q_proj
    assert q.dora_magnitude.get_metadata()["logical_axes"] == ("heads",) and q.dora_magnitude[...].dtype == jnp.float32
    assert adapter_of(q) == "dora"
    np.testing.assert_array_equal(q.lora_a[...], lora.layers[0].self_attn.q_proj.lora_a[...])

    rand = adapted_model("randlora", base, move=False)
    np.testing.assert_allclose(logits(rand, TOKENS), lora_logits, rtol=0, atol=1e-5)  # λ = 0
    _, frozen, trainable, _ = partition(rand)
    n = lambda l: -(-min(l.in_features, l.out_features) // RANK)  # noqa: E731
    assert tree_size(trainable) == sum(n(l) * (RANK + min(l.in_features, l.out_features)) for l in lins)
    big = max(max(l.in_features for l in lins), max(l.out_features for l in lins))
    small = min(max(l.in_features for l in lins), max(l.out_features for l in lins))
    base_size = tree_size(partition(base)[1])
    assert tree_size(frozen) == base_size + RANK * small + big * -(-small // RANK) * RANK  # the bases, once
    assert rand.layers[0].self_attn.k_proj.randlora_gamma.get_metadata()["logical_axes"] == (None, "kv_heads")


@pytest.mark.parametrize("name", ADAPTED)
def test_adapter_on_int8_base_with_remat_equals_the_adapter_on_the_dequantised_base(name):
    """An int8 base computes as its dequantised q·s (DoRA's norm too, as PEFT's dequantize_module_weight), and
    --remat recomputes the same layer: the loss and gradients of the adapter on an int8 base with remat, and its
    merged weights, equal the adapter's on the float base holding q·s without remat."""
    base = random_llama(TINY, 0)
    int8, flt = nnx.clone(base), nnx.clone(base)
    quantize_base(int8)
    for (_, a), (_, b) in zip(linears(int8), linears(flt)):
        if a.kernel_scale is not None:
            b.set_float_kernel(a.base_kernel())
    int8, flt = adapted_model(name, int8), adapted_model(name, flt)
    assert int8.layers[0].mlp.up_proj.kernel[...].dtype == jnp.int8
    int8.remat = True
    (l1, g1), (l2, g2) = loss_and_grads(int8), loss_and_grads(flt)
    assert abs(float(l1) - float(l2)) < 1e-6
    assert_trees_close(g1, g2, 1e-5)
    np.testing.assert_allclose(int8.layers[0].mlp.down_proj.merged_kernel(),
                               flt.layers[0].mlp.down_proj.merged_kernel(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ADAPTED)
def test_adapter_with_element_and_structured_masks_merges_exactly(name):
    """V = (W + ΔW) ⊙ M: the merged kernel keeps the element mask's zeros (DoRA: m starts at ‖W ⊙ M‖, so attaching
    leaves the logits unchanged), and the merged model with head / channel masks equals the unmerged one."""
    base = random_llama(TINY, 0)
    rng = np.random.default_rng(5)
    for _, lin in linears(base):
        if lin is not base.lm_head:
            lin.set_weight_mask(rng.random((lin.in_features, lin.out_features)) > 0.4)
    base.layers[0].self_attn.head_mask[...] = jnp.asarray([True, False, True, True])
    base.layers[0].mlp.channel_mask[...] = jnp.asarray(rng.random(48) > 0.3)
    plain = nnx.clone(base)
    add_lora(plain, rank=RANK, alpha=ALPHA)
    model = adapted_model(name, base, move=False)
    np.testing.assert_allclose(logits(model, TOKENS), logits(plain, TOKENS), rtol=0, atol=1e-5)
    model = adapted_model(name, base)
    merged = merge_lora(model)
    for (_, lin), (_, m) in zip(linears(model), linears(merged)):
        if lin.weight_mask is not None:
            assert not np.any(np.asarray(m.kernel[...])[~np.asarray(lin.weight_mask[...])])
    np.testing.assert_allclose(logits(merged, TOKENS), logits(model, TOKENS), rtol=0, atol=1e-5)


def test_dora_through_the_pallas_masked_kernel_equals_xla():
    """``--impl pallas`` routes an element-masked DoRA layer's product through the masked low-rank kernel
    (interpret mode on CPU); the output and the gradients of A, B, m equal the XLA path's."""
    rng = np.random.default_rng(2)
    lin = Linear(24, 40, kernel=jnp.asarray(rng.normal(0, 0.2, (24, 40)), jnp.float32))
    lin.set_weight_mask(rng.random((24, 40)) > 0.5)
    lin.add_lora(RANK, ALPHA, nnx.Rngs(0))
    lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.1, (RANK, 40)), jnp.float32)
    lin = DoRALinear(lin)
    x = jnp.asarray(rng.normal(size=(3, 24)), jnp.float32)

    def run(impl):
        lin.impl = impl
        graphdef, frozen, trainable, masks = partition(lin)
        f = lambda t: jnp.sum(jnp.sin(combine(graphdef, frozen, t, masks)(x)))  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(trainable)
    (y1, g1), (y2, g2) = run("xla"), run("pallas")
    assert abs(float(y1) - float(y2)) < 1e-5
    assert_trees_close(g1, g2, 1e-5)


def test_dora_on_a_mesh_equals_one_device():
    """DoRA's m carries the output's logical axis from creation, so it shards like B's output dimension; the loss
    and gradients on data=2,fsdp=2,tensor=2 equal the one-device ones. (RandLoRA's γ takes its axis the same way.)"""
    from jaxprune.meshes import ShardingRules, make_mesh
    from jaxprune.sharding import Placement

    if jax.device_count() < 8:
        pytest.skip("needs the 8 host devices conftest asks for")
    graphdef, frozen, trainable, masks = partition(adapted_model("dora"))
    want = _loss_and_grads(graphdef, trainable, frozen, masks, TOKENS)
    pl = Placement(make_mesh("data=2,fsdp=2,tensor=2"), ShardingRules(), TINY.head_dim)
    tr, fr, ma = pl.put(trainable), pl.put(frozen), pl.put(masks)
    q = nnx.to_pure_dict(tr)["layers"][0]["self_attn"]["q_proj"]
    assert q["dora_magnitude"].sharding.spec[0] == q["lora_b"].sharding.spec[1] is not None
    got = _loss_and_grads(graphdef, tr, fr, ma, pl.put(TOKENS))
    assert abs(float(got[0]) - float(want[0])) < 1e-6
    assert_trees_close(got[1], want[1], 1e-5)


# ---- the command ------------------------------------------------------------------------------------------
def test_finetune_dora_resumes_bitwise_merges_and_exports(tmp_path, tiny_hf_with_tokenizer, small_text, capsys):
    """`finetune --adapter dora`: trains A, B and m (their count in the summary), writes RUN/model merged (the
    checkpoint format records LoRA factors only); a resume from step 1 ends bitwise where the run did; `export`
    writes those merged weights. Refusals are one line, exit 2."""
    from safetensors.numpy import load_file

    from conftest import flat_params
    from jaxprune.checkpoint import read_meta
    from jaxprune.cli import main

    model_dir, _ = tiny_hf_with_tokenizer
    run = tmp_path / "run"
    args = ["finetune", str(model_dir), "--adapter", "dora", "--text", str(small_text), "--out", str(run),
            "--steps", "2", "--save-every", "1", "--val-every", "0", "--seq-len", "16", "--batch-size", "2",
            "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--warmup-steps", "0", "--no-progress", "--json"]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    outs = 2 * (32 + 16 + 16 + 32 + 48 + 48 + 32)  # m: one per output feature of the 14 linears
    assert (out["adapter"], out["merged"], out["trainable_params"]) == ("dora", True, 3712 + outs)
    assert json.loads((run / "run.json").read_text())["adapter"] == "dora"
    assert read_meta(run / "model")["lora"] == {}  # merged
    want = flat_params(run / "model")

    shutil.rmtree(run / "checkpoints" / "2")
    shutil.rmtree(run / "model")
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err[-2000:]
    got = flat_params(run / "model")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    hf = tmp_path / "hf"  # export writes the merged weights (torch's [out, in]), which moved from the base's
    assert main(["export", str(run), str(hf)]) == 0
    exported, base = load_file(hf / "model.safetensors"), load_file(model_dir / "model.safetensors")
    for i, block, name in ((0, "self_attn", "q_proj"), (1, "mlp", "down_proj")):
        key = f"model.layers.{i}.{block}.{name}.weight"
        np.testing.assert_array_equal(exported[key].T, got[f"['layers']['{i}']['{block}']['{name}']['kernel']"])
        assert np.abs(exported[key] - base[key]).max() > 1e-5

    capsys.readouterr()
    assert main([*args[:-1], "--out", str(tmp_path / "never"), "--keep-sparsity", "--distill", "--teacher",
                 str(model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jaxprune finetune: error: --adapter dora: not with --distill: the teacher is the base with every "
                   "trainable factor zeroed, and a zero magnitude zeroes a DoRA layer; distil with --adapter lora"]
    assert main([*args[:2], "--adapter", "randlora", "--impl", "pallas", "--out", str(tmp_path / "never")]) == 2
    assert "--adapter randlora: not with --impl pallas" in capsys.readouterr().err
    assert main([*args[:2], "--adapter", "vera", "--out", str(tmp_path / "never")]) == 2
    assert "argument --adapter: invalid choice: 'vera'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
