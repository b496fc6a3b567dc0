"""The LLaMA family in Flax NNX: RMSNorm, RoPE variants, GQA attention, SwiGLU MLP; the Mistral
(sliding window), Qwen2 (q/k/v bias), Qwen3 (q/k norm) and Gemma 3 (GeGLU, (1 + w) norms around both
blocks, scaled embeddings, sliding / global layers, logit soft-capping) deltas come from ``ModelConfig`` fields.

Module paths follow HF names (``layers.3.self_attn.q_proj``) so regexes over
paths (LoRA targets, sharding rules) read the same as over HF checkpoints.
Each layer may have its own head count and MLP width (pruned models).

On a device mesh (an active abstract mesh: ``meshes.activation_mesh``, which the train step enters when it is
given the run's shardings) the activations between layers and the logits are split over the batch axes
(``meshes.constrain_batch``); without one nothing changes.

Structured masks act on activations:

* ``self_attn.head_mask`` [num_heads]: each query head's output before ``o_proj``
* ``mlp.channel_mask`` [intermediate]: ``act(gate) * up`` before ``down_proj``
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .config import ModelConfig
from .layers import Linear, Mask, RMSNorm, with_axes
from .meshes import constrain_batch
from .ops.order import after
from .rope import apply_rope, layer_rope_tables, rope_kind

#: The decoder layer's linears as (block, name), in order, with their (in, out) logical axes: the one
#: place the rest of the library (pruning, pretraining, shrink, LoRA targets) reads them from.
LINEAR_AXES: dict[tuple[str, str], tuple[str, str]] = {
    ("self_attn", "q_proj"): ("embed", "heads"), ("self_attn", "k_proj"): ("embed", "kv_heads"),
    ("self_attn", "v_proj"): ("embed", "kv_heads"), ("self_attn", "o_proj"): ("heads", "embed"),
    ("mlp", "gate_proj"): ("embed", "mlp"), ("mlp", "up_proj"): ("embed", "mlp"),
    ("mlp", "down_proj"): ("mlp", "embed"),
}
DECODER_LINEARS: tuple[tuple[str, str], ...] = tuple(LINEAR_AXES)
ATTN_LINEARS: tuple[str, ...] = tuple(name for block, name in DECODER_LINEARS if block == "self_attn")
MLP_LINEARS: tuple[str, ...] = tuple(name for block, name in DECODER_LINEARS if block == "mlp")
LM_HEAD_AXES = ("embed", "vocab")


def decoder_linear(layer: "DecoderLayer", block: str, name: str) -> Linear:
    """``layer.<block>.<name>``, e.g. ``decoder_linear(layer, "mlp", "up_proj")``."""
    return getattr(getattr(layer, block), name)


class KVCache(NamedTuple):
    """One layer's cache: k, v [B, max_len, kv_heads, head_dim]."""
    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.heads(layer), cfg.kv_heads(layer), cfg.head_dim
        h, q, kv = cfg.hidden_size, self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        for name in ATTN_LINEARS:
            bias = cfg.o_bias if name == "o_proj" else cfg.attention_bias
            setattr(self, name, Linear(*sizes[name], axes=LINEAR_AXES["self_attn", name], use_bias=bias, dtype=dtype,
                                       rngs=rngs))
        self.head_mask = with_axes(Mask, jnp.ones((self.num_heads,), jnp.bool_), ("unit_mask",))
        # Qwen3, Gemma 3: per-head RMSNorm of q and k (one weight over head_dim, shared by the heads)
        qk = cfg.qk_norm and self.num_heads
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, one_plus=cfg.norm_one_plus) if qk else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, one_plus=cfg.norm_one_plus) if qk else None
        self.sliding_window = cfg.window(layer)
        self.scalar = float(cfg.query_pre_attn_scalar or cfg.head_dim)  # scores / sqrt(scalar)

    def __call__(self, x, cos, sin, cache: KVCache | None = None, cache_index=None):
        """x [B, S, hidden] -> ([B, S, hidden], new cache or None)."""
        B, S, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        if H == 0:  # a fully pruned attention block contributes only o_proj's bias
            out = jnp.zeros(x.shape, x.dtype)
            return (out + self.o_proj.bias[...] if self.o_proj.bias is not None else out), cache
        q, k = self.q_proj(x).reshape(B, S, H, D), self.k_proj(x).reshape(B, S, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).reshape(B, S, KV, D)
        q_pos = jnp.arange(S)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, cache_index, 0, 0))
            cache = KVCache(k, v)
            q_pos = q_pos + cache_index
        # jax.nn.dot_product_attention: logits in fp32, softmax in fp32, GQA without repeating k/v; cuDNN's
        # fused kernel where the backend has one (GPU), XLA elsewhere. Same maths as HF's eager attention.
        scale = 1.0 / math.sqrt(self.scalar)
        window = None if self.sliding_window is None else (self.sliding_window - 1, 0)  # W - 1 keys back
        if cache is None:
            masking = {"is_causal": True, "local_window_size": window}
        else:  # decoding: the queries sit at cache_index.., so the causal mask is explicit
            t = jnp.arange(k.shape[1])[None, :]
            visible = q_pos[:, None] >= t
            if window is not None:
                visible = visible & (q_pos[:, None] - t <= window[0])
            masking = {"mask": visible[None, None]}
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, **masking)
        out = out * self.head_mask[...].astype(out.dtype)[:, None]
        return self.o_proj(out.reshape(B, S, H * D)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        h, m, b = cfg.hidden_size, cfg.mlp_width(layer), cfg.mlp_bias
        sizes = {"gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
        for name in MLP_LINEARS:
            setattr(self, name, Linear(*sizes[name], axes=LINEAR_AXES["mlp", name], use_bias=b, dtype=dtype,
                                       rngs=rngs))
        self.channel_mask = with_axes(Mask, jnp.ones((m,), jnp.bool_), ("unit_mask",))
        self.hidden_act = cfg.hidden_act

    def __call__(self, x):
        """x [B, S, hidden] -> [B, S, hidden]: ``down((act(gate x) * up x) ⊙ mask)``; act = silu (SwiGLU) or
        gelu_pytorch_tanh = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) (Gemma's GeGLU)."""
        g = self.gate_proj(x)
        h = (jax.nn.silu(g) if self.hidden_act == "silu" else jax.nn.gelu(g, approximate=True)) * self.up_proj(x)
        return self.down_proj(h * self.channel_mask[...].astype(h.dtype))


class DecoderLayer(nnx.Module):
    """LLaMA: ``x += attn(n1(x)); x += mlp(n2(x))``; with ``sandwich_norms`` (Gemma) the blocks' outputs are
    normed too: ``x += n2(attn(n1(x))); x += n4(mlp(n3(x)))`` (n2 = post_attention_layernorm in both)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, one_plus=cfg.norm_one_plus)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm() if cfg.sandwich_norms else None
        self.post_feedforward_layernorm = norm() if cfg.sandwich_norms else None
        self.mlp = MLP(cfg, layer, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, cache=None, cache_index=None):
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_index)
        if self.pre_feedforward_layernorm is None:
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x)), cache
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), cache


class LlamaForCausalLM(nnx.Module):
    """Token ids [B, S] -> logits [B, S, vocab] (fp32)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.embed_tokens = with_axes(nnx.Param, 0.02 * jax.random.normal(rngs.params(),
                                                                            (cfg.vocab_size, cfg.hidden_size), dtype),
                                      ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, one_plus=cfg.norm_one_plus)
        self.lm_head = nnx.data(None if cfg.tie_word_embeddings
                                else Linear(cfg.hidden_size, cfg.vocab_size, axes=LM_HEAD_AXES, dtype=dtype, rngs=rngs))
        # Rematerialise each decoder layer in the backward pass (jax.checkpoint): activation memory
        # drops from O(layers × activations) to O(layers × hidden states) for ~1.3x the compute.
        self.remat = False

    @property
    def dtype(self):
        return self.embed_tokens[...].dtype

    def embed(self, tokens):
        """tokens [B, S] -> [B, S, hidden]; Gemma: × sqrt(hidden) cast to the weights' dtype (as HF's
        Gemma3TextScaledWordEmbedding: ``embed_scale.to(weight.dtype)``)."""
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        if self.config.scale_embeddings:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, jnp.float32).astype(x.dtype)
        return x

    def hidden_states(self, tokens, positions=None, caches=None, cache_index=None):
        """tokens [B, S] -> final-norm hidden states [B, S, hidden], new caches."""
        B, S = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S), (B, S))
            if cache_index is not None:
                positions = positions + cache_index
        seq_len = S if caches is None else caches[0].k.shape[1]
        tables = layer_rope_tables(self.config, positions, seq_len)
        x = constrain_batch(self.embed(tokens))
        new_caches = []
        for i, layer in enumerate(self.layers):
            cos, sin = tables[rope_kind(self.config, i)]
            if self.remat and caches is None:
                x, c = _remat_layer(layer, x, cos, sin), None
            else:
                x, c = layer(x, cos, sin, None if caches is None else caches[i], cache_index)
            x = constrain_batch(x)
            new_caches.append(c)
        return self.norm(x), (new_caches if caches is not None else None)

    def logits(self, h):
        """h [B, S, hidden] -> fp32 logits [B, S, vocab]; ``final_logit_softcapping`` c: c·tanh(logits / c)."""
        if self.lm_head is None:
            out = constrain_batch(h @ self.embed_tokens[...].T).astype(jnp.float32)
        else:
            out = constrain_batch(self.lm_head(h)).astype(jnp.float32)
        c = self.config.final_logit_softcapping
        return constrain_batch(out if c is None else jnp.tanh(out / c) * c)

    def __call__(self, tokens, positions=None, caches=None, cache_index=None):
        h, new_caches = self.hidden_states(tokens, positions, caches, cache_index)
        logits = self.logits(h)
        return logits if caches is None else (logits, new_caches)

    def init_caches(self, batch: int, max_len: int) -> list[KVCache]:
        return [KVCache(jnp.zeros((batch, max_len, l.self_attn.num_kv_heads, self.config.head_dim), self.dtype),
                        jnp.zeros((batch, max_len, l.self_attn.num_kv_heads, self.config.head_dim), self.dtype))
                for l in self.layers]


def _remat_layer(layer: DecoderLayer, x, cos, sin):
    """``layer(x)`` rematerialised: the forward keeps only the layer's input (and its weights, alive anyway);
    the backward runs the layer again from that input and differentiates it there.

    Not ``jax.checkpoint``: XLA:CPU drops the optimisation barrier that keeps the recomputation apart from
    the forward pass, CSE then merges the two, and every layer's activations stay alive until the backward
    pass (remat in name only). Here the recomputation's input depends on the incoming cotangent
    (``ops.order.after``), so it cannot run before the backward pass reaches this layer, on any backend.
    Cotangents of integer / bool leaves (int8 kernels, masks) are float0, of unused ones dead code.
    """
    graphdef, state = nnx.split(layer)

    def apply(state, x, cos, sin):
        return nnx.merge(graphdef, state)(x, cos, sin)[0]

    @jax.custom_vjp
    def run(state, x, cos, sin):
        return apply(state, x, cos, sin)

    def run_fwd(state, x, cos, sin):
        return apply(state, x, cos, sin), (state, x, cos, sin)

    def run_bwd(res, g):
        state, x, cos, sin = res
        _, vjp = jax.vjp(lambda st, h: apply(st, h, cos, sin), state, after(x, g))
        return (*vjp(g), jnp.zeros_like(cos), jnp.zeros_like(sin))

    run.defvjp(run_fwd, run_bwd)
    return run(state, x, cos, sin)


def causal_lm_loss(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token NLL: logits [B, S, V], tokens [B, S] -> (mean nll, number of predicted tokens)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
    return nll.mean(), jnp.asarray(nll.size, jnp.float32)


def summed_nll(model: LlamaForCausalLM, tokens: jax.Array) -> jax.Array:
    """Sum of next-token NLL over a batch of windows [B, S] (for perplexity)."""
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).sum()


def count_params(model: nnx.Module, variable_type=nnx.Param) -> int:
    """Number of scalars in the model's variables of ``variable_type``."""
    state = nnx.state(model, variable_type)
    return int(sum(x.size for x in jax.tree.leaves(state)))
