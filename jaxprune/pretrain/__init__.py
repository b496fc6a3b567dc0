"""Pretraining from random init with sparse + low-rank weights (issue 8).

* ``sltrain``: SLTrain's ``W = s·A@B + S`` (fixed random support) and the pure low-rank baseline
* ``slope``: SLoPe's 2:4 forward, double-pruned backward (custom_vjp), lazy adapters, mask schedule
* ``methods``: building a model per method, partition, dense merge, parameter accounting
* ``registry``: the methods by name, each with its layer swap, checks and run hooks (``plan``)
* ``pipeline``: one run of any method, ``run_pretrain(PretrainConfig)`` (the ``jaxprune pretrain`` command's
  library call; the train loop itself is ``jaxprune.runs.run_training``)

Importing ``jaxprune.pretrain`` registers every built-in method.
"""

from . import lost, methods, sltrain, slope, sste, switchlora  # noqa: F401  (they register)
