"""Greedy / temperature sampling with a KV cache (prefill once, then one jitted step per token)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import UserError


def generate(model, prompt_ids: np.ndarray, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, eos_token_id: int | list[int] | None = None) -> np.ndarray:
    """prompt_ids [S] -> generated ids [<= max_new_tokens] (stops after EOS). temperature 0 = greedy.

    An empty prompt is a UserError (there is no last position to predict from)."""
    if np.size(prompt_ids) == 0:
        raise UserError("tokenizes to no tokens; generation continues a prompt of at least one token",
                        field="prompt")
    if max_new_tokens <= 0:
        return np.zeros(0, np.int32)
    prompt = jnp.asarray(prompt_ids, jnp.int32)[None]
    S = prompt.shape[1]
    max_len = S + max_new_tokens
    graphdef, state = nnx.split(model)
    caches = model.init_caches(1, max_len)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))

    def pick(logits, key):
        if temperature <= 0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    @jax.jit
    def prefill(state, tokens, caches, key):
        logits, caches = nnx.merge(graphdef, state)(tokens, caches=caches, cache_index=0)
        return pick(logits[:, -1], key), caches

    @jax.jit
    def step(state, token, caches, index, key):
        logits, caches = nnx.merge(graphdef, state)(token[:, None], caches=caches, cache_index=index)
        return pick(logits[:, -1], key), caches

    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    token, caches = prefill(state, prompt, caches, sub)
    out = [int(token[0])]
    for i in range(1, max_new_tokens):
        if out[-1] in eos:
            break
        key, sub = jax.random.split(key)
        token, caches = step(state, token, caches, jnp.int32(S + i - 1), sub)
        out.append(int(token[0]))
    return np.asarray(out, np.int32)
