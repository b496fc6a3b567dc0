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

``nemotron-nas`` is a model type neither transformers nor vLLM's config registry knows: vLLM reads the
config with ``AutoConfig.from_pretrained(dir, trust_remote_code=...)``, which needs ``auto_map`` and the
config class's file in the dir (NVIDIA ships ``configuration_decilm.py``). The export writes a small
self-contained ``configuration_decilm.py`` (``CONFIG_CODE``) and points ``auto_map.AutoConfig`` at it;
serve with ``vllm serve DIR --trust-remote-code``.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import UserError
from .families import supporting

MODEL_TYPE = "nemotron-nas"
FFN_MULTIPLE = 256  # vLLM's _find_multiple(., 256)
CONFIG_FILE = "configuration_decilm.py"
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig"}

#: The config class vLLM instantiates through ``auto_map`` (``--trust-remote-code``): block_configs become
#: objects with NVIDIA's ``block_config.py`` fields and rules, which is what vLLM's nemotron_nas.py reads
#: (``block_config.attention.no_op``, ``.n_heads_in_group``, ``hasattr(block_config.ffn, "ffn_mult")``).
CONFIG_CODE = '''"""DeciLM / Nemotron-NAS config (model_type "nemotron-nas"), written by jaxprune's vLLM export.

Self-contained: block_configs entries follow NVIDIA's block_config.py (unknown fields dropped; no_op /
replace_with_linear null the width fields; a live FFN keeps round(ffn_mult, 6)).
"""

import dataclasses
import warnings
from typing import Optional

from transformers import PretrainedConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: Optional[list] = None
    n_heads_in_group: Optional[int] = None
    window_length: Optional[int] = None
    num_sink_tokens: Optional[int] = None
    use_prefill_window_in_sink_attention: bool = False
    unshifted_sink: bool = False

    def __post_init__(self):
        assert not (self.no_op and self.replace_with_linear)
        if self.no_op or self.replace_with_linear:
            for name in ("n_heads_in_group", "window_length", "num_sink_tokens"):
                object.__setattr__(self, name, None)
        else:
            assert self.n_heads_in_group is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: Optional[list] = None
    ffn_mult: Optional[float] = None

    def __post_init__(self):
        assert not (self.no_op and self.replace_with_linear)
        if self.no_op or self.replace_with_linear:
            object.__setattr__(self, "ffn_mult", None)
        else:
            assert self.ffn_mult is not None
            object.__setattr__(self, "ffn_mult", round(self.ffn_mult, 6))


def _sub(cls, d):
    if isinstance(d, cls):
        return d
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        warnings.warn(f"Removed unsupported fields {unknown} from {cls.__name__}")
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    def __post_init__(self):
        object.__setattr__(self, "attention", _sub(AttentionConfig, self.attention))
        object.__setattr__(self, "ffn", _sub(FFNConfig, self.ffn))


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        if block_configs is not None:
            block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in block_configs]
        self.block_configs = block_configs
        super().__init__(**kwargs)
        if block_configs is not None:
            assert len(block_configs) == self.num_hidden_layers

    def to_dict(self):
        d = super().to_dict()
        if self.block_configs is not None:
            d["block_configs"] = [dataclasses.asdict(b) for b in self.block_configs]
        return d
'''


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
        "auto_map": dict(AUTO_MAP),
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
