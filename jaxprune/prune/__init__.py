"""Pruning: structured (units of heads and MLP channels) and element-wise (unstructured, N:M).

Structured, shared pieces:
* ``groups``: units (``kv_group`` / ``q_head`` / MLP channel), how element scores reduce to them
* ``importance``: the shared reduction; the data-free criteria (l2, random)
* ``masks``: unit masks from scores (pruned sets only grow); ``schedule``: LoRAPrune's cubic schedule
* ``shrink``: physical removal of pruned units
* ``registry``: every method by name (``STRUCTURED``, ``ELEMENTWISE``); ``pipeline``: the prune runs

Methods, one module each with its formula, citation and registration:
* ``loraprune``: LoRA-guided importance, its EMA as an ``(init, update)`` pair, the scheduled mask update
* ``llm_pruner``: Taylor importance from base-weight gradients; ``flap``: fluctuation-based, bias compensation;
  ``minitron``: activation magnitude; ``slimgpt``: layer-wise structured OBS; ``depth`` (whole layers: ShortGPT, ReplaceMe; ``depth_pipeline``)
* ``select`` (element masks, N:M; magnitude), ``wanda``, ``sparsegpt``; ``posttraining``: the sequential pipeline

Importing ``jaxprune.prune`` registers every built-in method.
"""

# noqa below: imported so that they register
from . import depth, flap, importance, llm_pruner, loraprune, minitron, select, slimgpt, sparsegpt, wanda  # noqa: F401
