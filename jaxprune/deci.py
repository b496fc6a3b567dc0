"""vLLM's per-layer-width LLaMA config: DeciLM / ``nemotron-nas`` (``DeciLMForCausalLM``).

vLLM (``model_executor/models/nemotron_nas.py``) builds decoder layer i from
``block_configs[i]``:

* attention: ``num_heads = num_attention_heads`` (one global count) and
  ``num_kv_heads = num_attention_heads // n_heads_in_group`` (per layer);
* MLP: ``intermediate_size = find_multiple(int(2·ffn_mult·hidden/3), 256)`` (per layer).

So a pruned model maps onto it with padding where the form cannot say what it has: a layer
with fewer query heads than the global count gets zero heads (``padding.pad_to_layout``), a
KV-head count that does not divide the global head count grows to one that does, and MLP
widths round up to a multiple of 256. Tensor names are LLaMA's.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import UserError
from .families import supporting

MODEL_TYPE = "nemotron-nas"
FFN_MULTIPLE = 256  # vLLM's _find_multiple(., 256)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden: int) -> int:
    """vLLM's ``_ffn_mult_to_intermediate_size``: int(2·ffn_mult·hidden/3) rounded up to a multiple of 256."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % FFN_MULTIPLE == 0 else n + FFN_MULTIPLE - n % FFN_MULTIPLE


def intermediate_size_to_ffn_mult(width: int, hidden: int) -> float:
    """The ``ffn_mult`` whose vLLM width is ``width`` (a multiple of 256)."""
    mult = 1.5 * width / hidden
    if ffn_mult_to_intermediate_size(mult, hidden) != width:
        raise UserError(f"MLP width {width} has no DeciLM ffn_mult at hidden size {hidden}")
    return mult


def deci_layout(cfg: ModelConfig) -> ModelConfig:
    """The per-layer widths the DeciLM form can express that are closest above ``cfg``'s.

    Query heads: the widest layer's count H everywhere. KV heads: the smallest divisor kv' of H with
    kv' ≥ kv and H / kv' ≥ the layer's group size. MLP: rounded up to a multiple of 256.
    """
    if not cfg.family.vllm_deci or cfg.o_bias != cfg.attention_bias:
        raise UserError(f"vLLM DeciLM export: model_type {cfg.model_type!r} is not supported "
                        f"({supporting('vllm_deci')})")
    H = max(cfg.heads(i) for i in range(cfg.num_layers))
    kvs, widths = [], []
    for i in range(cfg.num_layers):
        kv, group = cfg.kv_heads(i), cfg.heads(i) // max(cfg.kv_heads(i), 1)
        fits = [d for d in range(max(kv, 1), H + 1) if H % d == 0 and H // d >= group]
        if not fits or cfg.heads(i) == 0 or cfg.mlp_width(i) == 0:
            raise UserError(f"layer {i} ({cfg.heads(i)} heads over {kv} KV heads, MLP {cfg.mlp_width(i)}) has no "
                            f"DeciLM form with {H} query heads")
        kvs.append(fits[0])
        m = cfg.mlp_width(i)
        widths.append(m if m % FFN_MULTIPLE == 0 else m + FFN_MULTIPLE - m % FFN_MULTIPLE)
    return cfg.replace(num_heads=H, num_kv_heads=max(kvs), intermediate_size=max(widths),
                       layer_num_heads=(H,) * cfg.num_layers, layer_num_kv_heads=tuple(kvs),
                       layer_intermediate_size=tuple(widths))


def to_deci_dict(layout: ModelConfig) -> dict:
    """The ``config.json`` of a model already padded to ``deci_layout``: LLaMA's keys + ``block_configs``."""
    uniform = layout.replace(layer_num_heads=None, layer_num_kv_heads=None, layer_intermediate_size=None,
                             num_kv_heads=layout.num_heads)  # a valid global config to start from
    d = uniform.to_hf_dict()
    H = layout.num_heads
    d.update({
        "architectures": ["DeciLMForCausalLM"], "model_type": MODEL_TYPE, "num_key_value_heads": None,
        "block_configs": [
            {"attention": {"n_heads_in_group": H // layout.kv_heads(i), "no_op": False, "replace_with_linear": False,
                           "sparsify": None, "window_length": None, "num_sink_tokens": None,
                           "use_prefill_window_in_sink_attention": False, "unshifted_sink": False},
             "ffn": {"ffn_mult": intermediate_size_to_ffn_mult(layout.mlp_width(i), layout.hidden_size),
                     "no_op": False, "replace_with_linear": False, "sparsify": None}}
            for i in range(layout.num_layers)],
    })
    d.pop("intermediate_size", None)
    return d


def from_deci_dict(d: dict) -> ModelConfig:
    """A DeciLM ``config.json`` dict -> ModelConfig with per-layer widths; no-op / linear blocks are refused."""
    blocks = d.get("block_configs")
    if not isinstance(blocks, list) or len(blocks) != d.get("num_hidden_layers"):
        raise UserError("config: nemotron-nas needs block_configs with one entry per layer")
    H, hidden = d["num_attention_heads"], d["hidden_size"]
    kvs, widths = [], []
    for i, b in enumerate(blocks):
        attn, ffn = b.get("attention", {}), b.get("ffn", {})
        for part, name in ((attn, "attention"), (ffn, "ffn")):
            for flag in ("no_op", "replace_with_linear"):
                if part.get(flag):
                    raise UserError(f"config: block_configs[{i}].{name}.{flag} is not supported")
        group = attn.get("n_heads_in_group")
        if not group or H % group:
            raise UserError(f"config: block_configs[{i}].attention.n_heads_in_group={group!r} does not divide "
                            f"num_attention_heads={H}")
        kvs.append(H // group)
        if ffn.get("ffn_mult") is not None:
            widths.append(ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden))
        elif ffn.get("intermediate_size"):
            widths.append(int(ffn["intermediate_size"]))
        else:
            raise UserError(f"config: block_configs[{i}].ffn has neither ffn_mult nor intermediate_size")
    llama = {k: v for k, v in d.items() if k not in ("block_configs", "auto_map")}
    llama.update({"model_type": "llama", "num_key_value_heads": max(kvs), "intermediate_size": max(widths)})
    base = ModelConfig.from_hf_dict(llama)
    return base.with_layer_widths([H] * len(blocks), kvs, widths)
