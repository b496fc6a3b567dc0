"""Shared fixtures: tiny random HF models (torch reference) and the real SmolLM2 fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# 8 CPU devices in every test process (and the CLI subprocesses it starts), for the sharding tests.
# Commands without --mesh run on a one-device mesh (the same placement code path), as on a 1-CPU box.
_flags = os.environ.get("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = _flags + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAXPRUNE_MESH", "data=1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def make_hf_llama(tmp_path: Path, seed: int = 0, **overrides):
    """Save a tiny random transformers LlamaForCausalLM (fp32) to tmp_path; return (dir, torch model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).float().eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / f"hf-{seed}"
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def rewrite_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of the HF dir ``src`` at ``dst`` with ``changes`` applied to its config.json."""
    import json
    import shutil

    shutil.copytree(src, dst)
    d = json.loads((dst / "config.json").read_text())
    d.update(changes)
    (dst / "config.json").write_text(json.dumps(d))
    return dst


def torch_logits(model, tokens):
    import numpy as np
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.fixture(scope="session")
def fixtures():
    """The real SmolLM2 + Shakespeare fixtures (fetched by scripts/fixtures.py, cached)."""
    from jaxprune.fixtures import fixture_paths

    paths = fixture_paths()
    if not all(p.exists() for p in (paths.hf_dir / "model.safetensors", paths.play_text,
                                     paths.plays_tokenizer / "tokenizer.json")):
        subprocess.run([sys.executable, str(REPO / "scripts" / "fixtures.py")], check=True)
    return paths


def run_cli(*args, check=False, timeout=600, env=None):
    """Run `python -m jaxprune.cli ...` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "jaxprune.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, check=check, env=e)


@pytest.fixture(scope="session")
def tiny_hf_with_tokenizer(tmp_path_factory, fixtures):
    """A tiny random HF LLaMA dir with SmolLM2's tokenizer (vocab 49152), usable with the CLI.

    Returns (dir, torch model).
    """
    import shutil

    root = tmp_path_factory.mktemp("tiny-tok")
    out, model = make_hf_llama(root, 0, vocab_size=49152, hidden_size=32, intermediate_size=48,
                               num_attention_heads=4, num_key_value_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures.hf_dir / name, out / name)
    return out, model


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, fixtures):
    """The first ~40k characters of the training text: enough for a few hundred 64-token blocks."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(fixtures.train_text.read_text()[:40_000])
    return path


# ---- added for the interop / parity tests -------------------------------------------------------
def jax_logits(model, tokens):
    """fp32 numpy logits of a jaxprune model, through one jitted forward (faster than eager on CPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return np.asarray(fwd(state, jnp.asarray(np.asarray(tokens), jnp.int32)), np.float32)


@pytest.fixture(scope="session")
def smollm2_jax(fixtures):
    """SmolLM2-135M as a jaxprune model read from the GGUF file (fp32; ~25 s, once per session)."""
    from jaxprune.hf import load_gguf

    model, _ = load_gguf(fixtures.gguf)
    return model


@pytest.fixture(scope="session")
def smollm2_torch(fixtures):
    """SmolLM2-135M as transformers' torch model (fp32) from the dequantised HF dir."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fixtures.hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(fixtures):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixtures.hf_dir)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for jax.distributed's coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_in_process(*args) -> subprocess.CompletedProcess:
    """`jaxprune ARGS` through ``jaxprune.cli.main`` in this process: (returncode, stdout, stderr)."""
    import contextlib
    import io

    from jaxprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def start_cli(*args, env=None):
    """Start `python -m jaxprune.cli ...` in the background (Popen, text pipes); see ``finish_cli``."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "jaxprune.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e)


def finish_cli(proc, timeout=600):
    """Wait for a ``start_cli`` process -> CompletedProcess (text)."""
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---- added for the pruning tests -----------------------------------------------------------------
def random_llama(cfg, seed: int = 0, *, std: float = 0.1, lora: dict | None = None, lora_b_std: float = 0.0):
    """A jaxprune model of ``cfg`` filled from numpy random arrays (no per-op jit compiles: fast).

    ``lora``: {linear path regex: (rank, alpha)} to attach LoRA factors too (A ~ N(0, std²),
    B ~ N(0, lora_b_std²), so B = 0 by default like ``add_lora``). Norm weights are 1 + noise.
    """
    import re

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxprune.weights import abstract_model, linears, model_from_arrays, path_str

    spec = {}
    if lora:
        for path, _ in linears(abstract_model(cfg)):
            name = path_str(path)
            for pattern, (r, alpha) in lora.items():
                if name != "lm_head" and re.search(pattern, name):
                    spec[name] = (r, alpha)
    rng = np.random.default_rng(seed)
    arrays = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg, lora=spec))):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if dtype == jnp.bool_:
            continue
        scale = lora_b_std if path[-1] == "lora_b" else std
        a = scale * rng.standard_normal(shape)
        if path[-1] == "weight":  # RMSNorm
            a = 1.0 + a
        arrays[tuple(path)] = a.astype(np.float32)
    return model_from_arrays(cfg, arrays, lora=spec)


def compile_fast(fn, *args):
    """``jax.jit(fn)(*args)`` compiled at XLA backend optimisation level 0: the interpret-mode kernels
    compile ~2x faster and the tests only check numbers (all math is float32-accumulated either way)."""
    import jax
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def rel_err(got, want) -> float:
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30))


def flat_params(ckpt_dir) -> dict:
    """A saved pretrain checkpoint's params as {key path: array}."""
    import jax
    import numpy as np

    from jaxprune.checkpoint import restore_pytree
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(restore_pytree(ckpt_dir / "params"))[0]}


def run_main_json(capsys, *args) -> dict:
    """``jaxprune ARGS`` in this process (exit 0 asserted); its last stdout line as JSON."""
    from jaxprune.cli import main
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err[-3000:]
    return json.loads(capsys.readouterr().out.splitlines()[-1])
