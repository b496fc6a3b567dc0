"""ModelConfig: the LLaMA family's hyper-parameters, with per-layer widths.

Pruning makes layers differ, so head counts and MLP widths may be given per
layer (``layer_num_heads``, ``layer_num_kv_heads``, ``layer_intermediate_size``).
``from_hf_dict`` / ``to_hf_dict`` convert to and from an HF ``config.json``
(both the transformers 4 spelling ``rope_theta`` + ``rope_scaling`` and the
transformers 5 spelling ``rope_parameters`` are read); what a family changes
from LLaMA's keys is its module's in ``families``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .families import ACTIVATIONS, FAMILIES, HF_KEYS, LAYER_TYPES, Family

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
#: the model_types read and written (``families``: one module each, with what it changes from LLaMA)
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


# ---- validation: every field read, one rule each (type, range; consistency in ModelConfig.__post_init__) ----
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Rule:
    """What one config field must hold: ``kind`` (int, number, bool, str), a range [lo, hi] (``lo_open``: lo
    excluded) and whether null (None) is allowed."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    null: bool = False

    def ok(self, v) -> bool:
        if v is None:
            return self.null
        good = {"int": _is_int, "number": _is_number, "bool": lambda x: isinstance(x, bool),
                "str": lambda x: isinstance(x, str)}[self.kind](v)
        if not good or self.kind in ("bool", "str"):
            return good
        return not ((self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)))
                    or (self.hi is not None and v > self.hi))

    def describe(self) -> str:
        what = {"int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string"}[self.kind]
        num = lambda x: f"{x:d}" if isinstance(x, int) else f"{x:g}"  # noqa: E731
        if self.lo is not None and self.hi is not None:
            what += f" in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}]"
        elif self.lo is not None:
            what += f" {'>' if self.lo_open else '>='} {num(self.lo)}"
        return what + (" or null" if self.null else "")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_field(name: str, value, rule: Rule) -> None:
    """A UserError ``config: NAME=VALUE must be ...`` unless ``value`` satisfies ``rule``."""
    if not rule.ok(value):
        raise UserError(f"config: {name}={_shown(value)} must be {rule.describe()}")


def check_list(name: str, value, rule: Rule, length: int | None = None) -> None:
    """``value`` a list whose every entry satisfies ``rule`` (and of ``length`` entries when given)."""
    if not isinstance(value, (list, tuple)):
        raise UserError(f"config: {name}={_shown(value)} must be a list")
    for i, x in enumerate(value):
        check_field(f"{name}[{i}]", x, rule)
    if length is not None and len(value) != length:
        raise UserError(f"config: {name} has {len(value)} entries, expected {length}")


#: sizes are int32 (jax indexes with them); a layer or head count beyond 2**16 is no model that exists
MAX_SIZE, MAX_COUNT = 2**31 - 1, 2**16
BOOL = Rule("bool")
SIZE, COUNT = Rule("int", 1, MAX_SIZE), Rule("int", 1, MAX_COUNT)
POS_NUMBER = Rule("number", 0, lo_open=True)
OPT_POS_NUMBER = Rule("number", 0, lo_open=True, null=True)
TOKEN_ID = Rule("int", -1, MAX_SIZE, null=True)  # -1: none (older HF configs)
#: ModelConfig's fields (eos_token_id, rope_scaling, the per-layer tuples and layer_types: in __post_init__)
FIELD_RULES: dict[str, Rule] = {
    "vocab_size": SIZE, "hidden_size": SIZE, "intermediate_size": Rule("int", 0, MAX_SIZE), "num_layers": COUNT,
    "num_heads": Rule("int", 0, MAX_COUNT), "num_kv_heads": Rule("int", 0, MAX_COUNT), "head_dim": SIZE,
    "rope_theta": POS_NUMBER, "max_position_embeddings": SIZE, "rms_norm_eps": Rule("number", 0),
    "tie_word_embeddings": BOOL,
    "attention_bias": BOOL, "mlp_bias": BOOL, "model_type": Rule("str"), "attention_out_bias": Rule("bool", null=True),
    "qk_norm": BOOL, "sliding_window": Rule("int", 1, MAX_SIZE, null=True),
    "partial_rotary_factor": Rule("number", 0, 1, lo_open=True), "hidden_act": Rule("str"), "norm_one_plus": BOOL,
    "sandwich_norms": BOOL, "scale_embeddings": BOOL, "query_pre_attn_scalar": OPT_POS_NUMBER,
    "rope_local_base_freq": OPT_POS_NUMBER, "final_logit_softcapping": OPT_POS_NUMBER,
    "bos_token_id": TOKEN_ID, "pad_token_id": TOKEN_ID,
}
#: the HF ``config.json`` keys read (any family), checked before anything is computed from them; null where a
#: missing key's default applies
HF_RULES: dict[str, Rule] = {
    "vocab_size": SIZE, "hidden_size": SIZE, "intermediate_size": Rule("int", 0, MAX_SIZE),
    "num_hidden_layers": COUNT, "num_attention_heads": Rule("int", 0, MAX_COUNT),
    "num_key_value_heads": Rule("int", 0, MAX_COUNT, null=True), "head_dim": Rule("int", 1, MAX_SIZE, null=True),
    "rope_theta": POS_NUMBER, "max_position_embeddings": SIZE,
    "rms_norm_eps": Rule("number", 0), "tie_word_embeddings": BOOL, "attention_bias": BOOL, "mlp_bias": BOOL,
    "hidden_act": Rule("str", null=True), "hidden_activation": Rule("str", null=True),
    "pretraining_tp": Rule("int", 1, null=True),
    "sliding_window": Rule("int", 1, MAX_SIZE, null=True), "use_sliding_window": Rule("bool", null=True),
    "sliding_window_pattern": COUNT, "partial_rotary_factor": Rule("number", 0, 1, lo_open=True, null=True),
    "query_pre_attn_scalar": OPT_POS_NUMBER, "rope_local_base_freq": POS_NUMBER,
    "final_logit_softcapping": OPT_POS_NUMBER,
    "use_bidirectional_attention": Rule("bool", null=True),
    "original_max_position_embeddings": Rule("int", 1, MAX_SIZE, null=True), "bos_token_id": TOKEN_ID,
    "pad_token_id": TOKEN_ID,
}
HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_hf_fields(d: dict, required: tuple[str, ...] = HF_REQUIRED) -> None:
    """Every key of an HF ``config.json`` dict that some family reads, by ``HF_RULES`` (types and ranges), before
    anything is computed from them; the rope dicts' shapes; ``required`` keys present."""
    if not isinstance(d, dict):
        raise UserError(f"config: the file holds a JSON {type(d).__name__}, not an object of fields")
    for key in required:
        if key not in d:
            raise UserError(f"config: required field {key!r} is missing")
    for key, rule in HF_RULES.items():
        if key in d:
            check_field(key, d[key], rule)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        check_list("eos_token_id", eos, TOKEN_ID)
    else:
        check_field("eos_token_id", eos, TOKEN_ID)
    if d.get("layer_types") is not None:
        check_list("layer_types", d["layer_types"], Rule("str"))
    for key in ("rope_scaling", "rope_parameters"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise UserError(f"config: {key}={_shown(rope)} must be a mapping or null")
        nested = {key: rope}
        for sub in LAYER_TYPES:  # Gemma 3's per-layer-type rope_parameters
            if sub in rope and rope[sub] is not None:
                if not isinstance(rope[sub], dict):
                    raise UserError(f"config: {key}.{sub}={_shown(rope[sub])} must be a mapping or null")
                nested[f"{key}.{sub}"] = rope[sub]
        for where, params in nested.items():
            for name, rule in (("rope_theta", POS_NUMBER), ("rope_type", Rule("str")), ("type", Rule("str")),
                               ("partial_rotary_factor", HF_RULES["partial_rotary_factor"])):
                if name in params:
                    check_field(f"{where}.{name}", params[name], rule)


def check_rope_scaling(scaling, prefix: str, rotary: int) -> None:
    """The RoPE scaling parameters ``rope.inv_frequencies`` reads (``prefix``: where they sit in the file), for a
    rotary dimension ``rotary`` (rope_type itself is checked by ``ModelConfig``)."""
    if not scaling:
        return
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    check_field(f"{prefix}.rope_type", rtype, Rule("str"))
    opt_number, opt_len = OPT_POS_NUMBER, Rule("int", 1, MAX_SIZE, null=True)
    if rtype == "longrope":
        missing = [k for k in ("short_factor", "long_factor", "original_max_position_embeddings")
                   if scaling.get(k) is None]
        if missing:
            raise UserError(f"config: {prefix} longrope needs {', '.join(missing)}")
    if rtype in ("linear", "dynamic", "llama3"):
        check_field(f"{prefix}.factor", scaling.get("factor"), POS_NUMBER)
    if rtype in ("dynamic", "llama3", "longrope"):
        check_field(f"{prefix}.original_max_position_embeddings", scaling.get("original_max_position_embeddings"),
                    SIZE if rtype == "longrope" else opt_len)
    if rtype == "dynamic" and rotary <= 2:
        raise UserError(f"config: {prefix} dynamic needs more than 2 rotary dims (has {rotary})")
    if rtype == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            check_field(f"{prefix}.{key}", scaling.get(key), opt_number)
        low, high = scaling.get("low_freq_factor", 1.0) or 1.0, scaling.get("high_freq_factor", 4.0) or 4.0
        if high <= low:
            raise UserError(f"config: {prefix}.high_freq_factor={high!r} must be > low_freq_factor={low!r}")
    if rtype == "longrope":
        for key in ("short_factor", "long_factor"):
            check_list(f"{prefix}.{key}", scaling.get(key), POS_NUMBER, rotary // 2)
        for key in ("factor", "attention_factor"):
            check_field(f"{prefix}.{key}", scaling.get(key), opt_number)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": ..., "factor": ..., ...}; None = default
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o, unless attention_out_bias says otherwise)
    mlp_bias: bool = False
    model_type: str = "llama"  # the family (families.FAMILIES); exported back as the same model_type
    attention_out_bias: bool | None = None  # o_proj's bias; None: attention_bias (LLaMA); Qwen2: False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    sliding_window: int | None = None  # Mistral: query i sees keys j with i - W < j <= i
    partial_rotary_factor: float = 1.0  # RoPE rotates the first int(head_dim·f) dims of each head (Phi)
    # ---- Gemma 3 (transformers' names where it has one) ----
    hidden_act: str = "silu"  # MLP: down(act(gate x) · up x); Gemma: gelu_pytorch_tanh (HF hidden_activation)
    norm_one_plus: bool = False  # Gemma3RMSNorm: (norm(x)·(1 + w)) in fp32, then the cast; w stored 0-centred
    sandwich_norms: bool = False  # Gemma: post_attention_layernorm on attn's output; pre/post_feedforward on MLP's
    scale_embeddings: bool = False  # Gemma: embeddings × sqrt(hidden), the scale cast to the weights' dtype
    query_pre_attn_scalar: float | None = None  # scores = q·k / sqrt(this); None: head_dim
    layer_types: tuple[str, ...] | None = None  # per layer full_attention / sliding_attention; None: all alike
    rope_local_base_freq: float | None = None  # RoPE base of the sliding layers (default rope); None: rope_theta
    final_logit_softcapping: float | None = None  # logits = c·tanh(logits / c)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Per-layer widths after pruning (None: every layer uses the global value).
    layer_num_heads: tuple[int, ...] | None = None
    layer_num_kv_heads: tuple[int, ...] | None = None
    layer_intermediate_size: tuple[int, ...] | None = None
    extra_hf: dict = field(default_factory=dict, compare=False)  # HF keys we carry through export

    def __post_init__(self):
        for name, rule in FIELD_RULES.items():
            check_field(name, getattr(self, name), rule)
        if isinstance(self.eos_token_id, (list, tuple)):
            check_list("eos_token_id", self.eos_token_id, TOKEN_ID)
        else:
            check_field("eos_token_id", self.eos_token_id, TOKEN_ID)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise UserError(f"config: rope_scaling={_shown(self.rope_scaling)} must be a mapping or null")
        for name in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size"):
            v = getattr(self, name)
            if v is not None:
                check_list(name, v, Rule("int", 0, MAX_SIZE))
                if len(v) != self.num_layers:
                    raise UserError(f"config: {name} has {len(v)} entries, expected num_layers={self.num_layers}")
                object.__setattr__(self, name, tuple(int(x) for x in v))
        for i in range(self.num_layers):
            h, kv = self.heads(i), self.kv_heads(i)
            if (kv and h % kv) or (h and not kv):
                raise UserError(f"config: layer {i} has {h} query heads over {kv} KV heads "
                                "(num_attention_heads must be a multiple of num_key_value_heads)")
        if self.model_type not in FAMILIES:
            raise UserError(f"config: model_type={self.model_type!r} is not supported ({', '.join(FAMILIES)})")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"config: hidden_act={self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            check_list("layer_types", self.layer_types, Rule("str"))
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if len(self.layer_types) != self.num_layers or bad:
                raise UserError(f"config: layer_types needs {self.num_layers} entries from {', '.join(LAYER_TYPES)}"
                                + (f" (got {bad[0]!r})" if bad else f" (got {len(self.layer_types)})"))
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise UserError("config: layer_types has sliding_attention layers but sliding_window is null")
        rotary = int(self.head_dim * self.partial_rotary_factor)
        if rotary < 2 or rotary % 2:
            raise UserError(f"config: partial_rotary_factor={self.partial_rotary_factor!r} of head_dim="
                            f"{self.head_dim} rotates {rotary} dims (RoPE needs an even number >= 2)")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"config: rope_scaling.rope_type={rope_type!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        check_rope_scaling(self.rope_scaling, "rope_scaling", rotary)

    # ---- per-layer accessors -------------------------------------------------
    def heads(self, layer: int) -> int:
        return self.layer_num_heads[layer] if self.layer_num_heads else self.num_heads

    def kv_heads(self, layer: int) -> int:
        return self.layer_num_kv_heads[layer] if self.layer_num_kv_heads else self.num_kv_heads

    def mlp_width(self, layer: int) -> int:
        return self.layer_intermediate_size[layer] if self.layer_intermediate_size else self.intermediate_size

    def window(self, layer: int) -> int | None:
        """Layer's sliding window: ``sliding_window`` on every layer unless ``layer_types`` names the sliding ones."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def is_local(self, layer: int) -> bool:
        """Whether the layer takes the local RoPE tables (Gemma's sliding layers, ``rope_local_base_freq``)."""
        return self.rope_local_base_freq is not None and self.window(layer) is not None

    @property
    def o_bias(self) -> bool:
        """Whether o_proj has a bias."""
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    @property
    def family(self) -> Family:
        """The model family (``families``): its HF config keys and tensor layout."""
        return FAMILIES[self.model_type]

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the global widths (an HF config can describe it exactly)."""
        return all(self.heads(i) == self.num_heads and self.kv_heads(i) == self.num_kv_heads
                   and self.mlp_width(i) == self.intermediate_size for i in range(self.num_layers))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_layer_widths(self, heads, kv_heads, mlp) -> "ModelConfig":
        """A config whose layer i has heads[i] / kv_heads[i] / mlp[i]; collapses to globals if uniform."""
        heads, kv_heads, mlp = tuple(heads), tuple(kv_heads), tuple(mlp)
        if len(set(heads)) == 1 and len(set(kv_heads)) == 1 and len(set(mlp)) == 1:
            return self.replace(num_heads=heads[0], num_kv_heads=kv_heads[0], intermediate_size=mlp[0],
                                layer_num_heads=None, layer_num_kv_heads=None, layer_intermediate_size=None)
        return self.replace(layer_num_heads=heads, layer_num_kv_heads=kv_heads, layer_intermediate_size=mlp)

    def padded(self) -> "ModelConfig":
        """The uniform config of the widest layer (zero-padded export of a non-uniform model)."""
        L = range(self.num_layers)
        kv = max(self.kv_heads(i) for i in L)
        group = max(self.heads(i) // max(self.kv_heads(i), 1) for i in L)
        return self.replace(num_heads=kv * group, num_kv_heads=kv,
                            intermediate_size=max(self.mlp_width(i) for i in L),
                            layer_num_heads=None, layer_num_kv_heads=None, layer_intermediate_size=None)

    def stock_layout(self) -> "ModelConfig":
        """This uniform config, or for gemma3_text its query heads zero-padded (``padding.pad_to_layout``) to the
        fewest that divide hidden_size: Gemma3TextConfig refuses hidden_size % num_attention_heads != 0, though
        head_dim is explicit (a pruned 640-wide Gemma 3 270M with 3 of 4 heads exports with 4)."""
        h, kv = self.num_heads, self.num_kv_heads
        if not self.family.heads_divide_hidden or not h or self.hidden_size % h == 0:
            return self
        fits = [n for n in range(h + kv, self.hidden_size + 1, kv) if self.hidden_size % n == 0]
        if not fits:
            raise UserError(f"export: no query-head count >= {h} in groups of {kv} divides hidden_size "
                            f"{self.hidden_size} (transformers' Gemma3TextConfig requires it)")
        return self.replace(num_heads=fits[0])

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size", "layer_types"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = dataclasses.fields(cls)
        unknown = set(d) - {f.name for f in fields}
        if unknown:
            raise UserError(f"config: unknown keys {sorted(unknown)}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in d]
        if missing:
            raise UserError(f"config: required field {missing[0]!r} is missing")
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---- HF ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read an HF LLaMA ``config.json`` dict; anything unsupported is a UserError naming the field."""
        if not isinstance(d, dict):
            raise UserError(f"config: the file holds a JSON {type(d).__name__}, not an object of fields")
        model_type = d.get("model_type")
        fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
        if fam is None:
            raise UserError(f"config: model_type={model_type!r} is not supported (jaxprune handles the "
                            f"LLaMA family: model_type {', '.join(map(repr, SUPPORTED_ARCHITECTURES))})")
        check_hf_fields(d)
        prefix = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        if isinstance(d.get("rope_parameters"), dict) and "full_attention" in d["rope_parameters"]:
            prefix = "rope_parameters.full_attention"
        d = fam.normalise_hf(d)
        family = fam.fields(d)
        act, acts = d.get("hidden_act", "silu"), fam.hidden_acts
        if acts is not None and act not in acts:
            raise UserError(f"config: hidden_act={act!r} is not supported (only {', '.join(map(repr, acts))})")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise UserError("config: pretraining_tp > 1 is not supported")
        heads = d["num_attention_heads"]
        kv = heads if d.get("num_key_value_heads") is None else d["num_key_value_heads"]
        head_dim = d.get("head_dim")
        if head_dim is None:
            if heads == 0 or d["hidden_size"] < heads:
                raise UserError(f"config: num_attention_heads={heads} leaves no head_dim for hidden_size="
                                f"{d['hidden_size']} (give head_dim)")
            head_dim = d["hidden_size"] // heads
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        check_field("rope_theta", rope_theta, POS_NUMBER)  # Gemma 3: its defaults, read after normalise_hf
        scaling = d.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        partial = 1.0 if partial is None else partial
        if scaling:
            scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
            rtype = scaling.pop("type", None) or scaling.get("rope_type", "default")
            check_field(f"{prefix}.rope_type", rtype, Rule("str"))
            scaling["rope_type"] = fam.rope_type_aliases.get(rtype, rtype)
            if scaling["rope_type"] == "longrope":
                scaling.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
            if rtype == "default":
                scaling = None
            check_rope_scaling(scaling, prefix, int(head_dim * partial))
        known = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
                 "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
                 "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "hidden_act",
                 "architectures", "pretraining_tp", "dtype", "torch_dtype", "transformers_version",
                 "layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size", "sliding_window",
                 "use_sliding_window", "max_window_layers", "layer_types", "partial_rotary_factor"} | HF_KEYS
        extra = {k: v for k, v in d.items() if k not in known and not k.startswith("_")}
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=kv, head_dim=head_dim, rope_theta=float(rope_theta),
            rope_scaling=scaling or None, partial_rotary_factor=partial,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra_hf=extra,
        ).replace(**family)

    def to_hf_dict(self) -> dict:
        """The HF config dict of the family; a non-uniform model must be ``padded()`` first."""
        if not self.is_uniform:
            raise ValueError("to_hf_dict needs a uniform config: call .padded() first")
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope_parameters.update(self.rope_scaling)
        if self.partial_rotary_factor != 1.0 or self.family.writes_partial_rotary:
            rope_parameters["partial_rotary_factor"] = self.partial_rotary_factor
        d = dict(self.extra_hf)
        d.update({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "pretraining_tp": 1,
        })
        return self.family.to_hf(self, d)

    def num_params(self) -> int:
        """Parameter count implied by the config (tied embeddings counted once)."""
        h, hd = self.hidden_size, self.head_dim
        n = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for i in range(self.num_layers):
            q, kv, m = self.heads(i) * hd, self.kv_heads(i) * hd, self.mlp_width(i)
            n += h * (q + 2 * kv) + q * h + 3 * h * m + 2 * h
            if self.attention_bias:
                n += q + 2 * kv
            if self.o_bias:
                n += h
            if self.qk_norm and q:
                n += 2 * hd
            if self.sandwich_norms:
                n += 2 * h
            if self.mlp_bias:
                n += 2 * m + h
        return n


def tiny_config(**kw: Any) -> ModelConfig:
    """A small random-model config for tests and examples."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)
