"""Shared fixtures: tiny random HF models (torch reference) and the real SmolLM2 fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
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
    if not (paths.hf_dir / "model.safetensors").exists() or not paths.play_text.exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "fixtures.py")], check=True)
    return paths


def run_cli(*args, check=False, timeout=600, env=None):
    """Run `python -m jaxprune.cli ...` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "jaxprune.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, check=check, env=e)
