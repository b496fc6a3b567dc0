"""Post-training element-wise pruning: magnitude, Wanda, SparseGPT; unstructured or N:M; the sequential
calibration pipeline that runs them layer by layer.

Every linear (q, k, v, o, gate, up, down; never ``lm_head`` / embeddings) of every decoder layer not
in ``--exclude-layers`` (default for these methods: none excluded, as in the papers) gets a boolean
``weight_mask`` (:class:`jaxprune.layers.Mask`, so it lands in the ``masks`` pytree of
``partition(model)``) and its kernel is zeroed where the mask is 0, so the model computes
``x @ ((W + s·A@B) ⊙ M)`` and stays sparse through LoRA recovery and merging. An excluded layer
keeps every weight and gets an all-ones mask.

Layout, patterns and tie rules: ``select.py``.

* **magnitude**: score ``|W_ij|`` compared over the whole layer (``select.magnitude_mask``).
* **Wanda**: ``wanda.py``.  **SparseGPT**: ``sparsegpt.py``.

Sequential calibration (the papers' protocol): calibration sequences go through the embedding;
then, per decoder layer, one jitted pass of the layer on the current hidden states collects the
statistics of every linear's input (q/k/v: input-norm output; o: attention output before
``o_proj``; gate/up: post-attention-norm output; down: ``act(gate)·up``) — ``Σ_t x_t²``
(Wanda) or ``Σ_t x_t x_tᵀ`` (SparseGPT), accumulated over chunks in float64 — the layer's
seven linears are pruned, and the layer is run again (jitted) with the pruned weights to give
the next layer its input. Magnitude needs no calibration.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ..data import Blocks, token_stream
from ..errors import UserError
from ..layers import Linear
from ..model import DECODER_LINEARS, decoder_linear
from ..rope import layer_rope_tables, rope_kind
from ..weights import linears
from .groups import prunable_layers
from .registry import ELEMENTWISE
from .select import Block, pattern_name
from .sparsegpt import block_counts, hessian_factor, sparsegpt, sparsegpt_core

#: (module, attribute) of the seven pruned linears of a decoder layer (``model.DECODER_LINEARS``)
LINEARS = DECODER_LINEARS
#: which input statistic each linear reads, and the linear whose input is tapped for it
INPUT_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
            "up_proj": "gate_up", "down_proj": "down"}
TAPS = {"qkv": ("self_attn", "q_proj"), "o": ("self_attn", "o_proj"), "gate_up": ("mlp", "gate_proj"),
        "down": ("mlp", "down_proj")}


class _Tap:
    """Wraps a Linear inside a traced forward and records its input."""

    def __init__(self, inner, sink: dict, key: str):
        self.inner, self.sink, self.key = inner, sink, key

    def __call__(self, x):
        self.sink[self.key] = x
        return self.inner(x)


def _stat(x: jax.Array, kind: str) -> jax.Array:
    """An input's statistic over tokens: ``"xtx"`` Σ_t x_t x_tᵀ [in, in], ``"sq"`` Σ_t x_t² [in]."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return x.T @ x if kind == "xtx" else jnp.sum(x * x, axis=0)


@partial(jax.jit, static_argnums=(0, 5, 6))
def _capture(graphdef, state, h, cos, sin, kind: str, keys: tuple = tuple(TAPS)) -> dict:
    """One decoder layer on hidden states h [B, S, hidden] -> input statistics of its linears (those of ``keys``)."""
    layer = nnx.merge(graphdef, state)
    sink: dict = {}
    for key in keys:
        mod, attr = TAPS[key]
        parent = getattr(layer, mod)
        setattr(parent, attr, _Tap(getattr(parent, attr), sink, key))
    layer(h, cos, sin)
    return {k: _stat(x, kind) for k, x in sink.items()}


@partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, h, cos, sin):
    return nnx.merge(graphdef, state)(h, cos, sin)[0]


def rope_tables(model):
    """``rope_of(layer)(B, S) -> (cos, sin)``: each layer's rotary tables for positions 0..S−1 (Gemma's sliding
    layers have their own), computed once per shape."""
    tables = {}

    def rope_of(li):
        def rope(b, s):
            if (b, s) not in tables:
                pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
                tables[(b, s)] = jax.jit(lambda p: layer_rope_tables(model.config, p, s))(pos)
            return tables[(b, s)][rope_kind(model.config, li)]
        return rope
    return rope_of


def capture_input_stats(layer, chunks, rope, key: str, kind: str) -> np.ndarray:
    """The ``kind`` statistic (:func:`_stat`) of the input of ``TAPS[key]`` in ``layer`` over hidden-state
    ``chunks`` [B, S, hidden] each, summed in float64 (``"xtx"``: [in, in])."""
    graphdef, state = nnx.split(layer)
    return sum(np.asarray(_capture(graphdef, state, h, *rope(*h.shape[:2]), kind, (key,))[key], np.float64)
               for h in chunks)


def forward_layer(layer, chunks, rope) -> list:
    """``layer`` applied to each hidden-state chunk [B, S, hidden] (jitted): the next layer's inputs."""
    graphdef, state = nnx.split(layer)
    return [_forward(graphdef, state, h, *rope(*h.shape[:2])) for h in chunks]


def _compiled_bytes(fn, *args, **kwargs) -> int:
    """Peak memory XLA reports for ``fn(*args)`` compiled (arguments + outputs + temporaries)."""
    try:
        m = fn.lower(*args, **kwargs).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # memory_analysis is optional on some backends
        return 0


@partial(jax.jit, static_argnames=("dtype",))
def _apply_keep(kernel, keep, dtype):
    return jnp.where(keep, kernel.astype(dtype), jnp.zeros((), dtype))


def _kernel_f32(lin: Linear) -> jax.Array:
    """``W ⊙ M`` (no LoRA: merged before pruning) in fp32."""
    mask = lin.weight_mask[...] if lin.weight_mask is not None else np.ones(lin.kernel[...].shape, bool)
    return _apply_keep(lin.kernel[...], mask, jnp.dtype(jnp.float32))


def set_weight_mask(lin: Linear, kernel: jax.Array, keep: jax.Array) -> None:
    """Install ``keep`` as the linear's ``weight_mask`` and ``kernel ⊙ keep`` as its kernel."""
    keep = jnp.asarray(keep, jnp.bool_)
    lin.kernel.set_value(_apply_keep(jnp.asarray(kernel), keep, jnp.dtype(lin.kernel[...].dtype)))
    lin.set_weight_mask(keep)


def _prune_layer(layer, li: int, chunks, rope, *, method: str, sparsity: float, nm, blocksize: int, percdamp: float,
                 warn, n_tokens: int, report: dict, measure: bool) -> tuple[dict, int]:
    """Prune the seven linears of one decoder layer in place, calibrated on ``chunks`` (its input hidden
    states; None for magnitude). Returns ({linear: sparsity}, peak compiled bytes of its passes if ``measure``)."""
    peak = 0
    stats = {}
    m = ELEMENTWISE.get(method)
    if chunks is not None:
        graphdef, state = nnx.split(layer)
        for h in chunks:
            cos, sin = rope(*h.shape[:2])
            if measure and not stats:
                peak = max(peak, _compiled_bytes(_capture, graphdef, state, h, cos, sin, m.statistic))
            for k, v in _capture(graphdef, state, h, cos, sin, m.statistic).items():
                v = np.asarray(v, np.float64)
                stats[k] = stats[k] + v if k in stats else v
    row, factors = {}, {}
    for mod, attr in LINEARS:
        lin = decoder_linear(layer, mod, attr)
        w = _kernel_f32(lin)
        if w.size == 0:
            continue
        name = f"layers.{li}.{mod}.{attr}"
        if not m.compensates:  # a selection rule (magnitude, wanda, plugins): host numpy, no compiled pass
            keep = m.select(w, stats[INPUT_OF[attr]] if m.statistic else None, sparsity, nm)
            new_w = w
        else:
            key = INPUT_OF[attr]
            if key not in factors:  # one factorisation per input: q/k/v and gate/up share theirs
                factors[key] = hessian_factor(2.0 * stats[key] / n_tokens, percdamp=percdamp, name=name, warn=warn)
                report["damp_retries"] += factors[key].retries
            new_w, keep, _ = sparsegpt(w, sparsity=sparsity, nm=nm, blocksize=blocksize, factor=factors[key])
            if measure:
                counts = tuple(block_counts(w.shape[0], w.shape[1], blocksize, sparsity)) if nm is None else ()
                bs = blocksize if nm is None or blocksize % nm[1] == 0 else (blocksize // nm[1] + 1) * nm[1]
                peak = max(peak, _compiled_bytes(sparsegpt_core, w, factors[key].u, jnp.asarray(keep),
                                                 blocksize=bs, nm=nm, counts=counts, fixed=False))
        set_weight_mask(lin, new_w, keep)
        row[attr] = 1.0 - float(np.asarray(keep).mean())
    return row, peak


def prune_model(model, calib: np.ndarray | None, *, method: str, sparsity: float, nm=None, batch_size: int = 8,
                blocksize: int = 128, percdamp: float = 0.01, progress: bool = True, warn=None,
                measure_memory: bool = False, layers=None) -> dict:
    """Prune every decoder linear of ``model`` in place (sequentially, layer by layer). Returns a report.

    ``calib`` [n, S] int tokens (not needed for magnitude). LoRA factors, if any, must be merged first.
    ``layers``: indices of the decoder layers to prune (None: all). The others keep every weight (an
    all-ones ``weight_mask`` unless they have one already) and still run, unpruned, in the sequential
    calibration, so a later layer is calibrated on what the final model feeds it.
    """
    m = ELEMENTWISE.get(method)
    if isinstance(nm, Block) and m.compensates:
        selectors = " or ".join(e.name for e in ELEMENTWISE if not e.compensates)
        raise UserError(f"pattern {nm}: block patterns are for {selectors} ({method}'s column sweep selects "
                        "within a column block, not whole 2-D blocks)")
    if any(l.has_lora for _, l in linears(model)):
        raise UserError("post-training pruning needs a model without LoRA factors (merge them first)")
    needs_data = m.needs_calibration
    num_layers = len(model.layers)
    prune_set = set(range(num_layers)) if layers is None else {int(i) for i in layers}
    if any(not 0 <= i < num_layers for i in prune_set):
        raise UserError(f"layers to prune {sorted(prune_set)}: out of range 0..{num_layers - 1}")
    t0 = time.perf_counter()
    peak = 0
    report = {"method": method, "sparsity": sparsity, "pattern": pattern_name(nm),
              "layers": [], "damp_retries": 0,
              "excluded_layers": [i for i in range(num_layers) if i not in prune_set]}
    chunks, rope_of, n_tokens = None, None, 0
    if needs_data:
        calib = np.asarray(calib, np.int32)
        if calib.ndim != 2 or len(calib) == 0:
            raise UserError("calibration data is empty")
        chunks = [model.embed(jnp.asarray(calib[i:i + batch_size])) for i in range(0, len(calib), batch_size)]
        n_tokens = calib.size
        rope_of = rope_tables(model)
    first = min(prune_set, default=-1)  # the compiled passes' memory is measured on the first pruned layer
    for li, layer in enumerate(tqdm(model.layers, desc=f"prune {method}", unit="layer", disable=not progress)):
        measure = measure_memory and li == first
        rope = rope_of(li) if rope_of is not None else None
        if li not in prune_set:  # excluded: every weight stays; an all-ones mask records "kept dense"
            row = {}
            for mod, attr in LINEARS:
                lin = decoder_linear(layer, mod, attr)
                if lin.weight_mask is None:
                    lin.set_weight_mask(jnp.ones(lin.kernel[...].shape, jnp.bool_))
                row[attr] = 1.0 - float(np.asarray(lin.weight_mask[...]).mean())
        else:
            row, layer_peak = _prune_layer(layer, li, chunks, rope, method=method, sparsity=sparsity, nm=nm,
                                           blocksize=blocksize, percdamp=percdamp, warn=warn, n_tokens=n_tokens,
                                           report=report, measure=measure)
            peak = max(peak, layer_peak)
        report["layers"].append(row)
        if needs_data and any(j > li for j in prune_set):  # this layer's (pruned) output feeds the next one
            graphdef, state = nnx.split(layer)
            if measure:
                peak = max(peak, _compiled_bytes(_forward, graphdef, state, chunks[0], *rope(*chunks[0].shape[:2])))
            chunks = forward_layer(layer, chunks, rope)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    report["seconds"] = time.perf_counter() - t0
    if measure_memory:
        report["peak_compiled_bytes"] = peak
    report["sparsity_measured"] = sparsity_of(model)
    return report


def sparsity_of(model) -> float:
    """Fraction of zero mask entries over all weight-masked linears."""
    total = zeros = 0
    for _, lin in linears(model):
        if lin.weight_mask is not None:
            m = np.asarray(lin.weight_mask[...])
            total += m.size
            zeros += int(m.size - m.sum())
    return zeros / total if total else 0.0


def attach_sparsity_masks(model) -> list[str]:
    """Give every decoder linear without a ``weight_mask`` the mask ``W != 0`` (kept masks stay).

    Returns the paths that got a new mask. Used by ``finetune --keep-sparsity`` for inputs that
    carry no masks (an HF dir exported from a pruned model)."""
    added = []
    for li, layer in enumerate(model.layers):
        for mod, attr in LINEARS:
            lin = decoder_linear(layer, mod, attr)
            if lin.weight_mask is None:
                lin.set_weight_mask(lin.kernel[...] != 0)
                added.append(f"layers.{li}.{mod}.{attr}")
    return added


def posttraining_layers(num_layers: int, exclude) -> list[int]:
    """The decoder layers element-wise pruning prunes for ``--exclude-layers``: comma-separated indices, 'none'
    or 'default' -- which here means *no* layer excluded, the protocol of the Wanda and SparseGPT papers
    (structured pruning's default keeps layers < int(0.1·L) and the last one dense; list them to get that)."""
    return prunable_layers(num_layers, "none" if exclude in (None, "default") else exclude)


def calibration_tokens(path, tokenizer, n: int, length: int, seed: int = 0) -> np.ndarray:
    """n windows of ``length`` tokens from the text at ``path`` ([n, length], seeded)."""
    if n < 1:
        raise UserError("must be >= 1", field="calib_samples", value=n)
    if length < 2:
        raise UserError("must be >= 2", field="calib_len", value=length)
    blocks = Blocks.from_stream(token_stream(path, tokenizer), length, seed=seed)
    return blocks.calibration(n, length, seed=seed)
