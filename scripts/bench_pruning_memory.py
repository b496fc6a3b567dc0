"""Compiled memory of the LoRAPrune step vs the LLM-Pruner importance step (no weights allocated).

Every step is AOT-compiled on ``jax.ShapeDtypeStruct`` inputs and measured with
``compiled.memory_analysis()`` (arguments + temporaries + outputs − aliased; deterministic).

* ``loraprune``: forward + backward w.r.t. the LoRA factors, the LoRA-guided importance moving
  average and the AdamW update, in one jit. Its base may be float or int8 (``--quantize-base int8``:
  one int8 per weight + one fp32 scale per output channel, as the official code's ``load_in_8bit``).
* ``llm_pruner_materialised``: returns ∂L/∂W for every base weight, as the official PyTorch code
  holds every ``.grad`` at once before scoring (its reference configuration: float base, no remat);
* ``llm_pruner_fused``: returns only unit scores, so XLA may free each layer's gradient after
  scoring it (what a JAX port of LLM-Pruner would do at best).

LLM-Pruner differentiates the base, so it cannot use an int8 base. ``remat`` rematerialises each
decoder layer in the backward pass (either method may use it).

    python scripts/bench_pruning_memory.py [--models smollm2-135m,llama-7b] [--batch 1 --seq 512]

``--mesh``: the 8B job on paper. Both pod-shaped steps (``loraprune:int8:remat`` in bf16 compute,
``llm_pruner_fused:float:remat`` on a bf16 base) compiled for a mesh of host devices with the shardings a run
gives every input (``sharding.Placement``: weights, LoRA, Adam and importance state by their logical axes, the
batch over data x fsdp), per ``--points`` batch x seq_len; rows ``{model, variant, mesh, batch, seq_len,
per_device_bytes, argument_bytes, temp_bytes, output_bytes, ...}`` in ``mesh_results``. Each point compiles in a
child process that is stopped once XLA:CPU has written its buffer assignment (``memory_from_dump``: the numbers
``memory_analysis()`` gives, without the code generation that takes an 8B SPMD program tens of minutes on CPU):

    python scripts/bench_pruning_memory.py --models llama3-8b,qwen3-8b --mesh fsdp=8 [--points 8x1024,8x2048]
    python scripts/bench_pruning_memory.py --models llama3-8b,qwen3-8b --mesh none [--points 1x1024,1x2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # --mesh fsdp=8 on a CPU
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax.experimental.compilation_cache.compilation_cache import reset_cache  # noqa: E402

from jaxprune.config import ModelConfig  # noqa: E402
from jaxprune.fileio import write_json_atomic  # noqa: E402
from jaxprune.model import LlamaForCausalLM  # noqa: E402
from jaxprune.partition import add_lora, partition  # noqa: E402
from jaxprune.prune.llm_pruner import taylor_importance_step  # noqa: E402
from jaxprune.prune.loraprune import importance_hook, init_importance  # noqa: E402
from jaxprune.meshes import activation_mesh, make_mesh  # noqa: E402
from jaxprune.quantize import quantize_base  # noqa: E402
from jaxprune.sharding import Placement  # noqa: E402
from jaxprune.train import OptimConfig, make_loss_fn, make_optimizer, make_train_step  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                     num_kv_heads=32, head_dim=128, tie_word_embeddings=False),
    # meta-llama/Llama-3.1-8B (rope_scaling llama3 changes no shape: left out)
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, tie_word_embeddings=False, rope_theta=500000.0,
                      rms_norm_eps=1e-5),
    # Qwen/Qwen3-8B: RMSNorm of q and k per head (``qk_norm``, what families/qwen3.py sets)
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                     num_kv_heads=8, head_dim=128, tie_word_embeddings=False, rope_theta=1000000.0,
                     qk_norm=True, model_type="qwen3"),
}


def abstract_pytrees(cfg: ModelConfig, dtype, rank: int, remat: bool, quantized: bool):
    def build():
        m = LlamaForCausalLM(cfg, dtype=dtype)
        m.remat = remat
        if quantized:
            quantize_base(m)
        add_lora(m, rank=rank, alpha=2 * rank)
        return m
    return partition(nnx.eval_shape(build))


def placed(tree, placement: Placement | None):
    """``tree`` (ShapeDtypeStructs) with each leaf's sharding on ``placement``'s mesh, the one a run's
    ``placement.put`` gives it (logical axes -> mesh axes, ``sharding.Placement.tree_shardings``); unchanged
    without a placement."""
    if placement is None:
        return tree
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        placement.tree_shardings(tree))


def tokens_spec(shape: tuple[int, ...], batch_dim: int, placement: Placement | None, strict: bool):
    """Token ids of ``shape`` split along ``batch_dim`` as ``placement.put_batch`` splits them."""
    if placement is None:
        return jax.ShapeDtypeStruct(shape, jnp.int32)
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=placement.batch_sharding(shape, batch_dim, strict=strict))


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def compile_step(step: str, cfg: ModelConfig, dtype, batch: int, seq: int, rank: int, remat: bool,
                 quantized: bool, unit: str = "q_head", chunk: int | None = None, placement: Placement | None = None,
                 compute_dtype=None, compiler_options: dict | None = None):
    """The compiled ``step`` ('loraprune', 'llm_pruner_materialised', 'llm_pruner_fused'); ``chunk``: the fused
    step's sequences per pass. ``placement``: every input carries the sharding a run on that mesh gives it (the
    weights, LoRA, optimizer and importance state by their logical axes, the batch over data x fsdp), so the
    compiled program is the SPMD-partitioned one and ``memory_analysis()`` is per device. ``compute_dtype``: the
    LoRAPrune step's ``--compute-dtype`` (LLM-Pruner computes in the base's dtype)."""
    if placement is not None:
        placement = placement.with_head_dim(cfg.head_dim)
    graphdef, frozen, trainable, masks = abstract_pytrees(cfg, dtype, rank, remat, quantized)
    frozen, trainable, masks = (placed(t, placement) for t in (frozen, trainable, masks))
    if step == "loraprune":
        tokens = tokens_spec((1, batch, seq), 1, placement, strict=True)
        opt = make_optimizer(OptimConfig())
        opt_state = placed(jax.eval_shape(opt.init, trainable), placement)
        hook_state = placed(jax.eval_shape(lambda: init_importance(cfg, unit)), placement)
        state_shardings = None
        if placement is not None:
            state_shardings = jax.tree.map(lambda x: x.sharding, (trainable, opt_state, hook_state))
        fn = make_train_step(graphdef, opt, grad_hook=importance_hook(cfg, unit, 2.0), donate=True,
                             compute_dtype=compute_dtype, state_shardings=state_shardings)
        return _compile(fn.lower(trainable, opt_state, hook_state, frozen, masks, tokens,
                                 jax.ShapeDtypeStruct((), jnp.int32)), compiler_options)
    calib = tokens_spec((batch, seq), 0, placement, strict=False)
    mesh = None if placement is None else placement.mesh
    if step == "llm_pruner_fused":
        fused = taylor_importance_step(graphdef, cfg, unit, chunk, mesh)
        return _compile(fused.lower(frozen, trainable, masks, calib), compiler_options)
    loss_fn = make_loss_fn(graphdef)

    def grads(fr, tr, mk, b):
        with activation_mesh(mesh):
            return jax.grad(lambda f: loss_fn(tr, f, mk, b)[0])(fr)
    grads_step = jax.jit(grads)
    return _compile(grads_step.lower(frozen, trainable, masks, calib), compiler_options)


def _compile(lowered, compiler_options: dict | None):
    """``lowered.compile``; one that is to write a dump (``dump_options``) bypasses XLA's persistent compilation
    cache: its key leaves out ``xla_dump_to``, so with ``JAX_COMPILATION_CACHE_DIR`` set (``make test`` sets it) a
    second run would get the cached executable back and no dump would be written. JAX decides once per process
    whether the cache is used, so the switch is reset around the compile (``reset_cache``, public API)."""
    if not compiler_options or "xla_dump_to" not in compiler_options:
        return lowered.compile(compiler_options)
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    reset_cache()
    try:
        return lowered.compile(compiler_options)
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        reset_cache()


def dump_options(dump_dir) -> dict:
    """Compiler options that make XLA write the step's buffer assignment to ``dump_dir`` (``memory_from_dump``)."""
    return {"xla_dump_to": str(dump_dir), "xla_dump_hlo_as_text": True, "xla_dump_hlo_module_re": "jit_step"}


BUFFER_ASSIGNMENT = "cpu_after_optimizations-buffer-assignment.txt"
DUMP_DONE = "cpu_after_optimizations-memory-usage-report.txt"  # written right after the buffer assignment


def memory_from_dump(dump_dir) -> dict | None:
    """``memory()``'s numbers read from XLA's buffer-assignment dump, None until it is written.

    XLA:CPU writes the buffer assignment (which ``memory_analysis()`` sums) before code generation and the
    thunk executor's graph, which take most of an 8B program's compile time on CPU (tens of minutes under
    SPMD); so the sweep stops the compile there. Sums, per allocation kind: arguments = entry parameters,
    aliased = parameters that are also live out (donated), outputs = live-out allocations (the output tuple
    included), temporaries = the preallocated temp buffer (``memory()`` equals these; tests check it)."""
    done = sorted(Path(dump_dir).glob(f"*{DUMP_DONE}"))
    if not done:
        return None
    text = Path(str(done[-1]).replace(DUMP_DONE, BUFFER_ASSIGNMENT)).read_text()
    out = dict.fromkeys(("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes"), 0)
    for size, rest in re.findall(r"^allocation \d+: size (\d+), (.*)$", text, flags=re.M):
        size, live_out = int(size), "maybe-live-out" in rest
        if rest.startswith("parameter"):
            out["argument_bytes"] += size
            out["alias_bytes"] += size if live_out else 0
        if live_out:
            out["output_bytes"] += size
        if "preallocated-temp" in rest:
            out["temp_bytes"] += size
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def parse_variant(text: str) -> tuple[str, str, bool]:
    """'loraprune:int8:remat' -> (step, base, remat); base is 'float' or 'int8'."""
    step, base, remat = (text.split(":") + ["", ""])[:3]
    if step not in STEPS or base not in ("float", "int8") or remat not in ("remat", "noremat"):
        sys.exit(f"--variants {text!r}: expected STEP:{{float,int8}}:{{remat,noremat}}, STEP one of "
                 f"{', '.join(STEPS)}")
    if base == "int8" and step != "loraprune":
        sys.exit(f"--variants {text!r}: LLM-Pruner differentiates the base, so it has no int8 variant")
    return step, base, remat == "remat"


STEPS = ("loraprune", "llm_pruner_materialised", "llm_pruner_fused")
REFERENCE = ("llm_pruner_materialised", "float", False)  # the official LLM-Pruner: every .grad held, no remat
DEFAULT_VARIANTS = ("llm_pruner_materialised:float:noremat,llm_pruner_materialised:float:remat,"
                    "llm_pruner_fused:float:remat,loraprune:float:noremat,loraprune:float:remat,"
                    "loraprune:int8:remat")


MESH_VARIANTS = "loraprune:int8:remat,llm_pruner_fused:float:remat"
MESH_POINTS = {"fsdp=8": "8x2048,16x2048,8x4096", "none": "1x2048,4x2048,8x2048,1x4096"}
MESH_NOTE = ("Per-device bytes of the step as XLA:CPU's compiler assigns buffers for the SPMD-partitioned program "
             "(memory_analysis()'s sums, read from the buffer-assignment dump: arguments + temporaries + outputs - "
             "aliased). TPU and GPU compilers fuse, schedule and rematerialise differently, so these are an estimate "
             "of the same program's footprint on a TPU v5e chip or a GPU, not a measurement there; the runtime's "
             "own reserve (XLA/PJRT workspace, collectives' buffers) is not in them.")


def mesh_placement(mesh: str) -> Placement:
    """The run's placement for ``--mesh`` (``none``: one device, nothing split)."""
    return Placement(make_mesh("data=1" if mesh == "none" else mesh))


def run_point(point: dict) -> None:
    """Child process: compile one sweep point with the buffer-assignment dump on (the parent stops it there)."""
    cfg = ModelConfig(**SHAPES[point["model"]], max_position_embeddings=max(4096, point["seq_len"]))
    dtype, cd = jnp.dtype(point["dtype"]), point["compute_dtype"]
    compile_step(point["step"], cfg, dtype, point["batch"], point["seq_len"], point["rank"], point["remat"],
                 point["int8"], unit=point["unit"], placement=mesh_placement(point["mesh"]),
                 compute_dtype=None if cd is None else jnp.dtype(cd), compiler_options=dump_options(point["dump"]))


def measure_point(point: dict, timeout: float, keep: Path | None = None) -> tuple[dict, float]:
    """memory() of one sweep point: the step compiled in a child process until XLA has written its buffer
    assignment (``memory_from_dump``), which is then stopped. Returns (bytes, seconds to the assignment).
    ``keep``: a folder to copy XLA's memory-usage report (the largest buffers) to."""
    with tempfile.TemporaryDirectory(prefix="pruning_memory_") as d:
        point = {**point, "dump": d}
        env = dict(os.environ)
        if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        t = time.time()
        log = open(Path(d) / "child.log", "w+")  # a file, not a pipe: XLA's warnings must never block the child
        child = subprocess.Popen([sys.executable, __file__, "--_point", json.dumps(point)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            while (mem := memory_from_dump(d)) is None:
                if child.poll() is not None:
                    mem = memory_from_dump(d)
                    if mem is None:
                        log.seek(0)
                        sys.exit(f"{point['model']} {point['step']}: the compile failed:\n{log.read()[-3000:]}")
                    break
                if time.time() - t > timeout:
                    sys.exit(f"{point['model']} {point['step']}: no buffer assignment after {timeout:.0f} s")
                time.sleep(1.0)
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                name = f"{point['model']}-{point['step']}-{point['mesh']}-{point['batch']}x{point['seq_len']}.txt"
                shutil.copy(next(Path(d).glob(f"*{DUMP_DONE}")), keep / name)
            return mem, time.time() - t
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            log.close()


def mesh_sweep(a, out: dict) -> None:
    """``--mesh``: per-device memory of the pod-shaped steps over batch x seq_len points (``mesh_results``)."""
    dtype = a.dtype or "bfloat16"
    devices = mesh_placement(a.mesh).mesh.size
    out["mesh_note"] = MESH_NOTE
    out["mesh_results"] = out.get("mesh_results", [])
    gib = lambda b: b / 2**30  # noqa: E731
    for name in a.models.split(","):
        cfg = ModelConfig(**SHAPES[name], max_position_embeddings=4096)
        for variant in (a.variants or MESH_VARIANTS).split(","):
            step, base, remat = parse_variant(variant)
            for text in (a.points or MESH_POINTS.get(a.mesh, "8x2048")).split(","):
                batch, seq = (int(v) for v in text.lower().split("x"))
                point = {"model": name, "step": step, "batch": batch, "seq_len": seq, "rank": a.rank, "remat": remat,
                         "int8": base == "int8", "dtype": dtype, "unit": a.unit, "mesh": a.mesh,
                         "compute_dtype": dtype if step == "loraprune" else None}
                mem, secs = measure_point(point, a.point_timeout, Path(a.keep_reports) if a.keep_reports else None)
                row = {"model": name, "variant": variant, "mesh": a.mesh, "devices": devices, "batch": batch,
                       "seq_len": seq, "per_device_batch": batch / devices if a.mesh != "none" else batch,
                       "per_device_bytes": mem["total_bytes"], **mem, "step": step,
                       "base": dtype if base == "float" else f"int8+{dtype}", "compute_dtype": point["compute_dtype"]
                       or dtype, "remat": remat, "lora_rank": a.rank, "unit": a.unit, "base_params": cfg.num_params(),
                       "compile_to_assignment_s": round(secs, 1), "source": "xla:cpu buffer assignment"}
                key = lambda r: (r["model"], r["variant"], r["mesh"], r["batch"], r["seq_len"])  # noqa: E731
                out["mesh_results"] = [r for r in out["mesh_results"] if key(r) != key(row)] + [row]
                print(f"{name} {variant:28s} mesh {a.mesh:7s} {batch:3d} x {seq:5d}: "
                      f"{gib(row['per_device_bytes']):7.2f} GiB per device (args {gib(mem['argument_bytes']):.2f}, "
                      f"temps {gib(mem['temp_bytes']):.2f}, "
                      f"outputs {gib(mem['output_bytes']):.2f}, aliased {gib(mem['alias_bytes']):.2f})  [{secs:.0f} s]",
                      flush=True)
                write_json_atomic(a.out, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--variants", default=None,
                    help="comma-separated STEP:BASE:REMAT, BASE float|int8, REMAT remat|noremat (default: "
                         f"{DEFAULT_VARIANTS}; with --mesh: {MESH_VARIANTS})")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="float dtype of the base and activations (default float32; with --mesh bfloat16, the "
                         "LoRAPrune step computing in it too). The paper's runs are fp16 on GPU; without --mesh keep "
                         "float32: XLA:CPU upcasts bf16 dots to f32 and keeps those copies, which inflates bf16 "
                         "temporaries by a float32 copy of the weights")
    ap.add_argument("--mesh", default=None,
                    help="'fsdp=8', 'none' (one device), any --mesh spec: the sweep of per-device memory over "
                         "--points on that mesh, every input with a run's sharding (rows in mesh_results)")
    ap.add_argument("--points", default=None, help="BATCHxSEQ,... for --mesh (default: fsdp=8 "
                    f"{MESH_POINTS['fsdp=8']}; none {MESH_POINTS['none']})")
    ap.add_argument("--unit", default="kv_group", help="--mesh: the attention unit LoRAPrune scores")
    ap.add_argument("--point-timeout", type=float, default=3600.0, help="--mesh: seconds per point at most")
    ap.add_argument("--keep-reports", default=None, help="--mesh: copy XLA's memory-usage report of each point here")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "pruning_memory.json"))
    ap.add_argument("--_point", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._point:
        return run_point(json.loads(a._point))
    prev = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    if a.mesh:
        return mesh_sweep(a, prev or {"benchmark": "pruning_memory", "results": []})
    variants = [parse_variant(v) for v in (a.variants or DEFAULT_VARIANTS).split(",")]
    if REFERENCE not in variants:
        variants.insert(0, REFERENCE)
    dtype = jnp.dtype(a.dtype or "float32")
    out = {"benchmark": "pruning_memory", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                      "jax": jax.__version__, "backend": jax.default_backend()},
           "dtype": str(dtype), "batch": a.batch, "seq_len": a.seq, "lora_rank": a.rank,
           "results": prev.get("results", [])}
    out.update({k: prev[k] for k in ("mesh_note", "mesh_results") if k in prev})
    gib = lambda b: b / 2**30  # noqa: E731
    for name in a.models.split(","):
        cfg = ModelConfig(**SHAPES[name], max_position_embeddings=4096)
        rows = []
        for step, base, remat in variants:
            t = time.time()
            mem = memory(compile_step(step, cfg, dtype, a.batch, a.seq, a.rank, remat, base == "int8"))
            rows.append({"model": name, "step": step, "base": str(dtype) if base == "float" else f"int8+{dtype}",
                         "remat": remat, "base_params": cfg.num_params(), **mem, "compile_s": time.time() - t})
            ref = next(r for r in rows if (r["step"], r["base"], r["remat"]) == (REFERENCE[0], str(dtype), False))
            rows[-1]["ratio_vs_reference"] = rows[-1]["total_bytes"] / ref["total_bytes"]
            print(f"{name} {step:24s} base {rows[-1]['base']:14s} remat {'on ' if remat else 'off'}: "
                  f"{gib(mem['total_bytes']):7.2f} GiB (args {gib(mem['argument_bytes']):.2f}, temps "
                  f"{gib(mem['temp_bytes']):.2f}, outputs {gib(mem['output_bytes']):.2f}) = "
                  f"{rows[-1]['ratio_vs_reference']:.2f}x the official LLM-Pruner step  "
                  f"[{rows[-1]['compile_s']:.0f} s]", flush=True)
            out["results"] = [r for r in out["results"] if r["model"] != name] + rows
            write_json_atomic(a.out, out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
