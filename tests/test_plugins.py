"""The README's plugin example and Python API snippet, run exactly as written (issue 30).

* ``--plugin`` loads the README's L1 criterion; `prune --method l1` keeps the units a numpy re-computation of
  Σ|W| per unit keeps; `export` writes a model stock transformers loads with jaxprune's logits.
* The Python API snippet (load → prune → recover → export) gives a model transformers reproduces.
* The registry: every built-in name in one registry only; bad plugins are one line, exit 2.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import REPO, jax_logits, run_cli

H, KV, D, M = 4, 2, 8, 48


def readme_python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def l1_reference(torch_model, layer: int):
    """Numpy Σ|W| per KV group and per MLP channel of one layer of the HF model ([out, in] weights)."""
    sd = {k: v.detach().numpy().astype(np.float64) for k, v in torch_model.state_dict().items()}
    p = f"model.layers.{layer}."
    q, k, v = (np.abs(sd[p + f"self_attn.{m}_proj.weight"]) for m in "qkv")
    o = np.abs(sd[p + "self_attn.o_proj.weight"])
    per_head = q.reshape(H, D, -1).sum((1, 2)) + o.reshape(-1, H, D).sum((0, 2))
    group = per_head.reshape(KV, H // KV).sum(1) + k.reshape(KV, D, -1).sum((1, 2)) + v.reshape(KV, D, -1).sum((1, 2))
    gate, up, down = (np.abs(sd[p + f"mlp.{m}_proj.weight"]) for m in ("gate", "up", "down"))
    channel = gate.sum(1) + up.sum(1) + down.sum(0)
    return group, channel


def test_readme_plugin_prunes_the_units_numpy_picks_and_exports(tiny_hf_with_tokenizer, small_text, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxprune import load

    hf_dir, torch_model = tiny_hf_with_tokenizer
    plugin = tmp_path / "l1_plugin.py"
    plugin.write_text(readme_python_block("## Adding a method"))
    assert len(plugin.read_text().splitlines()) <= 30
    run = tmp_path / "run"
    proc = run_cli("prune", hf_dir, "--plugin", plugin, "--method", "l1", "--ratio", "0.5", "--exclude-layers", "none",
                   "--text", small_text, "--steps", "2", "--recover-steps", "1", "--lr", "1e-9", "--warmup-steps", "0",
                   "--seq-len", "32", "--batch-size", "2", "--val-every", "0", "--out", run, "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "l1" and json.loads((run / "run.json").read_text())["plugin"] == [str(plugin)]
    model = load.load_model(run / "model")
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    for i in range(2):
        group, channel = l1_reference(torch_model, i)
        kept_groups = np.sort(np.argsort(group)[int(0.5 * KV):])
        kept_channels = np.sort(np.argsort(channel)[int(0.5 * M):])
        # the recovery step at lr 1e-9 leaves the kept weights as they were (LoRA B starts at 0)
        down = np.asarray(model.layers[i].mlp.down_proj.kernel[...])  # [kept, hidden]
        np.testing.assert_allclose(down, sd[f"model.layers.{i}.mlp.down_proj.weight"][:, kept_channels].T, atol=1e-6)
        k_proj = np.asarray(model.layers[i].self_attn.k_proj.kernel[...])  # [hidden, kept groups · D]
        rows = np.concatenate([np.arange(g * D, (g + 1) * D) for g in kept_groups])
        np.testing.assert_allclose(k_proj, sd[f"model.layers.{i}.self_attn.k_proj.weight"][rows].T, atol=1e-6)

    out = tmp_path / "hf"
    assert run_cli("export", run / "model", out).returncode == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == summary["params_after"] < summary["params_before"]
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 12))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(jax_logits(model, tokens), want, rtol=1e-4, atol=1e-4)


def test_bad_plugins_are_one_line_and_exit_2(tiny_hf_with_tokenizer, small_text, tmp_path):
    hf_dir, _ = tiny_hf_with_tokenizer
    broken = tmp_path / "broken.py"
    broken.write_text("import nonexistent_module_xyz\n")
    clash = tmp_path / "clash.py"
    clash.write_text(readme_python_block("## Adding a method").replace('register_structured("l1"',
                                                                        'register_structured("llm-pruner"'))
    base = ("prune", hf_dir, "--text", small_text, "--out", tmp_path / "r")
    for args, words in (((*base, "--plugin", tmp_path / "missing.py"), "no such file"),
                        ((*base, "--plugin", broken), "nonexistent_module_xyz"),
                        ((*base, "--plugin", clash), "registered twice"),
                        ((*base, "--method", "l1"), "invalid choice")):  # no plugin: no such method
        proc = run_cli(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_readme_python_api_prunes_recovers_and_exports(tiny_hf_with_tokenizer, small_text, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxprune import load

    hf_dir, _ = tiny_hf_with_tokenizer
    env = {"MODEL_DIR": str(hf_dir), "TEXT": str(small_text), "RUN_DIR": str(tmp_path / "run"),
           "EXPORT_DIR": tmp_path / "hf"}
    code = readme_python_block("## Python API")
    assert len(code.strip().splitlines()) <= 12
    exec(compile(code, "README.md", "exec"), env)
    summary = env["summary"]
    assert summary["method"] == "llm-pruner" and summary["widths_mode"] == "uniform"
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 20  # recovered for recover_steps
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == summary["params_after"] < summary["params_before"]
    assert (hf.config.num_key_value_heads, hf.config.intermediate_size) == (1, 24)
    tokens = np.random.default_rng(1).integers(0, 49152, (2, 12))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(jax_logits(load.load_model(tmp_path / "run" / "model"), tokens), want,
                               rtol=1e-4, atol=1e-4)


def test_registry_names_are_one_algorithm_each():
    from jaxprune.pretrain.registry import PRETRAIN
    from jaxprune.prune.registry import DEPTH, ELEMENTWISE, STRUCTURED

    assert set(STRUCTURED.names()) >= {"loraprune", "llm-pruner", "l2", "random", "flap", "minitron"}
    assert set(ELEMENTWISE.names()) >= {"magnitude", "wanda", "sparsegpt"}
    assert set(DEPTH.names()) >= {"shortgpt", "replaceme"}
    names = [*STRUCTURED.names(), *ELEMENTWISE.names(), *DEPTH.names()]
    assert len(names) == len(set(names))  # one name, one algorithm, across the prune command's registries
    assert set(PRETRAIN.names()) == {"full", "lowrank", "sltrain", "slope", "lost", "switchlora", "sste"}
    for registry in (STRUCTURED, ELEMENTWISE, DEPTH, PRETRAIN):
        for m in registry:
            assert m.summary, m.name


def test_entry_point_plugins_register_their_methods(tmp_path, monkeypatch):
    """A package's `jaxprune.methods` entry point is imported by every command (here: the loader itself)."""
    import importlib.metadata

    from jaxprune import plugins
    from jaxprune.prune.registry import STRUCTURED

    (tmp_path / "ep_scores.py").write_text(readme_python_block("## Adding a method").replace(
        'register_structured("l1"', 'register_structured("l1-from-entry-point"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="l1", value="ep_scores", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [ep] if group == plugins.ENTRY_POINT_GROUP else [])
    try:
        plugins.load_entry_point_plugins()
        assert "l1-from-entry-point" in STRUCTURED.names()
        plugins.load_entry_point_plugins()  # loaded once: no "registered twice"
    finally:
        STRUCTURED.unregister("l1-from-entry-point")
