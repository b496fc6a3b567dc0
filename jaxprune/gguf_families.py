"""llama.cpp's architectures for jaxprune's families: which arch a family is written as, the tensors it takes,
the metadata it reads, and the models it cannot describe (one-line refusals).

| family | arch | what differs from LLaMA's file |
|---|---|---|
| llama | ``llama`` (per-layer widths: ``deci``) | q / k rows permuted to llama.cpp's interleaved RoPE |
| mistral | ``llama`` (``deci``) | as llama; no sliding window in llama.cpp's llama: ``context_length`` cut to it |
| qwen2 | ``qwen2`` | q / k / v biases always written; q as wide as hidden (query heads zero-padded) |
| qwen3 | ``qwen3`` | ``attn_q_norm`` / ``attn_k_norm``; not in the pinned llama.cpp (b4965 predates it) |
| gemma3 | ``gemma3`` | norms stored as 1 + w; sandwich and q / k norms; fixed 5:1 sliding pattern, local base 1e4 |
| phi3 | ``phi3`` | fused ``attn_qkv`` = [q; k; v], ``ffn_up`` = [gate; up]; partial rotary, longrope; as qwen2's q |

The pinned llama.cpp (``llamacpp.WHEEL``, build b4965) runs all but qwen3 in the tests; a recent llama.cpp (the
one vendored in llama-cpp-python 0.3.36, built once by hand) reproduced every arch, qwen3 included (tiny models,
f32: relative RMS of the logits 1.5e-6 to 1.7e-6; Gemma 3 3e-4, its f16 GELU table).

Only the llama arch uses llama.cpp's interleaved (``LLAMA_ROPE_TYPE_NORM``) RoPE; qwen2, qwen3, gemma3 and
phi3 rotate halves (``NEOX``) like transformers, so their q / k rows are written as they are, as
``convert_hf_to_gguf.py`` does. Where the pinned llama.cpp (llama-cpp-cffi 0.4.42, build b4965) sizes
``attn_q`` / ``attn_qkv`` from ``n_embd`` (qwen2, phi3), a model whose query heads were pruned gets zero query
heads (zero q rows and bias, zero ``attn_output`` columns: the same function, ``padding.pad_to_layout``) up
to hidden_size / head_dim heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import ModelConfig
from .errors import UserError, field_ref

LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_norm": "attn_q_norm",
         "k_norm": "attn_k_norm"}
#: Gemma's four norms around the two blocks (``sandwich_norms``)
SANDWICH_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                  "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                  "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
ALL_LINEARS = frozenset(LINEARS)
#: Phi-3's fused tensors, rows in this order (transformers' Phi3Attention / Phi3MLP slice them so)
FUSED_QKV, FUSED_GATE_UP = ("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")
#: llama.cpp's Gemma 3 (``llama_model::load_hparams``): every 6th layer global, the others slide with RoPE base 1e4
GEMMA3_SWA_PATTERN, GEMMA3_LOCAL_BASE = 6, 10000.0


@dataclass(frozen=True)
class GGUFArch:
    """How a family is written for llama.cpp."""
    name: str  # general.architecture
    per_layer: str | None = None  # the arch for layers of different widths (llama -> deci); None: refused / --pad
    permute_qk: bool = False  # llama's interleaved RoPE rows (``gguf_io.permute_qk``)
    fused: bool = False  # phi3: attn_qkv = [q; k; v] rows, ffn_up = [gate; up] rows
    q_is_hidden: bool = False  # llama.cpp sizes attn_q (attn_qkv) from n_embd: pad query heads to hidden / head_dim
    biases: frozenset = ALL_LINEARS  # linears whose bias llama.cpp reads (a nonzero other one is refused)
    required_biases: frozenset = frozenset()  # written even when all zero (llama.cpp requires them)
    norms: dict = field(default_factory=lambda: dict(NORMS))
    norm_shift: float = 0.0  # added to every norm weight (Gemma's 1 + w)
    in_pinned: bool = True  # the llama.cpp the tests run (``llamacpp.WHEEL``, build b4965) knows the arch


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", per_layer="deci", permute_qk=True),
    "qwen2": GGUFArch("qwen2", q_is_hidden=True, biases=frozenset({"q_proj", "k_proj", "v_proj"}),
                      required_biases=frozenset({"q_proj", "k_proj", "v_proj"})),
    "qwen3": GGUFArch("qwen3", biases=frozenset(), in_pinned=False),
    "gemma3": GGUFArch("gemma3", biases=frozenset(), norms=dict(SANDWICH_NORMS), norm_shift=1.0),
    "phi3": GGUFArch("phi3", fused=True, q_is_hidden=True, biases=frozenset()),
}


def arch_of(cfg: ModelConfig) -> GGUFArch:
    """The GGUFArch of ``cfg``'s family (``Family.gguf_arch``)."""
    name = cfg.family.gguf_arch
    if name not in ARCHS:
        raise UserError(f"GGUF export: model_type {cfg.model_type!r} has no llama.cpp architecture yet "
                        f"({', '.join(sorted(ARCHS))})")
    return ARCHS[name]


def describe_layout(cfg: ModelConfig) -> str:
    """'heads 6-9, KV heads 2-3, MLP 768-1536': the range of each per-layer width."""
    def span(f):
        vals = [f(i) for i in range(cfg.num_layers)]
        return f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}"
    return f"heads {span(cfg.heads)}, KV heads {span(cfg.kv_heads)}, MLP {span(cfg.mlp_width)}"


def gemma3_layer_types(num_layers: int) -> tuple[str, ...]:
    """llama.cpp's fixed Gemma 3 pattern: layer i slides unless i % 6 == 5."""
    return tuple("sliding_attention" if i % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1 else "full_attention"
                 for i in range(num_layers))


def check(cfg: ModelConfig, arch: GGUFArch) -> None:
    """One-line UserError for what ``arch`` in llama.cpp cannot reproduce of ``cfg`` (the layout's widths are
    checked by ``layout``)."""
    where = f"GGUF export ({cfg.model_type} -> llama.cpp {arch.name})"
    alt = f"export {field_ref('format')} hf instead"
    rtype = cfg.rope_type
    allowed = ("default", "linear", "longrope") if arch.name == "phi3" else ("default", "linear")
    if rtype not in allowed:
        raise UserError(f"{where}: rope_type {rtype!r} is not supported ({', '.join(allowed)}); {alt}")
    if cfg.partial_rotary_factor != 1.0 and arch.name != "phi3":
        raise UserError(f"{where}: partial_rotary_factor {cfg.partial_rotary_factor} is not supported "
                        f"(llama.cpp's {arch.name} rotates every head dim); {alt}")
    if (cfg.hidden_act != "silu") != (arch.name == "gemma3"):
        raise UserError(f"{where}: hidden_act {cfg.hidden_act!r} is not what llama.cpp's {arch.name} computes; {alt}")
    gemma_like = (cfg.norm_one_plus, cfg.sandwich_norms, cfg.scale_embeddings)
    if arch.name == "gemma3":
        if not all(gemma_like) or not cfg.qk_norm:
            raise UserError(f"{where}: a gemma3 needs (1 + w) norms, sandwich norms, scaled embeddings and q/k norms")
        if cfg.final_logit_softcapping is not None:
            raise UserError(f"{where}: final_logit_softcapping is not applied by llama.cpp's gemma3; {alt}")
        sliding = tuple(cfg.window(i) is not None for i in range(cfg.num_layers))
        if sliding != tuple(t == "sliding_attention" for t in gemma3_layer_types(cfg.num_layers)):
            raise UserError(f"{where}: llama.cpp fixes Gemma 3's layers to 5 sliding then 1 global "
                            f"(layer i global when i % 6 == 5); this model's layer_types differ; {alt}")
        if any(sliding) and cfg.rope_local_base_freq != GEMMA3_LOCAL_BASE:
            raise UserError(f"{where}: llama.cpp fixes the sliding layers' RoPE base to 10000 (this model: "
                            f"{cfg.rope_local_base_freq}); {alt}")
    elif any(gemma_like) or cfg.final_logit_softcapping is not None:
        raise UserError(f"{where}: Gemma's norms / embedding scale / soft-capping are not in llama.cpp's {arch.name}")
    if cfg.qk_norm != (arch.name in ("qwen3", "gemma3")):
        raise UserError(f"{where}: q/k norms {'present' if cfg.qk_norm else 'absent'} do not fit llama.cpp's "
                        f"{arch.name}; {alt}")
    if cfg.query_pre_attn_scalar is not None and arch.name != "gemma3" and cfg.query_pre_attn_scalar != cfg.head_dim:
        raise UserError(f"{where}: query_pre_attn_scalar {cfg.query_pre_attn_scalar} != head_dim is not supported")
    if cfg.sliding_window is not None and arch.name in ("qwen2", "qwen3"):
        raise UserError(f"{where}: a sliding window is not supported in llama.cpp's {arch.name}; {alt}")
    for i in range(cfg.num_layers):
        if (not cfg.heads(i) or not cfg.mlp_width(i)) and arch.per_layer is None:
            raise UserError(f"{where}: layer {i} has no attention heads or no MLP channels; llama.cpp's "
                            f"{arch.name} needs both in every layer; {alt}")


def layout(cfg: ModelConfig, arch: GGUFArch, pad: bool) -> tuple[ModelConfig, str]:
    """(the widths written, the arch name): ``cfg`` itself, the widest layer's when ``pad`` or when the arch has
    no per-layer form (refused without ``pad``), query heads zero-padded to hidden_size / head_dim where llama.cpp
    sizes q from hidden_size (``GGUFArch.q_is_hidden``)."""
    name = arch.name
    if not cfg.is_uniform:
        if pad:
            cfg = cfg.padded()
        elif arch.per_layer is None:
            raise UserError(f"GGUF export: llama.cpp's {arch.name} arch has one width for every layer and this "
                            f"model's layers differ ({describe_layout(cfg)}); pass {field_ref('pad')} (zero-padded "
                            f"to the widest layer, same logits) or export {field_ref('format')} hf {field_ref('pad')}")
        else:
            name = arch.per_layer
    if arch.q_is_hidden and cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        H, kv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        H2 = cfg.hidden_size // D
        if cfg.hidden_size % D or H2 < H or H2 % kv:
            raise UserError(f"GGUF export: llama.cpp's {arch.name} needs query heads x head_dim = hidden_size "
                            f"({cfg.hidden_size}); {H} heads of {D} over {kv} KV heads cannot be padded to it; "
                            f"export {field_ref('format')} hf instead")
        cfg = cfg.replace(num_heads=H2)
    return cfg, name


def attention_scale_fix(cfg: ModelConfig, arch: GGUFArch) -> float:
    """The factor folded into Gemma 3's q norm so that llama.cpp's fixed attention scale gives jaxprune's
    1/sqrt(query_pre_attn_scalar): llama.cpp takes 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for a 62-layer
    model (its "27B"); 1 when they agree (every released Gemma 3)."""
    if arch.name != "gemma3":
        return 1.0
    theirs = cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim
    ours = cfg.query_pre_attn_scalar or cfg.head_dim
    return math.sqrt(theirs / ours)


def context_note(cfg: ModelConfig, arch: GGUFArch) -> tuple[int, str | None]:
    """(context_length to write, a note): a sliding window in every layer (Mistral, Phi-3) has no form in
    llama.cpp's llama arch, and its phi3 arch ignores it (disabled upstream since PR 13676), both attending to
    every earlier token: the file's context_length is cut to the window, within which the logits agree."""
    ctx = cfg.max_position_embeddings
    if arch.name in ("llama", "phi3") and cfg.sliding_window is not None and cfg.sliding_window < ctx:
        return cfg.sliding_window, (f"llama.cpp's {arch.name} arch attends past the sliding window: context_length "
                                    f"set to the window ({cfg.sliding_window}), within which the logits are the same")
    return ctx, None
