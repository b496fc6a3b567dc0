"""Depth pruning: whole decoder layers go (``registry.DEPTH``; the run is ``prune/depth_pipeline.py``).

Both methods read the residual stream on the calibration tokens as transformers' ``output_hidden_states``
reports it: ``h_0`` the embeddings, ``h_{i+1}`` the output of layer i (0-based), the last one, ``h_L``,
**after the final norm** (as HF returns it and both original codes read it).

**ShortGPT** (Men et al., arXiv 2403.03853; icip-cas/ShortGPT ``shortgpt/metrics.py`` ``block_influence``,
``shortgpt/shortgpt.py`` ``compute_bi`` / ``remove_layers``)::

    BI_i = 1 − mean_t cos(h_i[t], h_{i+1}[t])        over every calibration token t (a zero vector's NaN
                                                     cosine counts as 0.5, ``nan_to_num(nan=0.5)``)
    remove the n layers of lowest BI                 (``np.argsort(importances)[:n]``: not necessarily contiguous)

The code sums BI over tokens, we average: the same ranking.

**ReplaceMe** (Shopkhoev et al., arXiv 2505.02819; mts-ai/ReplaceMe ``ReplaceMe/distance.py`` +
``utils.compute_block_distances`` / ``angular_distance``, ``ReplaceMe/lstsq.py``, ``utils.truncate_model``),
with ``hs = hidden_states[1:]`` (``hs[l]`` = output of layer l) as there::

    d_l = mean over sequences of arccos(cos(hs[l][last], hs[l+n][last])) / π,   l = 0 … L−n−1
          (distance.py takes each sequence's last non-padded token only; ``distance_tokens="all"``: every token)
    l* = argmin d_l;  the run removed is layers l*+1 … l*+n (0-based: ``truncate_model(start=l*+1, end=l*+n+1)``)
    T  = (M_{l*}ᵀ M_{l*} + α I)⁻¹ M_{l*}ᵀ (hs[l*+n] + M_{l*} − hs[l*])      (float64 sums; α = ``ridge``)
    layer l*'s down_proj: kernel [m, hidden] ← kernel @ T,  bias ← bias @ T

``M_{l*}`` is the MLP output of layer l* (the layer *before* the run: the code's ``i + 1 in start_ids``, its
start being 1-based there), so layer 0 is never removed; in the issue's words i = l* and the run is the n
blocks after it. Where we differ from the code: the least-squares target uses the pre-norm output of the last
removed layer (the code's ``hs[L−1]`` is after the final norm, which the pruned model then applies a second
time); T is solved with ``lstsq`` on the normal equations (= its ``inv`` when they are regular, the
minimum-norm solution when the calibration tokens are fewer than ``hidden``); one run (``num_A = 1``), no
``diag`` variant. Families with sandwich norms (Gemma 3) are refused: their MLP output is normed before the
residual, so T folded into ``down_proj`` is not the fitted map.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from ..partition import combine
from .registry import DEPTH, DepthCriterion, ScoreInputs, option


class _Tap:
    """Wraps a module inside a traced forward: ``sink[key] = (input, output)``."""

    def __init__(self, inner, sink: dict, key):
        self.inner, self.sink, self.key = inner, sink, key

    def __call__(self, x):
        y = self.inner(x)
        self.sink[self.key] = (x, y)
        return y


def _trace(graphdef, frozen, trainable, masks, tokens, mlp_layers=()):
    """(HF's hidden states [h_0 … h_L] (h_L after the final norm), pre-norm h_L, {i: MLP output of layer i}),
    each [B, S, hidden] f32. The layer inputs are read at each ``input_layernorm``, h_L at the final norm."""
    model = combine(graphdef, frozen, trainable, masks)
    model.remat = False
    sink: dict = {}
    for i, layer in enumerate(model.layers):
        layer.input_layernorm = _Tap(layer.input_layernorm, sink, ("in", i))
        if i in mlp_layers:
            layer.mlp = _Tap(layer.mlp, sink, ("mlp", i))
    model.norm = _Tap(model.norm, sink, "final")
    model.hidden_states(tokens)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    raw, normed = sink["final"]
    states = [f32(sink["in", i][0]) for i in range(len(model.layers))] + [f32(normed)]
    return states, f32(raw), {i: f32(sink["mlp", i][1]) for i in mlp_layers}


def _cosine(a, b):
    """cos over the last axis; NaN (a zero vector) stays NaN."""
    return (a * b).sum(-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


@partial(jax.jit, static_argnums=(0,))
def _cosine_sums(graphdef, frozen, trainable, masks, tokens):
    """[L]: Σ_t cos(h_i[t], h_{i+1}[t]) over the batch's tokens, NaN counted as 0.5 (block_influence)."""
    h, _, _ = _trace(graphdef, frozen, trainable, masks, tokens)
    cos = [jnp.nan_to_num(_cosine(h[i], h[i + 1]), nan=0.5).sum() for i in range(len(h) - 1)]
    return jnp.stack(cos)


@partial(jax.jit, static_argnums=(0, 5))
def _states(graphdef, frozen, trainable, masks, tokens, last: bool):
    """[L+1, B, S or 1, hidden]: HF's hidden states of the batch (``last``: at its last position only)."""
    h = jnp.stack(_trace(graphdef, frozen, trainable, masks, tokens)[0])
    return h[:, :, -1:] if last else h


@partial(jax.jit, static_argnums=(0, 5, 6))
def _fit_pair(graphdef, frozen, trainable, masks, tokens, i: int, n: int):
    """(M_i, hs[i+n] + M_i − hs[i]) [B·S, hidden]; hs[i+n] before the final norm when it is the last layer."""
    h, raw, mlp = _trace(graphdef, frozen, trainable, masks, tokens, (i,))
    end = raw if i + n + 1 == len(h) - 1 else h[i + n + 1]
    d = h[0].shape[-1]
    return mlp[i].reshape(-1, d), (end + mlp[i] - h[i + 1]).reshape(-1, d)


def _chunks(x: ScoreInputs):
    if x.calib is None:
        raise UserError("depth pruning needs calibration samples")
    calib = np.asarray(x.calib)
    step = x.calib_batch or len(calib)
    return [jnp.asarray(calib[i:i + step]) for i in range(0, len(calib), step)]


def _args(x: ScoreInputs):
    return x.graphdef, x.frozen, x.trainable, x.masks


# ---- ShortGPT ------------------------------------------------------------------------------------
def block_influence(x: ScoreInputs) -> np.ndarray:
    """BI [L] (module docstring), memoised in ``x.cache``."""
    if "bi" not in x.cache:
        chunks = _chunks(x)
        sums = sum(np.asarray(_cosine_sums(*_args(x), c), np.float64) for c in chunks)
        x.cache["bi"] = 1.0 - sums / sum(c.size for c in chunks)
    return x.cache["bi"]


def shortgpt_select(x: ScoreInputs, n: int) -> list[int]:
    """The ``n`` layers of lowest block influence."""
    bi = block_influence(x)
    x.cache["summary"] = {"block_influence": [float(v) for v in bi]}
    return sorted(int(i) for i in np.argsort(bi, kind="stable")[:n])


# ---- ReplaceMe -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplaceMeOptions:
    ridge: float = option(0.0, "replaceme: ridge α of the least-squares fit, T = (MᵀM + αI)⁻¹ Mᵀ Y (lstsq.py's "
                               "alpha)", lo=0.0)
    distance_tokens: str = option("last", "replaceme: tokens the block distance averages over: each calibration "
                                          "sequence's 'last' (distance.py) or 'all'", choices=("last", "all"))


def block_distances(x: ScoreInputs, n: int) -> np.ndarray:
    """d [L − n]: d_l = mean angular distance of hs[l] and hs[l+n] (module docstring)."""
    last = (x.options or ReplaceMeOptions()).distance_tokens == "last"
    per_seq = []
    for c in _chunks(x):
        hs = np.asarray(_states(*_args(x), c, last), np.float64)[1:]  # [L, B, S or 1, hidden]
        a, b = hs[:-n], hs[n:]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        per_seq.append((np.arccos(np.clip(cos, -1, 1)) / np.pi).reshape(len(a), -1))
    return np.concatenate(per_seq, axis=1).mean(axis=1)


def replaceme_select(x: ScoreInputs, n: int) -> list[int]:
    """Layers l*+1 … l*+n after the layer l* of least boundary distance."""
    if x.cfg.sandwich_norms:
        raise UserError(f"replaceme folds a linear map into down_proj, which model_type {x.cfg.model_type!r} "
                        "norms before the residual (sandwich norms): use shortgpt")
    if n > x.cfg.num_layers - 1:
        raise UserError(f"replaceme keeps layer 0 (the fit is on its MLP): at most {x.cfg.num_layers - 1} of "
                        f"{x.cfg.num_layers} layers go, not {n}")
    d = block_distances(x, n)
    start = int(np.argmin(d))
    x.cache["summary"] = {"block_distances": [float(v) for v in d], "fit_layer": start}
    return list(range(start + 1, start + n + 1))


def replaceme_fit(x: ScoreInputs, i: int, n: int) -> np.ndarray:
    """T [hidden, hidden]: the (ridge) least-squares map of layer i's MLP output onto the target, float64 sums."""
    ridge = (x.options or ReplaceMeOptions()).ridge
    d = x.cfg.hidden_size
    a1ta1, a1ta2 = np.zeros((d, d)), np.zeros((d, d))
    for c in _chunks(x):
        a1, a2 = (np.asarray(v, np.float64) for v in _fit_pair(*_args(x), c, i, n))
        a1ta1 += a1.T @ a1
        a1ta2 += a1.T @ a2
    return np.linalg.lstsq(a1ta1 + ridge * np.eye(d), a1ta2, rcond=None)[0]


def replaceme_transform(x: ScoreInputs, removed: list[int]) -> dict[tuple, np.ndarray]:
    """{path: new array} of layer ``removed[0] − 1``'s down_proj (kernel @ T, bias @ T), original indices."""
    i, n = removed[0] - 1, len(removed)
    if removed != list(range(i + 1, i + n + 1)) or i < 0:
        raise UserError(f"replaceme removes one contiguous run after layer 0, not layers {removed}")
    t = replaceme_fit(x, i, n)
    x.cache["transform"] = t
    down = x.frozen_arrays()["layers"][i]["mlp"]["down_proj"]
    out = {("layers", i, "mlp", "down_proj", "kernel"): np.asarray(down["kernel"], np.float64) @ t}
    if "bias" in down:
        out[("layers", i, "mlp", "down_proj", "bias")] = np.asarray(down["bias"], np.float64) @ t
    return out


SHORTGPT = "shortgpt"

DEPTH.register(DepthCriterion(
    SHORTGPT, "remove the layers whose output is most like their input (lowest block influence, 1 - cos)",
    shortgpt_select, citation="Men et al. 2024, ShortGPT, arXiv 2403.03853; github.com/icip-cas/ShortGPT"))
DEPTH.register(DepthCriterion(
    "replaceme", "remove the contiguous run of layers of least angular distance, replaced by a least-squares "
                 "linear map folded into the previous layer's down_proj",
    replaceme_select, transform=replaceme_transform, options=ReplaceMeOptions,
    citation="Shopkhoev et al. 2025, ReplaceMe, arXiv 2505.02819; github.com/mts-ai/ReplaceMe"))
