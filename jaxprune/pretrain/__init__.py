"""Pretraining from random init with sparse + low-rank weights (issue 8).

* ``sltrain``: SLTrain's ``W = s·A@B + S`` (fixed random support) and the pure low-rank baseline
* ``slope``: SLoPe's 2:4 forward, double-pruned backward (custom_vjp), lazy adapters, mask schedule
* ``methods``: building a model per method, partition, dense merge, parameter accounting

The command is ``jaxprune.commands.pretrain``; the run itself is ``jaxprune.runs.run_training``.
"""
