"""An independent reader of a DeciLM / Nemotron-NAS (``DeciLMForCausalLM``) checkpoint dir, written from
vLLM's source, not from jaxprune's: what vLLM would allocate from ``config.json`` and what its graph computes.

Test helper only (issue 34 item 3). Ported, statement by statement, from:

* vLLM ``vllm/model_executor/models/nemotron_nas.py`` (``_ffn_mult_to_intermediate_size``, ``_find_multiple``,
  ``DeciLMDecoderLayer.__init__/forward``, ``DeciModel.forward/load_weights``, ``DeciLMForCausalLM``),
  https://github.com/vllm-project/vllm/blob/00bd1493b3e82d6c13c68ee8a0e1c5a96707e190/vllm/model_executor/models/nemotron_nas.py
* vLLM ``vllm/model_executor/models/llama.py`` (``LlamaAttention``: ``head_dim = config.head_dim or
  hidden // heads``, ``scaling = head_dim**-0.5``, qkv split; ``LlamaMLP``: gate_up + SiluAndMul, silu only),
  https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/models/llama.py (stored version read:
  fork RhizoNymph/vllm@1ee49aca8c04817b7e1f98df75d1926dbc0a1bf6, same classes as upstream main)
* vLLM ``vllm/model_executor/layers/rotary_embedding/__init__.py`` (``get_rope``: ``rope_theta``,
  ``rope_type``, ``partial_rotary_factor`` from ``config.rope_parameters``), ``base.py`` (``_compute_inv_freq``,
  ``_compute_cos_sin_cache``, neox rotation) and ``llama3_rope.py`` (``Llama3RotaryEmbedding``),
  https://github.com/vllm-project/vllm/tree/07b12f1b16d5568eeb29a52fd8c9296a51f478ed/vllm/model_executor/layers/rotary_embedding
* vLLM ``vllm/transformers_utils/config.py`` (``HFConfigParser.parse``: the config object is
  ``transformers.AutoConfig.from_pretrained(dir, trust_remote_code=...)``; ``nemotron-nas`` is in neither
  vLLM's ``_CONFIG_REGISTRY`` nor transformers, so it needs ``auto_map`` + ``--trust-remote-code``;
  ``patch_rope_parameters``: ``standardize_rope_params()`` + ``validate_rope()``),
  https://github.com/vllm-project/vllm/blob/0036026e7171bd02e3c1d4687b102dec9c446049/vllm/transformers_utils/config.py
  and ``vllm/config/model.py`` ``get_total_num_kv_heads`` (nemotron-nas: first non-no-op block's
  ``num_attention_heads // n_heads_in_group``).
* NVIDIA's ``block_config.py`` shipped with nvidia/Llama-3_1-Nemotron-51B-Instruct and
  Llama-3_3-Nemotron-Super-49B-v1 (``AttentionConfig/FFNConfig.__post_init__``: no_op / replace_with_linear
  null ``n_heads_in_group`` / ``ffn_mult``; a live FFN's ``ffn_mult`` is ``round(ffn_mult, 6)``;
  unknown fields dropped), https://huggingface.co/nvidia/Llama-3_3-Nemotron-Super-49B-v1/blob/main/block_config.py

What vLLM does with a layer (``DeciLMDecoderLayer``):

* ``attention.no_op``: no ``self_attn`` and no ``input_layernorm``; the hidden state passes through.
* ``ffn.no_op``: no ``mlp`` and no ``post_attention_layernorm``.
* ``replace_with_linear``: vLLM has no branch for it: it builds a full attention / MLP from
  ``n_heads_in_group`` / ``ffn_mult``, which NVIDIA's config has just set to None, so loading fails
  (``int // None`` / ``2 * None``). This port refuses it (``VllmWouldFail``).
* ``ffn_mult`` -> ``_find_multiple(int(2 * ffn_mult * hidden / 3), 256)``; a block without the attribute
  uses ``ffn.intermediate_size`` (NVIDIA's FFNConfig always has the attribute, so never in practice).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VLLM_NEMOTRON_NAS = ("https://github.com/vllm-project/vllm/blob/00bd1493b3e82d6c13c68ee8a0e1c5a96707e190/"
                     "vllm/model_executor/models/nemotron_nas.py")


class VllmWouldFail(Exception):
    """vLLM would refuse this checkpoint (config parse, model build or weight loading)."""


# ---- nemotron_nas.py, literally ----------------------------------------------------------------------
def _ffn_mult_to_intermediate_size(ffn_mult: float, n_embd: int) -> int:
    # DeciLM-specific code
    intermediate_size = int(2 * ffn_mult * n_embd / 3)
    return _find_multiple(intermediate_size, 256)


def _find_multiple(n: int, k: int) -> int:
    # DeciLM-specific code
    if n % k == 0:
        return n
    return n + k - (n % k)


# ---- NVIDIA block_config.py: what the config object holds per block ---------------------------------------
_ATTN_FIELDS = ("no_op", "replace_with_linear", "sparsify", "n_heads_in_group", "window_length", "num_sink_tokens",
                "use_prefill_window_in_sink_attention", "unshifted_sink")
_FFN_FIELDS = ("no_op", "replace_with_linear", "sparsify", "ffn_mult")


def nvidia_block(d: dict) -> dict:
    """``BlockConfig(**d)`` as NVIDIA's block_config.py builds it: unknown fields dropped; no_op xor linear;
    no_op / linear null the width fields; a live attention needs n_heads_in_group; a live FFN needs
    ffn_mult, kept as round(ffn_mult, 6)."""
    attn = {k: v for k, v in d.get("attention", {}).items() if k in _ATTN_FIELDS}
    ffn = {k: v for k, v in d.get("ffn", {}).items() if k in _FFN_FIELDS}
    for part, name in ((attn, "attention"), (ffn, "ffn")):
        if part.get("no_op") and part.get("replace_with_linear"):
            raise VllmWouldFail(f"{name}: no_op and replace_with_linear both set (AssertionError)")
    if attn.get("no_op") or attn.get("replace_with_linear"):
        attn.update(n_heads_in_group=None, window_length=None, num_sink_tokens=None)
    elif attn.get("n_heads_in_group") is None:
        raise VllmWouldFail("attention.n_heads_in_group is None in a live attention block (AssertionError)")
    if ffn.get("no_op") or ffn.get("replace_with_linear"):
        ffn["ffn_mult"] = None
    elif ffn.get("ffn_mult") is None:
        raise VllmWouldFail("ffn.ffn_mult is None in a live FFN block (AssertionError)")
    else:
        ffn["ffn_mult"] = round(ffn["ffn_mult"], 6)
    return {"attention": attn, "ffn": ffn}


# ---- the layer shapes vLLM builds ---------------------------------------------------------------------
@dataclass(frozen=True)
class VllmLayer:
    attn_no_op: bool
    ffn_no_op: bool
    num_heads: int  # config.num_attention_heads (0 when no-op)
    num_kv_heads: int  # num_attention_heads // n_heads_in_group (0 when no-op)
    intermediate_size: int  # 0 when no-op


@dataclass(frozen=True)
class VllmDeci:
    hidden_size: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    logit_scale: float
    rope_parameters: dict
    max_position: int
    layers: tuple[VllmLayer, ...]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """vLLM's ``named_parameters()`` shapes at tensor-parallel size 1 (vocab unpadded, as loaded)."""
        h, hd = self.hidden_size, self.head_dim
        p = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tie_word_embeddings:
            p["lm_head.weight"] = (self.vocab_size, h)
        for i, L in enumerate(self.layers):
            pre = f"model.layers.{i}"
            if not L.attn_no_op:
                qkv = (L.num_heads + 2 * L.num_kv_heads) * hd
                p[f"{pre}.input_layernorm.weight"] = (h,)
                p[f"{pre}.self_attn.qkv_proj.weight"] = (qkv, h)
                p[f"{pre}.self_attn.o_proj.weight"] = (h, L.num_heads * hd)
                if self.qkv_bias:
                    p[f"{pre}.self_attn.qkv_proj.bias"] = (qkv,)
                if self.o_bias:
                    p[f"{pre}.self_attn.o_proj.bias"] = (h,)
            if not L.ffn_no_op:
                m = L.intermediate_size
                p[f"{pre}.post_attention_layernorm.weight"] = (h,)
                p[f"{pre}.mlp.gate_up_proj.weight"] = (2 * m, h)
                p[f"{pre}.mlp.down_proj.weight"] = (h, m)
                if self.mlp_bias:
                    p[f"{pre}.mlp.gate_up_proj.bias"] = (2 * m,)
                    p[f"{pre}.mlp.down_proj.bias"] = (h,)
        return p

    def shard_shapes(self, param: str) -> dict:
        """The shard ids of a stacked param and each one's shape (QKVParallelLinear / MergedColumnParallelLinear)."""
        i = int(param.split(".")[2])
        L, hd, h = self.layers[i], self.head_dim, self.hidden_size
        tail = () if param.endswith(".bias") else (h,)
        if ".qkv_proj" in param:
            return {"q": (L.num_heads * hd, *tail), "k": (L.num_kv_heads * hd, *tail),
                    "v": (L.num_kv_heads * hd, *tail)}
        return {0: (L.intermediate_size, *tail), 1: (L.intermediate_size, *tail)}


def read_config_object(cfg) -> VllmDeci:
    """What ``DeciLMForCausalLM.__init__`` builds from the hf_config object (attribute access, as vLLM does)."""
    if getattr(cfg, "model_type", None) != "nemotron-nas" or list(cfg.architectures or []) != ["DeciLMForCausalLM"]:
        raise VllmWouldFail(f"not a DeciLMForCausalLM / nemotron-nas config: {cfg.model_type} {cfg.architectures}")
    H, hidden = cfg.num_attention_heads, cfg.hidden_size
    # LlamaDecoderLayer / DeciLMDecoderLayer bias rules
    attention_bias = getattr(cfg, "attention_bias", False) or getattr(cfg, "bias", False)
    bias_o_proj = attention_bias
    if hasattr(cfg, "qkv_bias"):
        attention_bias = cfg.qkv_bias
    layers = []
    for i in range(cfg.num_hidden_layers):
        b = cfg.block_configs[i]
        attn_no_op, ffn_no_op = bool(b.attention.no_op), bool(b.ffn.no_op)
        kv = m = 0
        if not attn_no_op:
            if getattr(b.attention, "replace_with_linear", False):
                raise VllmWouldFail(f"layer {i}: attention.replace_with_linear (vLLM builds full attention from "
                                    "n_heads_in_group=None: TypeError)")
            kv = H // b.attention.n_heads_in_group
            if kv < 1 or H % kv:  # QKVParallelLinear / the attention backend need whole groups
                raise VllmWouldFail(f"layer {i}: {kv} KV heads for {H} heads")
        if not ffn_no_op:
            if getattr(b.ffn, "replace_with_linear", False):
                raise VllmWouldFail(f"layer {i}: ffn.replace_with_linear (vLLM builds an MLP from ffn_mult=None)")
            if hasattr(b.ffn, "ffn_mult"):
                m = _ffn_mult_to_intermediate_size(b.ffn.ffn_mult, hidden)
            else:
                m = b.ffn.intermediate_size
            act = b.ffn.hidden_act if hasattr(b.ffn, "hidden_act") else cfg.hidden_act
            if act != "silu":  # LlamaMLP
                raise VllmWouldFail(f"layer {i}: Unsupported activation: {act}. Only silu is supported for now.")
        layers.append(VllmLayer(attn_no_op, ffn_no_op, 0 if attn_no_op else H, kv, m))
    if all(L.attn_no_op for L in layers):  # ModelConfig.get_total_num_kv_heads
        raise VllmWouldFail("Couldn't determine number of kv heads")
    head_dim = getattr(cfg, "head_dim", None) or hidden // H
    return VllmDeci(hidden_size=hidden, vocab_size=cfg.vocab_size, head_dim=head_dim, rms_norm_eps=cfg.rms_norm_eps,
                    tie_word_embeddings=bool(cfg.tie_word_embeddings), qkv_bias=bool(attention_bias),
                    o_bias=bool(bias_o_proj), mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
                    logit_scale=getattr(cfg, "logit_scale", 1.0), rope_parameters=dict(cfg.rope_parameters or {}),
                    max_position=getattr(cfg, "max_position_embeddings", 8192), layers=tuple(layers))


def load_config(model_dir: Path):
    """``HFConfigParser.parse`` + ``patch_rope_parameters`` for this dir, with ``--trust-remote-code``.

    The raw ``block_configs`` are also run through NVIDIA's ``BlockConfig`` rules (``nvidia_block``), so a
    lenient config class shipped with the checkpoint cannot hide a block NVIDIA's would refuse; each
    block's widths as read through that class must equal the ones read through NVIDIA's.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if raw.get("model_type") not in CONFIG_MAPPING and "AutoConfig" not in (raw.get("auto_map") or {}):
        raise VllmWouldFail(f"model_type {raw.get('model_type')!r} is unknown to transformers and vLLM's config "
                            "registry and config.json has no auto_map.AutoConfig: AutoConfig raises ValueError")
    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - vLLM re-raises it
        raise VllmWouldFail(f"AutoConfig.from_pretrained: {type(e).__name__}: {e}") from e
    if getattr(cfg, "rope_theta", None) is not None or getattr(cfg, "rope_parameters", None):
        cfg.standardize_rope_params()
        cfg.validate_rope()
    blocks = [nvidia_block(b) for b in raw["block_configs"]]
    if len(blocks) != raw["num_hidden_layers"]:
        raise VllmWouldFail("len(block_configs) != num_hidden_layers (AssertionError)")
    spec = read_config_object(cfg)
    nv = read_config_object(_Obj(cfg, blocks))
    if nv.layers != spec.layers:
        raise VllmWouldFail(f"the shipped config class reads other widths than NVIDIA's BlockConfig: "
                            f"{spec.layers} vs {nv.layers}")
    return cfg, spec


class _Obj:
    """``cfg`` with ``block_configs`` replaced by NVIDIA-normalised blocks (attribute access)."""

    def __init__(self, cfg, blocks):
        self._cfg = cfg
        self.block_configs = [type("B", (), {"attention": _ns(b["attention"]), "ffn": _ns(b["ffn"])})
                              for b in blocks]

    def __getattr__(self, name):
        return getattr(self._cfg, name)


def _ns(d: dict):
    o = type("NS", (), {})()
    o.__dict__.update({"no_op": False, "replace_with_linear": False, **d})
    return o


# ---- DeciModel.load_weights (+ AutoWeightsLoader, DefaultModelLoader's all-loaded check) --------------------
STACKED_PARAMS_MAPPING = [
    # (param_name, shard_name, shard_id)
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]


def load_weights(spec: VllmDeci, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The checkpoint tensors routed as vLLM routes them; every name must hit a param vLLM allocated with
    the shape it allocated, and every param must be filled. Returns {param name: float64 array}.

    Stricter than vLLM in one place: vLLM counts a stacked param as loaded once any shard is, so a missing
    q/k/v or gate/up shard would load silently as uninitialised memory; here it is an error."""
    params = spec.param_shapes()
    shards: dict[str, dict] = {}
    loaded: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        if spec.tie_word_embeddings and name.startswith("lm_head."):  # AutoWeightsLoader skip_prefixes
            continue
        if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
            continue
        for param_name, weight_name, shard_id in STACKED_PARAMS_MAPPING:
            if weight_name not in name:
                continue
            pname = name.replace(weight_name, param_name)
            if pname.endswith(".bias") and pname not in params:  # "Skip loading extra bias for GPTQ models."
                break
            if pname not in params:
                raise VllmWouldFail(f"{name}: no parameter {pname} (KeyError in params_dict)")
            want = spec.shard_shapes(pname)[shard_id]
            if tuple(w.shape) != want:
                raise VllmWouldFail(f"{name}: shape {tuple(w.shape)}, vLLM's {pname}[{shard_id!r}] is {want}")
            shards.setdefault(pname, {})[shard_id] = np.asarray(w, np.float64)
            break
        else:
            if name.endswith(".bias") and name not in params:
                continue
            if name not in params:
                raise VllmWouldFail(f"{name}: There is no module or parameter named {name!r}")
            if tuple(w.shape) != params[name]:
                raise VllmWouldFail(f"{name}: shape {tuple(w.shape)}, vLLM allocates {params[name]}")
            loaded[name] = np.asarray(w, np.float64)
    for pname, parts in shards.items():
        order = ["q", "k", "v"] if ".qkv_proj" in pname else [0, 1]
        if set(parts) != set(order):
            raise VllmWouldFail(f"{pname}: shards {sorted(map(str, parts))} of {order} loaded")
        loaded[pname] = np.concatenate([parts[s] for s in order], axis=0)
    missing = sorted(set(params) - set(loaded))
    if missing:
        raise VllmWouldFail(f"Following weights were not initialized from checkpoint: {missing}")
    return loaded


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- the forward ---------------------------------------------------------------------------------------
def _inv_freq(spec: VllmDeci, rotary_dim: int) -> np.ndarray:
    rp = spec.rope_parameters
    base = rp.get("rope_theta", 10000)
    inv = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))  # base._compute_inv_freq
    kind = rp.get("rope_type", "default")
    if kind in ("default", "linear"):
        return inv
    if kind == "llama3":  # llama3_rope.Llama3RotaryEmbedding._compute_inv_freq
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        orig = rp["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = orig / lo, orig / hi
        wave_len = 2 * math.pi / inv
        smooth = (orig / wave_len - lo) / (hi - lo) if lo != hi else 0
        return np.where(wave_len < high_freq_wavelen, inv,
                        np.where(wave_len > low_freq_wavelen, inv / factor,
                                 (1 - smooth) * inv / factor + smooth * inv))
    raise NotImplementedError(f"rope_type {kind!r} is not ported")


def _rope(spec: VllmDeci, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """RotaryEmbedding.forward_native, neox style; x [T, heads, head_dim]."""
    rp = spec.rope_parameters
    rotary_dim = int(spec.head_dim * rp.get("partial_rotary_factor", 1.0))
    t = positions.astype(np.float64)
    if rp.get("rope_type", "default") == "linear":  # LinearScalingRotaryEmbedding: t = t / scaling_factor
        t = t / rp["factor"]
    freqs = np.einsum("i,j->ij", t, _inv_freq(spec, rotary_dim))
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]
    rot, pas = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    return np.concatenate([o1, o2, pas], axis=-1)


def _rms_norm(spec: VllmDeci, w: np.ndarray, x: np.ndarray, residual: np.ndarray | None):
    """RMSNorm.forward_native: with a residual, x += residual first and the sum is the new residual."""
    if residual is not None:
        x = x + residual
        residual = x
    var = np.mean(x * x, axis=-1, keepdims=True)
    out = x / np.sqrt(var + spec.rms_norm_eps) * w
    return out if residual is None else (out, residual)


def _attention(spec: VllmDeci, W: dict, pre: str, L: VllmLayer, x: np.ndarray, positions: np.ndarray):
    hd = spec.head_dim
    q_size, kv_size = L.num_heads * hd, L.num_kv_heads * hd
    qkv = x @ W[f"{pre}.self_attn.qkv_proj.weight"].T
    if spec.qkv_bias:
        qkv = qkv + W[f"{pre}.self_attn.qkv_proj.bias"]
    q, k, v = np.split(qkv, [q_size, q_size + kv_size], axis=-1)
    T = x.shape[0]
    q = _rope(spec, q.reshape(T, L.num_heads, hd), positions)
    k = _rope(spec, k.reshape(T, L.num_kv_heads, hd), positions)
    v = v.reshape(T, L.num_kv_heads, hd)
    group = L.num_heads // L.num_kv_heads  # query head j reads KV head j // group
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, kk) * hd ** -0.5
    scores = np.where(np.tril(np.ones((T, T), bool))[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, vv).reshape(T, q_size)
    out = out @ W[f"{pre}.self_attn.o_proj.weight"].T
    if spec.o_bias:
        out = out + W[f"{pre}.self_attn.o_proj.bias"]
    return out


def _mlp(spec: VllmDeci, W: dict, pre: str, L: VllmLayer, x: np.ndarray):
    gate_up = x @ W[f"{pre}.mlp.gate_up_proj.weight"].T
    if spec.mlp_bias:
        gate_up = gate_up + W[f"{pre}.mlp.gate_up_proj.bias"]
    d = gate_up.shape[-1] // 2  # SiluAndMul: silu(x[..., :d]) * x[..., d:]
    g, u = gate_up[..., :d], gate_up[..., d:]
    h = g / (1.0 + np.exp(-g)) * u
    out = h @ W[f"{pre}.mlp.down_proj.weight"].T
    if spec.mlp_bias:
        out = out + W[f"{pre}.mlp.down_proj.bias"]
    return out


def forward(spec: VllmDeci, W: dict, tokens) -> np.ndarray:
    """float64 logits [batch, T, vocab]: DeciModel.forward + compute_logits, one sequence at a time
    (vLLM flattens a batch into independent sequences, positions 0..T-1 each)."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    out = []
    for seq in tokens:
        positions = np.arange(len(seq))
        hidden = W["model.embed_tokens.weight"][seq]
        residual = None
        for i, L in enumerate(spec.layers):  # DeciLMDecoderLayer.forward
            pre = f"model.layers.{i}"
            if not L.attn_no_op:
                if residual is None:
                    residual = hidden
                    hidden = _rms_norm(spec, W[f"{pre}.input_layernorm.weight"], hidden, None)
                else:
                    hidden, residual = _rms_norm(spec, W[f"{pre}.input_layernorm.weight"], hidden, residual)
                hidden = _attention(spec, W, pre, L, hidden, positions)
            if not L.ffn_no_op:
                if residual is None:  # vLLM would unpack RMSNorm's single tensor: layer 0 attention no-op
                    raise VllmWouldFail(f"layer {i}: no-op attention before any residual (unpack error in vLLM)")
                hidden, residual = _rms_norm(spec, W[f"{pre}.post_attention_layernorm.weight"], hidden, residual)
                hidden = _mlp(spec, W, pre, L, hidden)
        hidden, _ = _rms_norm(spec, W["model.norm.weight"], hidden, residual)
        head = W["model.embed_tokens.weight"] if spec.tie_word_embeddings else W["lm_head.weight"]
        out.append(hidden @ head.T * spec.logit_scale)
    return np.stack(out)


def read_model(model_dir: Path):
    """(spec, weights) as vLLM would build and load them from ``model_dir``; raises VllmWouldFail."""
    _, spec = load_config(model_dir)
    return spec, load_weights(spec, read_tensors(model_dir))
