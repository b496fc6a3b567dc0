"""Issue 33, part 1: the Pallas kernels under `shard_map` (jaxprune/ops/sharded.py). On 8 host devices (conftest)
the kernels run in interpret mode inside `shard_map`; `finetune --keep-sparsity`, eval of a block-pattern model and
SLoPe pretraining with `--impl pallas` on `fsdp=4,data=2` and `tensor=2,data=4` equal `--impl xla` on one device,
and the step's jaxpr shows the wrapper is what runs: every `pallas_call` sits in a `shard_map` whose body sees the
per-device operand shapes the partition rules promise (and psums where they say)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import flat_params, make_hf_llama, random_llama
from conftest import run_main_json as run
from jaxprune import load, runs
from jaxprune.config import tiny_config
from jaxprune.meshes import make_mesh
from jaxprune.ops import sharded
from jaxprune.ops.sharded import KernelMesh, masked_lowrank_plan
from jaxprune.partition import partition
from jaxprune.sharding import Placement
from jaxprune.train import make_eval_step
from jaxprune.weights import block_sparse_linears, linears, model_arrays, set_linear_impl

MESHES = ("fsdp=4,data=2", "tensor=2,data=4")

if jax.device_count() < 8:
    pytest.skip("needs the 8 host devices conftest asks for", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _compile_fast():
    """XLA at optimisation level 0 in this module (as ``conftest.compile_fast``): the interpret-mode kernels compile
    about twice as fast, and the comparisons are of numbers, float32-accumulated either way."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


# ---- the jaxpr: where the kernels run -----------------------------------------------------------
def _subjaxprs(eqn):
    for v in eqn.params.values():
        for item in v if isinstance(v, (list, tuple)) else (v,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def _walk(jaxpr, inside=False):
    """(equation, inside a shard_map?) for every equation of ``jaxpr`` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn, inside
        for sub in _subjaxprs(eqn):
            yield from _walk(sub, inside or eqn.primitive.name == "shard_map")


def kernel_shard_maps(closed_jaxpr):
    """[(local operand shapes, psum'd axes)] of every shard_map; asserts each pallas_call is inside one and each
    shard_map holds one."""
    eqns = list(_walk(closed_jaxpr.jaxpr))
    calls = [inside for e, inside in eqns if e.primitive.name == "pallas_call"]
    assert calls and all(calls), "a pallas_call outside shard_map"
    out = []
    for e, _ in eqns:
        if e.primitive.name == "shard_map":
            body = list(_walk(e.params["jaxpr"]))
            assert any(b.primitive.name == "pallas_call" for b, _ in body)
            psums = {tuple(b.params["axes"]) for b, _ in body if b.primitive.name.startswith("psum")}
            shapes = [tuple(v.aval.shape) for v in e.params["jaxpr"].invars]
            out.append((tuple(s for s in shapes if len(s) > 1), psums))  # 1-D: the block walk's index tables
    return out


@pytest.fixture
def no_train_checkpoints(monkeypatch):
    """The CLI runs here skip orbax's end-of-run checkpoint (not what these tests check): saving the state of an
    8-device mesh compiles one slice per shard shape, 5-10 s a run on the 2-core box."""
    from jaxprune.train import TrainCheckpoints

    monkeypatch.setattr(TrainCheckpoints, "save", lambda self, step, state, extra: None)


def record_steps(monkeypatch):
    """Patch the train step the runs build: its jaxpr on the first call is appended to the returned list."""
    seen, make = [], runs.make_train_step

    def recording(*a, **k):
        step = make(*a, **k)

        def call(*args):
            if not seen:
                seen.append(jax.make_jaxpr(step)(*args))
            return step(*args)
        return call
    monkeypatch.setattr(runs, "make_train_step", recording)
    return seen


# ---- the rules and the auto decision (no kernel runs) -------------------------------------------
def test_partition_rules_and_auto_picks_the_kernel_on_gpu_tpu_meshes():
    """The specs the module docstring writes down, and `auto` -> the kernel on a GPU / TPU mesh of any size
    (each masked Linear then carries the run's KernelMesh); XLA on CPU; `pallas` on CPU keeps the mesh."""
    fsdp, tensor = (KernelMesh.of(make_mesh(s)) for s in MESHES)
    x = (8, 16, 64)
    col, row = masked_lowrank_plan(tensor, x, (64, 96), ("embed", "mlp")), masked_lowrank_plan(
        tensor, x[:2] + (96,), (96, 64), ("mlp", "embed"))
    assert (col.rows, col.k_axes, col.n_axes) == (("data",), (), ("tensor",))
    assert (col.x, col.w, col.a, col.b, col.y) == (P("data", None, None), P(None, "tensor"), P(None, None),
                                                   P(None, "tensor"), P("data", None, "tensor"))
    assert (row.x, row.w, row.a, row.b, row.y) == (P("data", None, "tensor"), P("tensor", None), P("tensor", None),
                                                   P(None, None), P("data", None, None))
    f = masked_lowrank_plan(fsdp, x, (64, 96), ("embed", "mlp"))  # weights gathered over fsdp, rows over both
    assert (f.rows, f.k_axes, f.n_axes, f.x, f.w) == (("data", "fsdp"), (), (), P(("data", "fsdp"), None, None),
                                                      P(None, None))
    assert masked_lowrank_plan(fsdp, (3, 16, 64), (64, 96), ("embed", "mlp")).rows == ()  # 3 rows: not split
    assert masked_lowrank_plan(tensor, x, (64, 48), ("embed", "kv_heads")).n_axes == ("tensor",)
    assert masked_lowrank_plan(tensor.with_head_dim(16), x, (64, 48), ("embed", "kv_heads")).n_axes == ()  # 3 heads

    model = random_llama(tiny_config(), seed=0)
    one = KernelMesh.of(make_mesh("data=1"))
    for backend, mesh, want in (("gpu", tensor, "pallas"), ("tpu", tensor, "pallas"), ("gpu", one, "pallas"),
                                ("gpu", None, "pallas"), ("cpu", tensor, "xla")):
        assert set_linear_impl(model, "auto", mesh=mesh, backend=backend) == want, (backend, mesh)
        meshes = {lin.kernel_mesh for _, lin in linears(model)}
        assert meshes == ({tensor.with_head_dim(16)} if (want, mesh) == ("pallas", tensor) else {None}), backend
    assert set_linear_impl(model, "pallas", mesh=tensor, backend="cpu") == "pallas"  # interpret mode
    assert {lin.kernel_mesh for _, lin in linears(model)} == {tensor.with_head_dim(16)}
    assert set_linear_impl(model, "pallas", mesh=fsdp, backend="gpu") == "pallas"
    assert {lin.kernel_mesh.mesh for _, lin in linears(model)} == {fsdp.mesh}


def test_wrapper_gradients_with_both_weight_dims_split_and_block_sparse():
    """A 2-D split (custom rules: batch on data only, so fsdp becomes a model axis: K over fsdp, N over tensor):
    y, dx, dA, dB of the wrapper equal the reference's (1e-5), with every reduction of the docstring in play; and
    the block-sparse wrapper's y, dx, dvalues (rows over data x fsdp) equal x @ W's."""
    from jaxprune.kernels import reference
    from jaxprune.meshes import DEFAULT_AXIS_RULES

    km = KernelMesh.of(make_mesh("data=2,fsdp=2,tensor=2"), {**DEFAULT_AXIS_RULES, "batch": ("data",)})
    plan = masked_lowrank_plan(km, (4, 8, 32), (32, 48), ("embed", "mlp"))
    assert (plan.rows, plan.k_axes, plan.n_axes) == (("data",), ("fsdp",), ("tensor",))
    rng = np.random.default_rng(0)
    x, w, a, b, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                      for s in ((4, 8, 32), (32, 48), (32, 4), (4, 48), (4, 8, 48)))
    mask = jnp.asarray(rng.random((32, 48)) < 0.5)

    def loss(f):
        return lambda x, a, b: jnp.sum(f(x, a, b) * dy)
    got = jax.jit(jax.value_and_grad(loss(lambda x, a, b: sharded.masked_lowrank_matmul(
        x, w, a, b, mask, 0.5, km, ("embed", "mlp"))), argnums=(0, 1, 2)))(x, a, b)
    want = jax.value_and_grad(loss(lambda x, a, b: reference.masked_lowrank_matmul_ref(x, w, a, b, mask, 0.5)),
                              argnums=(0, 1, 2))(x, a, b)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)

    # block-sparse: dx local to each device's rows, dvalues psum'd over them (rows over data x fsdp here)
    from jaxprune.kernels import BlockSparseMatrix

    km = KernelMesh.of(make_mesh("fsdp=4,data=2"))
    x, dy = x.reshape(8, 4, 32), dy.reshape(8, 4, 48)
    assert km.row_axes(8) == ("data", "fsdp")
    bsm = BlockSparseMatrix.from_dense(w, np.arange(6).reshape(2, 3) % 2 == 0, (16, 16))
    grads = [jax.jit(jax.value_and_grad(lambda x, v: jnp.sum(f(x, BlockSparseMatrix(v, bsm.layout)) * dy),
                                        argnums=(0, 1)))(x, bsm.values)
             for f in (lambda x, m: sharded.block_sparse_matmul(x, m, km), lambda x, m: x @ m.to_dense())]
    for g, r in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


# ---- finetune --keep-sparsity --------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_hf(fixtures, tmp_path_factory):
    """A one-layer random HF LLaMA (hidden 32, MLP 48, 4 heads / 2 KV heads of 8, SmolLM2's tokenizer) with half of
    every decoder weight zeroed: `finetune --keep-sparsity` takes M = (W != 0). (One layer: the interpret-mode
    kernels' compile time is what these tests cost.)"""
    import shutil

    from safetensors.numpy import load_file, save_file

    out, _ = make_hf_llama(tmp_path_factory.mktemp("sharded"), 0, vocab_size=49152, hidden_size=32,
                           intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures.hf_dir / name, out / name)
    arrays = load_file(out / "model.safetensors")
    rng = np.random.default_rng(0)
    for name, a in arrays.items():
        if name.endswith("proj.weight"):
            arrays[name] = np.where(rng.random(a.shape) < 0.5, 0, a).astype(a.dtype)
    save_file(arrays, out / "model.safetensors", metadata={"format": "pt"})
    return out


FINETUNE_LOCAL = {  # per-device (x, W, A, B, M) of the forward kernel: micro-batch 8 x 16 tokens, rank 4
    "fsdp=4,data=2": {  # rows / 8, weights whole (gathered over fsdp)
        ((1, 16, 32), (32, 32), (32, 4), (4, 32), (32, 32)), ((1, 16, 32), (32, 16), (32, 4), (4, 16), (32, 16)),
        ((1, 16, 32), (32, 48), (32, 4), (4, 48), (32, 48)), ((1, 16, 48), (48, 32), (48, 4), (4, 32), (48, 32))},
    "tensor=2,data=4": {  # rows / 4; q/k/v/gate/up split on N (columns), o/down on K (rows) over tensor
        ((2, 16, 32), (32, 16), (32, 4), (4, 16), (32, 16)), ((2, 16, 32), (32, 8), (32, 4), (4, 8), (32, 8)),
        ((2, 16, 32), (32, 24), (32, 4), (4, 24), (32, 24)), ((2, 16, 16), (16, 32), (16, 4), (4, 32), (16, 32)),
        ((2, 16, 24), (24, 32), (24, 4), (4, 32), (24, 32))},
}


def test_finetune_keep_sparsity_on_meshes_equals_one_device_xla(sparse_hf, small_text, tmp_path, capsys,
                                                                 monkeypatch, no_train_checkpoints):
    """Three SGD steps (lr 0.5: a mis-reduced gradient moves the factors differently) on distinct batches: losses
    and trained LoRA factors on both meshes equal one-device XLA (1e-5); the kernel ran under shard_map with
    the promised per-device shapes, and psum'd the forward over tensor exactly in the row-parallel layers."""
    from jaxprune.commands import finetune

    monkeypatch.setattr(finetune, "make_optimizer", lambda c: optax.sgd(0.5))
    common = ["finetune", sparse_hf, "--text", small_text, "--keep-sparsity", "--steps", "3", "--seq-len", "16",
              "--batch-size", "8", "--lora-rank", "4", "--warmup-steps", "0", "--val-every", "0", "--no-progress",
              "--json"]
    ref = run(capsys, *common, "--impl", "xla", "--mesh", "data=1", "--out", tmp_path / "xla")
    want = model_arrays(load.load_model(tmp_path / "xla" / "model"))
    want_loss = [json.loads(l)["loss"] for l in (tmp_path / "xla" / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(l)]
    assert ref["impl"] == "xla" and len(set(want_loss)) == 3
    for spec in MESHES:
        steps = record_steps(monkeypatch)
        out = tmp_path / spec.replace(",", "_").replace("=", "")
        assert run(capsys, *common, "--impl", "pallas", "--mesh", spec, "--out", out)["impl"] == "pallas"
        losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(l)]
        np.testing.assert_allclose(losses, want_loss, rtol=1e-5, err_msg=spec)
        got = model_arrays(load.load_model(out / "model"))
        factors = [k for k in want if k[-1] in ("lora_a", "lora_b")]
        assert len(factors) == 14 and max(float(np.abs(want[k]).max()) for k in factors if k[-1] == "lora_b") > 1e-3
        for k in factors:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=f"{spec} {k}")
        maps = kernel_shard_maps(steps[0])
        fwd = [m for m in maps if len(m[0]) == 5]
        assert len(fwd) == 7 and len(maps) == 14, spec  # 7 masked linears, forward + backward
        assert {shapes for shapes, _ in fwd} == FINETUNE_LOCAL[spec], spec
        psummed = {shapes: psums for shapes, psums in fwd if psums}  # the forward psums over K's split only
        row_parallel = {s for s in FINETUNE_LOCAL[spec] if spec.startswith("tensor") and s[0][-1] in (16, 24)}
        assert set(psummed) == row_parallel and all(p == {("tensor",)} for p in psummed.values()), spec


# ---- eval of a block-pattern model ---------------------------------------------------------------
def block_model(seed=0, block=16):
    """The tiny random model (hidden 64, MLP 96) with every decoder linear pruned to whole 16x16 blocks (half)."""
    model = random_llama(tiny_config(num_layers=1), seed=seed)
    rng = np.random.default_rng(seed)
    for path, lin in linears(model):
        if path[-1] == "lm_head":
            continue
        k, n = lin.in_features // block, lin.out_features // block
        keep = rng.permutation(k * n) < (k * n) // 2
        lin.set_weight_mask(np.kron(keep.reshape(k, n), np.ones((block, block), bool)))
    return model


def test_eval_of_a_block_pattern_model_on_meshes_equals_one_device_xla():
    """The summed NLL of a block-pattern model through the block-sparse kernel under shard_map on both meshes
    equals one-device XLA's (1e-5); rows split over the batch axes, the live blocks whole on every device."""
    tokens = np.random.default_rng(1).integers(0, 128, (8, 16)).astype(np.int32)
    ref = block_model()
    set_linear_impl(ref, "xla")
    g, frozen, trainable, masks = partition(ref)
    want = float(make_eval_step(g)(trainable, frozen, masks, jnp.asarray(tokens)))
    for spec, rows in zip(MESHES, (1, 2)):
        placement = Placement(make_mesh(spec), head_dim=16)
        model = block_model()
        assert set_linear_impl(model, "pallas", inference=True, mesh=placement.kernel_mesh()) == "pallas"
        assert len(block_sparse_linears(model)) == 7
        g, frozen, trainable, masks = partition(model)
        args = (*placement.put((trainable, frozen, masks)), placement.put_batch(tokens, 0))
        eval_step = make_eval_step(g)
        maps = kernel_shard_maps(jax.make_jaxpr(eval_step)(*args))
        # (x [rows, 16, K], values [n_live, 16, 16]): 1/8 resp. 1/4 of the rows, every live block of the layer
        assert len(maps) == 7 and all(s[0][:2] == (rows, 16) and s[1][1:] == (16, 16) for s, _ in maps), spec
        lives = sorted(s[1][0] for s, _ in maps)
        assert lives == sorted(l.block_layout.n_live for _, l in linears(model) if l.block_layout), spec
        assert all(not psums for _, psums in maps)  # no collective in the forward
        np.testing.assert_allclose(float(eval_step(*args)), want, rtol=1e-5, err_msg=spec)


# ---- SLoPe pretraining ---------------------------------------------------------------------------
TINY = ["--hidden-size", "32", "--intermediate-size", "32", "--num-layers", "1", "--num-heads", "4",
        "--num-kv-heads", "4", "--seq-len", "32", "--batch-size", "8", "--warmup-steps", "1", "--lr", "1e-2",
        "--val-blocks", "2", "--no-progress", "--json"]
SLOPE = ["--method", "slope", "--steps", "2", "--save-every", "2", "--val-every", "0", "--mask-change-freq", "1",
         "--mask-refresh-frac", "0.5", "--adapter-frac", "0.5", "--adapter-rank", "4"]
SLOPE_LOCAL = {  # per-device (x, W, A, B, M) of SLoPe's masked products (zero rank-1 adapter), batch 8 x 32
    "fsdp=4,data=2": {((1, 32, 32), (32, 32), (32, 1), (1, 32), (32, 32))},
    "tensor=2,data=4": {((2, 32, 32), (32, 16), (32, 1), (1, 16), (32, 16)),    # column-parallel / row-parallel
                        ((2, 32, 16), (16, 32), (16, 1), (1, 32), (16, 32))},  # (and each one's backward product)
}


def test_slope_pretraining_on_meshes_equals_one_device_xla(fixtures, small_text, tmp_path, capsys, monkeypatch,
                                                           no_train_checkpoints):
    """`pretrain --method slope --impl pallas` (a mask refresh every step, adapters on for the last) on both
    meshes: losses, gradient norms and the final dense weights equal one-device XLA's (1e-5); the forward and the
    double-pruned backward product both ran under shard_map."""
    common = ["pretrain", "--text", small_text, "--tokenizer", fixtures.hf_dir, *TINY, *SLOPE]

    def trajectory(d):
        return np.array([(r["loss"], r["grad_norm"]) for r in map(json.loads, (d / "metrics.jsonl").read_text()
                                                                    .splitlines()) if "loss" in r])
    assert run(capsys, *common, "--impl", "xla", "--mesh", "data=1", "--out", tmp_path / "xla")["impl"] == "xla"
    want, want_w = trajectory(tmp_path / "xla"), flat_params(tmp_path / "xla" / "model")
    for spec in MESHES:
        steps = record_steps(monkeypatch)
        out = tmp_path / spec.replace(",", "_").replace("=", "")
        assert run(capsys, *common, "--impl", "pallas", "--mesh", spec, "--out", out)["impl"] == "pallas"
        np.testing.assert_allclose(trajectory(out), want, rtol=1e-5, err_msg=spec)
        got = flat_params(out / "model")
        assert got.keys() == want_w.keys()
        for k in want_w:
            np.testing.assert_allclose(got[k], want_w[k], rtol=0, atol=1e-5, err_msg=f"{spec} {k}")
        maps = kernel_shard_maps(steps[0])
        assert len(maps) == 2 * 7 and {s for s, _ in maps} == SLOPE_LOCAL[spec], spec  # forward + backward x 7
