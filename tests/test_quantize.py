"""Int8 frozen base (``--quantize-base int8``): the formula, the layer, the model, LoRAPrune on it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.config import ModelConfig
from jaxprune.layers import Linear, Mask
from jaxprune.partition import partition, tree_bytes
from jaxprune.ops.int8 import dequantize, int8_matmul, quantize_int8
from jaxprune.prune.loraprune import lora_guided_importance
from jaxprune.quantize import dequantize_base, quantize_base

from conftest import jax_logits, random_llama, run_cli

ALL = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
GQA = ModelConfig(vocab_size=50, hidden_size=24, intermediate_size=20, num_layers=2, num_heads=6,
                  num_kv_heads=3, head_dim=4, max_position_embeddings=64, tie_word_embeddings=False)


def test_quantize_int8_is_per_output_column_absmax():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((9, 6)).astype(np.float32) * np.array([1, 10, 0.01, 3, 0, 1], np.float32)
    q, s = quantize_int8(jnp.asarray(w))
    assert q.dtype == jnp.int8 and q.shape == (9, 6) and s.shape == (6,) and s.dtype == jnp.float32
    want_s = np.abs(w).max(axis=0) / 127
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-6)  # XLA divides by 127 as x · (1/127)
    safe = np.where(np.asarray(s) > 0, np.asarray(s), 1)
    assert np.array_equal(np.asarray(q), np.clip(np.round(w / safe), -127, 127).astype(np.int8))
    assert np.array_equal(np.abs(np.asarray(q)).max(axis=0), [127, 127, 127, 127, 0, 127])  # the zero column
    err = np.abs(np.asarray(dequantize(q, s)) - w)
    assert np.all(err <= want_s / 2 * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("variant", ["plain", "lora", "lora+mask"])
def test_int8_linear_equals_the_dequantised_float_linear(variant):
    rng = np.random.default_rng(1)
    lin = Linear(16, 12, use_bias=True, kernel=jnp.asarray(rng.standard_normal((16, 12)), jnp.float32),
                 bias=jnp.asarray(rng.standard_normal(12), jnp.float32))
    if "lora" in variant:
        lin.add_lora(4, 8.0, nnx.Rngs(0))
        lin.lora_b.set_value(jnp.asarray(rng.standard_normal((4, 12)), jnp.float32))
    if "mask" in variant:
        lin.weight_mask = Mask(jnp.asarray(rng.random((16, 12)) > 0.5))
    q, s = quantize_int8(lin.kernel[...])
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)

    class Holder(nnx.Module):
        def __init__(self, lin):
            self.lin = lin
    holder = Holder(lin)
    quantize_base(holder)
    assert lin.kernel[...].dtype == jnp.int8 and np.array_equal(np.asarray(lin.kernel[...]), np.asarray(q))
    got = np.asarray(lin(x))
    w = np.asarray(q, np.float64) * np.asarray(s, np.float64)
    if "lora" in variant:
        w = w + lin.lora_scale * np.asarray(lin.lora_a[...], np.float64) @ np.asarray(lin.lora_b[...], np.float64)
    if "mask" in variant:
        w = w * np.asarray(lin.weight_mask[...])
    want = np.asarray(x, np.float64) @ w + np.asarray(lin.bias[...], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int8_model_logits_equal_the_dequantised_model_and_base_bytes_shrink():
    model = random_llama(GQA, 0, lora={ALL: (3, 6.0)}, lora_b_std=0.2)
    _, frozen_f32, _, _ = partition(model)
    names = quantize_base(model)
    assert len(names) == 14 and "lm_head" not in names  # 7 linears x 2 layers
    _, frozen, _, _ = partition(model)
    tokens = np.random.default_rng(0).integers(0, 50, (2, 12))
    got = jax_logits(model, tokens)
    assert dequantize_base(model) == 14
    assert all(lin.kernel_scale is None for lin in [model.layers[0].mlp.up_proj, model.layers[1].self_attn.q_proj])
    np.testing.assert_allclose(got, jax_logits(model, tokens), rtol=1e-5, atol=1e-5)
    # bytes: every decoder kernel goes from 4 bytes per weight to 1, plus one fp32 scale per output column
    kernels = sum(4 * l.kernel[...].size for l in (m for layer in model.layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)))
    outs = 2 * (24 + 12 + 12 + 24 + 20 + 20 + 24)
    assert tree_bytes(frozen_f32) - tree_bytes(frozen) == kernels - kernels // 4 - 4 * outs


def test_lora_guided_importance_uses_the_dequantised_weight():
    """As the official code with load_in_8bit: W' = q · s + s_lora · A@B (utils.compute_sensitivity)."""
    model = random_llama(GQA, 0, lora={ALL: (3, 6.0)}, lora_b_std=0.2)
    quantize_base(model)
    _, frozen_q, trainable, _ = partition(model)
    rng = np.random.default_rng(10)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), trainable)
    fn = jax.jit(lambda t, g, f: lora_guided_importance(GQA, t, g, f, "kv_group", 2.0))
    tr, gr = nnx.to_pure_dict(trainable), nnx.to_pure_dict(grads)
    got = fn(tr, gr, nnx.to_pure_dict(frozen_q))
    dequantize_base(model)
    _, frozen_f, _, _ = partition(model)
    want = fn(tr, gr, nnx.to_pure_dict(frozen_f))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def dequantised_checkpoint(tiny_hf_with_tokenizer, tmp_path_factory):
    """The tiny model with its decoder kernels rounded through int8 and back, as a float checkpoint."""
    from jaxprune import checkpoint, load

    hf_dir, _ = tiny_hf_with_tokenizer
    model = load.load_model(hf_dir)
    quantize_base(model)
    dequantize_base(model)
    out = tmp_path_factory.mktemp("deq") / "model"
    checkpoint.save_model(model, out, tokenizer=load.load_tokenizer(hf_dir))
    return out


def test_loraprune_cli_on_int8_base_equals_the_float_run_on_the_dequantised_base(
        tiny_hf_with_tokenizer, small_text, dequantised_checkpoint, tmp_path):
    from jaxprune import load

    hf_dir, _ = tiny_hf_with_tokenizer
    common = ("--method", "loraprune", "--ratio", "0.5", "--attn-unit", "q_head", "--exclude-layers", "none",
              "--steps", "12", "--prune-every", "2", "--seq-len", "32", "--batch-size", "2", "--val-every", "0",
              "--text", small_text, "--no-progress", "--json")
    runs = {}
    for name, model, extra in (("int8", hf_dir, ("--quantize-base", "int8")), ("float", dequantised_checkpoint, ())):
        proc = run_cli("prune", model, *common, *extra, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = tmp_path / name
    losses = {n: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
              for n, d in runs.items()}
    assert len(losses["int8"]) == 12
    np.testing.assert_allclose(losses["int8"], losses["float"], rtol=1e-5)
    a, b = load.load_model(runs["int8"]), load.load_model(runs["float"])
    assert a.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32  # saved models are float
    assert [a.config.mlp_width(i) for i in range(2)] == [b.config.mlp_width(i) for i in range(2)] == [24, 24]
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 16))
    np.testing.assert_allclose(jax_logits(a, tokens), jax_logits(b, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra", [("--method", "llm-pruner"), ("--method", "magnitude", "--sparsity", "0.5")])
def test_int8_base_refused_where_the_base_is_differentiated_or_rewritten(tiny_hf_with_tokenizer, small_text,
                                                                         tmp_path, extra):
    hf_dir, _ = tiny_hf_with_tokenizer
    proc = run_cli("prune", hf_dir, *extra, "--quantize-base", "int8", "--text", small_text, "--out", tmp_path / "r")
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("jaxprune prune: error: --quantize-base int8: ") and "base" in line[40:], line
    assert not (tmp_path / "r").exists()


def test_int8_matmul_gradient_wrt_x_is_the_dequantised_weights():

    rng = np.random.default_rng(3)
    q, s = quantize_int8(jnp.asarray(rng.standard_normal((16, 12)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    w = dequantize(q, s)
    got = jax.grad(lambda x: jnp.sum(int8_matmul(x, q, s) * dy))(x)
    want = jax.grad(lambda x: jnp.sum((x @ w) * dy))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(jax.grad(lambda s: jnp.sum(int8_matmul(x, q, s)))(s)) == 0)  # frozen base


def test_int8_loraprune_step_never_holds_every_float_weight():
    """Compiled memory of the LoRAPrune step: the int8 base cuts the arguments by ~3/4 of the float
    kernels and adds less than one float kernel of temporaries (XLA must not hoist or share the float
    copies of q across layers: that would add all of them, 24 MB here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_pruning_memory import compile_step, memory

    cfg = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=4,
                      num_kv_heads=2, head_dim=64, max_position_embeddings=256)
    f32, i8 = (memory(compile_step("loraprune", cfg, jnp.float32, 1, 32, 4, False, q)) for q in (False, True))
    kernel_bytes = 6 * 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 1024)
    assert f32["argument_bytes"] - i8["argument_bytes"] >= 0.74 * kernel_bytes
    assert i8["temp_bytes"] - f32["temp_bytes"] < 4 * 256 * 1024  # one float MLP kernel


def _record_grads():
    """Pass-through optax transformation whose state is the last gradient it saw (the step's own gradient)."""
    import optax
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def _loraprune_run(cfg, model, optimizer, tokens, mesh=None):
    """LoRAPrune steps (importance hook on) of ``model``, one per batch of ``tokens`` [steps, accum, B, S], on one
    device or on ``mesh``. Returns [(loss, {path: array} of (trainable, opt_state, hook_state))] after each step."""
    from jaxprune.prune.loraprune import importance_hook, init_importance
    from jaxprune.meshes import ShardingRules, make_mesh
    from jaxprune.sharding import Placement, path_string
    from jaxprune.train import make_train_step, place_train_state, state_shardings_of

    graphdef, frozen, trainable, masks = partition(model)
    hook, hook_state = importance_hook(cfg, "kv_group", 2.0), init_importance(cfg, "kv_group")
    if mesh is None:
        step = make_train_step(graphdef, optimizer, grad_hook=hook, donate=False)
        state, put = (trainable, optimizer.init(trainable), hook_state), jnp.asarray
    else:
        pl = Placement(make_mesh(mesh), ShardingRules(), cfg.head_dim)
        frozen = pl.put(frozen)
        st = place_train_state(pl, optimizer, trainable, masks, hook_state)
        masks, state = st.masks, (st.trainable, st.opt_state, st.hook_state)
        step = make_train_step(graphdef, optimizer, grad_hook=hook, donate=False,
                               state_shardings=state_shardings_of(st))
        put = lambda b: pl.put_batch(b, 1)  # noqa: E731
    out = []
    for i in range(len(tokens)):
        *state, m = step(*state, frozen, masks, put(tokens[i]), jnp.int32(i))
        leaves = jax.tree_util.tree_flatten_with_path(tuple(state))[0]
        out.append((float(m["loss"]), {path_string(p): np.asarray(x, np.float64) for p, x in leaves}))
    return out, frozen


def _assert_same_runs(got, want, what):
    """Loss, gradient (state 0 of the chain), weights, Adam moments and importance after every step, each leaf
    to 1e-4 of its largest |value| (the gradient to 1e-4 of the largest gradient: its scale is checked)."""
    assert len(got) == len(want)
    for i, ((loss, leaves), (want_loss, want_leaves)) in enumerate(zip(got, want)):
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (what, i, loss, want_loss)
        assert leaves.keys() == want_leaves.keys()
        gscale = max(np.abs(v).max() for k, v in want_leaves.items() if k.startswith("1.0."))  # grads
        for k, v in want_leaves.items():
            scale = gscale if k.startswith("1.0.") else np.abs(v).max()
            np.testing.assert_allclose(leaves[k], v, rtol=0, atol=1e-4 * scale, err_msg=f"{what}: step {i} {k}")


def test_int8_loraprune_steps_equal_the_float_steps_and_the_mesh():
    """3 LoRAPrune steps (Adam at a constant lr 1e-2; SGD, where the gradient's scale matters) on distinct
    batches of 2 micro-batches: the int8 base equals the float base holding the dequantised weights, in
    loss, gradient, weights, optimizer state and importance after every step; and the int8 run on
    data=2,fsdp=2,tensor=2 equals it on one device. Scales shard over their kernel's output axis (plus fsdp,
    which no embed dim claims in a 1-D array, as for LoRA's B)."""
    import optax

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    tokens = np.random.default_rng(0).integers(0, 64, (3, 2, 8, 16))
    for opt_name, inner in (("adam", optax.adam(1e-2)), ("sgd", optax.sgd(0.5))):
        optimizer = optax.chain(_record_grads(), inner)
        model = random_llama(cfg, 0, lora={ALL: (4, 8.0)}, lora_b_std=0.1)
        quantize_base(model)
        int8, _ = _loraprune_run(cfg, model, optimizer, tokens)
        on_mesh, frozen = _loraprune_run(cfg, model, optimizer, tokens, mesh="data=2,fsdp=2,tensor=2")
        dequantize_base(model)
        float_run, _ = _loraprune_run(cfg, model, optimizer, tokens)
        assert len({loss for loss, _ in int8}) == 3  # the weights move and every batch differs
        first, last = int8[0][1], int8[-1][1]
        assert np.abs(last["0.layers.0.mlp.up_proj.lora_b"] - first["0.layers.0.mlp.up_proj.lora_b"]).max() > 1e-3
        _assert_same_runs(int8, float_run, f"{opt_name}: int8 vs dequantised float")
        _assert_same_runs(on_mesh, int8, f"{opt_name}: int8 on a mesh vs one device")
    leaves = {".".join(str(k) for k in p): v for p, v in nnx.to_flat_state(frozen)}
    kernel, scale = leaves["layers.0.mlp.up_proj.kernel"], leaves["layers.0.mlp.up_proj.kernel_scale"]
    assert kernel.dtype == jnp.int8
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor") and tuple(scale.sharding.spec) == (("tensor", "fsdp"),)
