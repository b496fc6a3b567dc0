"""N:M masks: keep the ``n`` highest scores of every ``m`` consecutive entries along an axis.

One function for every N:M user (SLoPe's 2:4 masks in ``pretrain/slope.py``; Wanda / SparseGPT /
magnitude N:M selection in ``prune/select.py``). It works on numpy arrays (on the host, where
selection is fast) and on jax arrays (inside jit) alike, with an explicit tie rule, since masks of
weights that are already partly zero are full of ties:

* ``keep_ties="earlier"``: of equal scores the earlier entry is kept (SLoPe's official
  ``prune_row_wise``: a descending stable sort);
* ``keep_ties="later"``: of equal scores the earlier entry is pruned first (the papers' Wanda /
  SparseGPT code: an ascending stable sort, the lowest ``m - n`` pruned).
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np

from ..errors import UserError


def _stable_argsort(x, axis: int = -1):
    if isinstance(x, np.ndarray):
        return np.argsort(x, axis=axis, kind="stable")
    return jnp.argsort(x, axis=axis, stable=True)


def nm_keep_mask(scores, n: int, m: int, *, axis: int = 0, keep_ties: Literal["earlier", "later"] = "earlier"):
    """Bool keep-mask of ``scores``' shape: ``n`` kept of every ``m`` consecutive entries along ``axis``.

    numpy in, numpy out; jax in, jax out (jit-friendly). The length of ``axis`` must divide by ``m``.
    """
    xp = np if isinstance(scores, np.ndarray) else jnp
    x = xp.moveaxis(scores, axis, -1)
    d = x.shape[-1]
    if d % m:
        raise UserError(f"{n}:{m} sparsity needs a dimension divisible by {m}, got {d}")
    groups = x.reshape(*x.shape[:-1], d // m, m)
    if keep_ties == "earlier":  # rank 0 = the largest; equal scores ranked in order
        keep = _stable_argsort(_stable_argsort(-groups)) < n
    elif keep_ties == "later":  # rank 0 = the smallest; the m - n lowest go
        keep = _stable_argsort(_stable_argsort(groups)) >= m - n
    else:
        raise ValueError(f"keep_ties={keep_ties!r}: expected 'earlier' or 'later'")
    return xp.moveaxis(keep.reshape(x.shape), -1, axis)
