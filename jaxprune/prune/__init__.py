"""Pruning: structured (units of heads and MLP channels) and element-wise (unstructured, N:M).

Structured, shared pieces:
* ``groups``: units (``kv_group`` / ``q_head`` / MLP channel), how element scores reduce to them
* ``importance``: the shared reduction; magnitude and random scores
* ``masks``: unit masks from scores (pruned sets only grow); ``schedule``: LoRAPrune's cubic schedule
* ``shrink``: physical removal of pruned units

Methods, one module each with its formula and citation:
* ``loraprune``: LoRA-guided importance, its EMA as an ``(init, update)`` pair, the scheduled mask update
* ``llm_pruner``: Taylor importance from base-weight gradients; ``oneshot``: the one-shot baselines
* ``select`` (element masks, N:M), ``wanda``, ``sparsegpt``; ``posttraining``: the sequential pipeline
"""
