"""Files are input too (issue 34, item 13): what a user hands us, mutated as a broken download, a hand edit or a
wrong tool would leave it, ends in exit 2 with one line that names the file and the field (or tensor), and
nothing written; never a traceback.

* ``config.json``: every field jaxprune reads (LLaMA's, Gemma 3's, Phi-3's) given the wrong type, a negative
  value, zero, NaN / inf, a size beyond int32, removed, or inconsistent with the other fields or the weights.
  The rules here are the HF format's (written out below, not imported); a value they accept is read as
  transformers reads it (same logits).
* ``model.safetensors``: cut at any byte, its header length or JSON altered (shapes swapped, dtype changed,
  tensors renamed), bytes appended; a sharded index that is not JSON or names files outside the dir.
* ``--config`` recipes: YAML that does not parse or is no mapping, and every option given a value the same
  flag refuses on the command line (the flag ranges of ``test_cli_properties.SPEC``), a bool, null or a list.
* ``generate --prompt ""``.

Each example runs ``jaxprune.cli.main`` in this process (about 50 ms before the model is read); GGUF files are
fuzzed elsewhere.
"""

from __future__ import annotations

import itertools
import json
import os
import struct

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxprune.hf import load_hf_dir

from conftest import jax_logits, main_in_process, make_hf_llama, torch_logits
from test_cli_properties import SPEC, invalid_values, numeric_flags

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 11))

# ---- the models: one per config spelling (LLaMA; Gemma 3's per-layer-type rope; Phi-3's longrope) ------------
SLIDING, FULL = "sliding_attention", "full_attention"


def _save(model, out):
    with torch.no_grad():  # HF inits norms to 1 / 0: randomise so a misread norm field shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.float().eval().save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Phi3Config, Phi3ForCausalLM

    root = tmp_path_factory.mktemp("src")
    torch.manual_seed(0)
    llama = make_hf_llama(root, seed=0)
    gemma = _save(Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, layer_types=[SLIDING, FULL], query_pre_attn_scalar=16,
        max_position_embeddings=128, final_logit_softcapping=30.0,
        rope_parameters={FULL: {"rope_type": "default", "rope_theta": 5e4},
                         SLIDING: {"rope_type": "default", "rope_theta": 100.0}})), root / "gemma3")
    phi = _save(Phi3ForCausalLM(Phi3Config(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=8, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.5, 2.0, 1.2], "long_factor": [2.0, 3.0, 4.0, 2.5]})), root / "phi3")
    return {"llama": llama, "gemma3_text": gemma, "phi3": phi}


_count = itertools.count()


def _listing(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


def copy_model(src, root):
    """A fresh dir with ``src``'s files (weights hard-linked: the mutations rewrite whole files)."""
    dst = root / f"m{next(_count)}"
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
    return dst


def rewrite(path, data: bytes):
    path.unlink()  # break the hard link
    path.write_bytes(data)


def convert_fails(model_dir, work, *names):
    """``jaxprune convert MODEL_DIR OUT``: exit 2, one line on stderr containing each of ``names``, nothing written
    under ``work`` (the parent of OUT) or in the model dir; the line is returned."""
    out = work / f"out{next(_count)}"
    before, model_before = _listing(work), _listing(model_dir)
    r = main_in_process("convert", model_dir, out)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("jaxprune convert: error: "), r.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert not out.exists() and _listing(work) == before and _listing(model_dir) == model_before
    return lines[0]


# ---- config.json -------------------------------------------------------------------------------------------
#: what the HF format allows for each field read: (kind, smallest allowed, nullable). kind: int (at most 2**31 - 1:
#: int32), number (finite), bool, str; zero is a legal pruned width only for intermediate_size /
#: num_attention_heads (the weights then disagree).
FIELDS = {
    "vocab_size": ("int", 1, False), "hidden_size": ("int", 1, False), "intermediate_size": ("int", 0, False),
    "num_hidden_layers": ("int", 1, False), "num_attention_heads": ("int", 0, False),
    "num_key_value_heads": ("int", 1, True), "head_dim": ("int", 1, True), "max_position_embeddings": ("int", 1, False),
    "rms_norm_eps": ("number", 0, False), "tie_word_embeddings": ("bool", None, False),
    "attention_bias": ("bool", None, False), "mlp_bias": ("bool", None, False), "hidden_act": ("str", None, True),
    "bos_token_id": ("int", -1, True), "eos_token_id": ("int", -1, True),  # -1: none, in older configs
}
LLAMA_FIELDS = {**FIELDS, "rope_parameters.rope_theta": ("posnumber", 0, False)}
GEMMA_FIELDS = {k: v for k, v in FIELDS.items() if k not in ("attention_bias", "mlp_bias", "hidden_act")} | {
    "sliding_window": ("int", 1, False), "query_pre_attn_scalar": ("posnumber", 0, True),
    "final_logit_softcapping": ("posnumber", 0, True), "hidden_activation": ("str", None, True),
    f"rope_parameters.{FULL}.rope_theta": ("posnumber", 0, False),
    f"rope_parameters.{SLIDING}.rope_theta": ("posnumber", 0, False)}
PHI_FIELDS = {k: v for k, v in FIELDS.items() if k not in ("attention_bias", "mlp_bias")} | {
    "rope_parameters.partial_rotary_factor": ("fraction", 0, False),
    "rope_parameters.rope_theta": ("posnumber", 0, False),
    "original_max_position_embeddings": ("int", 1, True)}  # (null: rope_parameters' own)
FAMILY_FIELDS = {"llama": LLAMA_FIELDS, "gemma3_text": GEMMA_FIELDS, "phi3": PHI_FIELDS}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _get(d, key):
    for part in key.split("."):
        d = d[part]
    return d


def _has(d, key):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _set(d, key, value):
    *parents, last = key.split(".")
    for part in parents:
        d = d[part]
    d[last] = value


@st.composite
def bad_field(draw, family: str, config: dict):
    """(key, bad value, whether zero is what makes it bad) for a field of ``family``."""
    key = draw(st.sampled_from(sorted(k for k in FAMILY_FIELDS[family] if _has(config, k))))
    kind, lo, nullable = FAMILY_FIELDS[family][key]
    good = _get(config, key)
    wrong_type = [str(good), [str(good)] if key == "eos_token_id" else [good], {"v": good}] + \
        ([] if nullable else [None])  # (eos_token_id may be a list of ids)
    if kind == "int":
        options = wrong_type + [True, float(good or 1) + 0.5, float("nan"), draw(st.integers(2**31, 2**70))]
        if lo is not None:
            options += [draw(st.integers(-2**40, lo - 1))]
    elif kind in ("number", "posnumber", "fraction"):
        options = wrong_type + [False, float("nan"), float("inf"), -float("inf"),
                                draw(st.floats(max_value=0, exclude_max=kind == "number", allow_nan=False,
                                               allow_infinity=False))]
        if kind == "fraction":
            options += [draw(st.floats(min_value=1, exclude_min=True, allow_nan=False, allow_infinity=False))]
    elif kind == "bool":
        options = [str(good).lower(), int(good), None, [good]]
    else:  # str
        options = [1, True, [good], {"v": good}]
    value = draw(st.sampled_from(options))
    return key, value


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_config_field_of_wrong_type_or_range(models, tmp_path_factory, family, data):
    src, _ = models[family]
    config = json.loads((src / "config.json").read_text())
    key, value = data.draw(bad_field(family, config))
    work = tmp_path_factory.mktemp("cfg")
    model_dir = copy_model(src, work)
    _set(config, key, value)
    rewrite(model_dir / "config.json", json.dumps(config).encode())
    kind, lo, _ = FAMILY_FIELDS[family][key]
    if value == 0 and lo == 0 and not isinstance(value, bool):  # a legal width the weights contradict
        convert_fails(model_dir, work, model_dir / "model.safetensors", "tensor model.layers.")
    else:
        convert_fails(model_dir, work, model_dir / "config.json", key)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
@pytest.mark.parametrize("key", REQUIRED)
def test_config_required_field_missing(models, tmp_path, family, key):
    src, _ = models[family]
    config = json.loads((src / "config.json").read_text())
    del config[key]
    model_dir = copy_model(src, tmp_path)
    rewrite(model_dir / "config.json", json.dumps(config).encode())
    convert_fails(model_dir, tmp_path, model_dir / "config.json", f"required field '{key}' is missing")


#: fields each valid alone whose combination (or the weights) they contradict: (family, changes, names)
INCONSISTENT = [
    ("llama", {"num_key_value_heads": 3}, ("num_key_value_heads",)),  # 4 heads over 3 KV heads
    ("llama", {"num_key_value_heads": 8}, ("num_key_value_heads",)),  # more KV heads than heads
    ("llama", {"num_hidden_layers": 3}, ("num_hidden_layers", "model.safetensors")),
    ("llama", {"num_hidden_layers": 2**16}, ("num_hidden_layers", "model.safetensors")),
    ("llama", {"vocab_size": 97}, ("model.embed_tokens.weight", "model.safetensors")),
    ("llama", {"head_dim": 8}, ("tensor model.layers.0.self_attn.", "model.safetensors")),
    ("llama", {"head_dim": None, "hidden_size": 2}, ("num_attention_heads",)),  # 64 // 4 heads: none
    ("llama", {"tie_word_embeddings": True, "vocab_size": 95}, ("model.embed_tokens.weight",)),
    ("llama", {"tie_word_embeddings": True}, ("tie_word_embeddings", "lm_head.weight")),  # lm_head ≠ embeddings
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                                   "high_freq_factor": 1.0, "original_max_position_embeddings": 64}},
     ("high_freq_factor",)),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": -2.0}}, ("factor",)),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, ("rope_type",)),
    ("llama", {"rope_parameters": "default"}, ("rope_parameters",)),
    ("llama", {"rope_scaling": {"rope_type": 2}}, ("rope_scaling.rope_type",)),
    ("llama", {"eos_token_id": [2, "3"]}, ("eos_token_id",)),
    ("gemma3_text", {"layer_types": [SLIDING]}, ("layer_types",)),  # 1 entry for 2 layers
    ("gemma3_text", {"layer_types": [SLIDING, "global"]}, ("layer_types", "global")),
    ("gemma3_text", {"layer_types": "sliding_attention"}, ("layer_types",)),
    ("gemma3_text", {"sliding_window": None}, ("sliding_window",)),  # sliding layers with no window
    ("gemma3_text", {"sliding_window_pattern": 0, "layer_types": None}, ("sliding_window_pattern",)),
    ("gemma3_text", {"rope_parameters": {FULL: 1e4, SLIDING: {"rope_theta": 1e4}}}, ("rope_parameters",)),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0, 1.0, 1.0], "long_factor": [1.0, 1.0, 1.0, 1.0]}},
     ("short_factor",)),  # 3 factors for 8 rotary dims
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0, -1.0, 1.0, 1.0], "long_factor": [1.0, 1.0, 1.0, 1.0]}},
     ("short_factor",)),
    ("phi3", {"original_max_position_embeddings": None,  # neither at the top nor in rope_parameters
              "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}},
     ("original_max_position_embeddings",)),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}},
     ("partial_rotary_factor",)),  # int(16 · 0.1) = 1 rotary dim: RoPE turns pairs
]


@pytest.mark.parametrize("family, changes, names", INCONSISTENT,
                         ids=[f"{f}-{'-'.join(c)}" for f, c, _ in INCONSISTENT])
def test_config_inconsistent(models, tmp_path, family, changes, names):
    src, _ = models[family]
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    model_dir = copy_model(src, tmp_path)
    rewrite(model_dir / "config.json", json.dumps(config).encode())
    line = convert_fails(model_dir, tmp_path, *names)
    assert str(model_dir / "config.json") in line or str(model_dir / "model.safetensors") in line, line


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '"config"', "null", "{" * 100_000, "\xff\xfe"])
def test_config_not_an_object(models, tmp_path, text):
    model_dir = copy_model(models["llama"][0], tmp_path)
    rewrite(model_dir / "config.json", text.encode("latin-1"))
    convert_fails(model_dir, tmp_path, model_dir / "config.json")


@settings(max_examples=3, **SETTINGS)
@given(theta=st.floats(10.0, 1e7), eps=st.floats(1e-8, 1e-2), max_pos=st.integers(1, 10**6))
def test_accepted_values_are_read_as_transformers_reads_them(models, tmp_path_factory, theta, eps, max_pos):
    """Values inside the ranges load, and the logits equal transformers' model from the same dir."""
    from transformers import AutoModelForCausalLM

    src, _ = models["llama"]
    work = tmp_path_factory.mktemp("ok")
    model_dir = copy_model(src, work)
    config = json.loads((src / "config.json").read_text())
    config.update(rms_norm_eps=eps, max_position_embeddings=max_pos, bos_token_id=None, eos_token_id=[1, 2])
    config["rope_parameters"]["rope_theta"] = theta
    rewrite(model_dir / "config.json", json.dumps(config).encode())
    model, cfg = load_hf_dir(model_dir)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.eos_token_id) == \
        (theta, eps, max_pos, [1, 2])
    want = torch_logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), TOKENS)
    np.testing.assert_allclose(jax_logits(model, TOKENS), want, rtol=1e-4, atol=1e-4)


def _deci_dict():
    """vLLM's per-layer DeciLM config.json (``model_type`` nemotron-nas) of a 3-layer pruned model."""
    from jaxprune import deci
    from jaxprune.config import tiny_config

    cfg = tiny_config(num_layers=3).with_layer_widths((4, 2, 4), (2, 1, 2), (96, 40, 10))
    return json.loads(json.dumps(deci.to_deci_dict(deci.deci_layout(cfg))))


@pytest.mark.parametrize("path, value, names", [
    ("block_configs", "x", ("block_configs",)),
    ("block_configs", [], ("block_configs",)),  # 0 entries for 3 layers
    ("block_configs.1", 7, ("block_configs[1]",)),
    ("block_configs.1.attention", [], ("block_configs[1].attention",)),
    ("block_configs.1.attention.n_heads_in_group", "2", ("block_configs[1].attention.n_heads_in_group",)),
    ("block_configs.1.attention.n_heads_in_group", 0, ("block_configs[1].attention.n_heads_in_group",)),
    ("block_configs.1.attention.n_heads_in_group", 3, ("n_heads_in_group=3", "num_attention_heads=4")),
    ("block_configs.2.ffn.ffn_mult", -1.5, ("block_configs[2].ffn.ffn_mult",)),
    ("block_configs.2.ffn.no_op", "false", ("block_configs[2].ffn.no_op",)),
    ("num_attention_heads", "4", ("num_attention_heads",)),
    ("num_hidden_layers", None, ("num_hidden_layers",)),
])
def test_deci_config_fields(path, value, names):
    """The per-layer DeciLM form's fields, checked as the others (the dict as ``export --format vllm`` writes it
    reads back; each mutation is one UserError naming the field)."""
    from jaxprune.errors import UserError
    from jaxprune.hf import config_from_hf_json

    d = _deci_dict()
    assert config_from_hf_json(json.loads(json.dumps(d))).layer_num_kv_heads == (2, 1, 2)
    *parents, last = path.split(".")
    target = d
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[int(last) if last.isdigit() else last] = value
    with pytest.raises(UserError) as e:
        config_from_hf_json(d)
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in names), str(e.value)


# ---- safetensors -------------------------------------------------------------------------------------------
def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def damaged_safetensors(draw, data: bytes):
    """(new bytes, the tensor the damage names or None): a cut, a header length or JSON altered, bytes added."""
    header, body = _split(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    kind = draw(st.sampled_from(["cut", "length", "swap", "dtype_same_size", "dtype_other_size", "offsets",
                                 "rename", "drop", "append", "header_json"]))
    if kind == "cut":
        return data[:draw(st.integers(0, len(data) - 1))], None
    if kind == "length":
        n = struct.unpack("<Q", data[:8])[0]
        new = draw(st.integers(0, 2**64 - 1).filter(lambda x: x != n))
        return struct.pack("<Q", new) + data[8:], None
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=64)), None
    if kind == "header_json":  # one character of the tensors' entries (not of the free-form __metadata__)
        raw = json.dumps({k: v for k, v in header.items() if k != "__metadata__"}).encode()
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + draw(st.sampled_from([b"{", b"]", b"\x00", b'"']).filter(lambda c: c != raw[i:i + 1])) \
            + raw[i + 1:]
        return struct.pack("<Q", len(raw)) + raw + body, None
    header = json.loads(json.dumps(header))
    entry = header[name]
    if kind == "swap":  # same bytes, the other shape: only 2-D non-square tensors
        names2d = [k for k in names if len(header[k]["shape"]) == 2 and len(set(header[k]["shape"])) == 2]
        name = draw(st.sampled_from(names2d))
        header[name]["shape"] = header[name]["shape"][::-1]
    elif kind == "dtype_same_size":  # 4-byte integers where float32 was: a dtype no weight has
        entry["dtype"] = draw(st.sampled_from(["I32", "U32"]))
    elif kind == "dtype_other_size":  # the offsets no longer match the shape
        entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I8", "BOOL", "F8_E4M3"]))
        return _join(header, body), None
    elif kind == "offsets":
        lo, hi = entry["data_offsets"]
        entry["data_offsets"] = [lo, hi + draw(st.sampled_from([-4, 4, 2**40]))]
        return _join(header, body), None
    elif kind == "rename":  # a tensor name no LLaMA-family model has
        header["extra." + name] = header.pop(name)
        return _join(header, body), "extra." + name
    else:  # drop: its bytes are then uncovered
        del header[name]
        return _join(header, body), None
    return _join(header, body), name


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_damaged_safetensors(models, tmp_path_factory, data):
    src, _ = models["llama"]
    blob = (src / "model.safetensors").read_bytes()
    damaged, tensor = data.draw(damaged_safetensors(blob))
    work = tmp_path_factory.mktemp("st")
    model_dir = copy_model(src, work)
    rewrite(model_dir / "model.safetensors", damaged)
    convert_fails(model_dir, work, model_dir / "model.safetensors", *([tensor] if tensor else []))


@pytest.fixture(scope="module")
def sharded(models, tmp_path_factory):
    """The LLaMA model saved in shards of ~20 kB (model.safetensors.index.json + 4 files)."""
    _, model = models["llama"]
    out = tmp_path_factory.mktemp("sharded") / "hf"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


@pytest.mark.parametrize("change, names", [
    (lambda d: "{", ("not valid JSON",)),
    (lambda d: {"metadata": {}}, ("weight_map",)),
    (lambda d: {**d, "weight_map": {**d["weight_map"], "model.norm.weight": "../../x.safetensors"}},
     ("../../x.safetensors",)),
    (lambda d: {**d, "weight_map": {**d["weight_map"], "model.norm.weight": 3}}, ("model.norm.weight",)),
], ids=["not-json", "no-weight-map", "outside-the-dir", "not-a-name"])
def test_damaged_shard_index(sharded, tmp_path, change, names):
    model_dir = copy_model(sharded, tmp_path)
    index = model_dir / "model.safetensors.index.json"
    new = change(json.loads(index.read_text()))
    rewrite(index, (new if isinstance(new, str) else json.dumps(new)).encode())
    convert_fails(model_dir, tmp_path, index, *names)


def test_missing_shard(sharded, tmp_path):
    model_dir = copy_model(sharded, tmp_path)
    shard = sorted(model_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    convert_fails(model_dir, tmp_path, shard, "missing")


# ---- --config recipes --------------------------------------------------------------------------------------
RECIPE_COMMANDS = ("finetune", "prune", "pretrain", "loram")


def _recipe_argv(command, recipe, work):
    head = [command] if command == "pretrain" else [command, work / "no-model"]
    return [*head, "--text", work / "t.txt", "--out", work / "run", "--config", recipe]


def recipe_fails(command, text: str, work, *names):
    work.mkdir(exist_ok=True)
    (work / "t.txt").write_text("To be, or not to be. " * 50)
    recipe = work / f"r{next(_count)}.yaml"
    recipe.write_text(text)
    before = _listing(work)
    r = main_in_process(*_recipe_argv(command, recipe, work))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (text, r.returncode, r.stderr[-3000:])
    assert lines[0].startswith(f"jaxprune {command}: error: {recipe}: "), (text, lines[0])
    for name in names:
        assert name in lines[0], (text, name, lines[0])
    assert _listing(work) == before, text


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_recipe_value_refused_like_its_flag(tmp_path_factory, data):
    """A numeric option (every one of the four run commands, by ``test_cli_properties.SPEC``) given a value its
    flag refuses, or a YAML bool / null / list / mapping; a switch given a non-bool; a text option a list."""
    command = data.draw(st.sampled_from(RECIPE_COMMANDS))
    flags = numeric_flags(command)
    flag = data.draw(st.sampled_from(sorted(flags)))
    kind, value = data.draw(st.sampled_from(["numeric", "switch", "text"]).flatmap(lambda k: st.tuples(
        st.just(k), _recipe_bad_value(k, command, flag))))
    key = {"numeric": flag, "switch": "--overwrite", "text": "--targets"}[kind].removeprefix("--")
    if data.draw(st.booleans()):
        key = key.replace("-", "_")
    recipe_fails(command, yaml.safe_dump({key: value}), tmp_path_factory.mktemp("rv"), key)


def _recipe_bad_value(kind, command, flag):
    if kind == "switch":
        return st.sampled_from(["no", "yes", 0, 1, None, [True]])
    if kind == "text":
        return st.sampled_from([[1], {"a": 1}, True, None] if command != "pretrain" else [[1], {"a": 1}, True])
    spec = SPEC[flag]
    texts = invalid_values(spec)
    return st.one_of(texts, texts.map(lambda t: yaml.safe_load(t) if _yaml_scalar(t) else t),
                     st.sampled_from([True, False, [1], {"a": 1}]
                                     + ([None] if numeric_flags(command)[flag].default is not None else [])))


def _yaml_scalar(text):
    try:
        return not isinstance(yaml.safe_load(text), (dict, list)) and yaml.safe_load(text) is not None
    except yaml.YAMLError:
        return False


@settings(max_examples=60, **SETTINGS)
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=40), command=st.sampled_from(
    RECIPE_COMMANDS))
def test_recipe_text_that_is_no_recipe(tmp_path_factory, text, command):
    """Any text: YAML that does not parse, or parses to something other than a mapping of option names, is one
    line naming the recipe (what it parses to decided by PyYAML here)."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed, expect = None, "not valid YAML"
    else:
        if parsed is None or parsed == {}:
            return  # an empty recipe: the run proceeds
        expect = "unknown key" if isinstance(parsed, dict) else "a recipe is a mapping"
        if isinstance(parsed, dict) and all(str(k).replace("_", "-") in _all_options(command) for k in parsed):
            return  # (a real option by chance)
    recipe_fails(command, text, tmp_path_factory.mktemp("rt"), expect)


def _all_options(command):
    from jaxprune.cli import build_parser
    import argparse
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s.removeprefix("--") for a in sub.choices[command]._actions for s in a.option_strings}


# ---- generate ----------------------------------------------------------------------------------------------
def test_generate_empty_prompt_is_one_line(tiny_hf_with_tokenizer):
    hf_dir, _ = tiny_hf_with_tokenizer
    r = main_in_process("generate", hf_dir, "--prompt", "")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "jaxprune generate: error: --prompt: tokenizes to no tokens; generation continues a prompt of at least "
        "one token"]
