"""Wanda (Sun et al. 2023, arXiv 2306.11695): prune by weight magnitude times input activation norm.

In our ``[in, out]`` layout (the paper's ``W`` is ``[out, in]``)::

    S_ij = |W_ij| · ‖X_j‖₂          X_j: input feature j over all calibration tokens

compared *per output* (each column prunes ``floor(s·in)``), N:M inside groups of M consecutive inputs
of a column (locuslab/wanda ``prune_wanda``). The statistic ``Σ_t x_tj²`` comes from the sequential
calibration in ``posttraining.py``.
"""

from __future__ import annotations

import numpy as np

from .registry import register_elementwise
from .select import select_mask


def wanda_scores(w, sq_norms) -> np.ndarray:
    """Wanda's ``S_ij = |W_ij| · ‖X_j‖₂`` in our [in, out] layout; ``sq_norms[j] = Σ_t x_tj²``."""
    return np.abs(np.asarray(w, np.float32)) * np.sqrt(np.asarray(sq_norms, np.float64)).astype(np.float32)[:, None]


def wanda_mask(w, sq_norms, sparsity: float, nm=None) -> np.ndarray:
    """Keep-mask from Wanda scores, compared per output (column) / per N:M group."""
    return select_mask(wanda_scores(w, sq_norms), sparsity, nm, per_output=True)


NAME = "wanda"

register_elementwise(NAME, statistic="sq", summary="|W_ij|·‖X_j‖₂ compared per output (per N:M group)",
                     citation="Sun et al. 2023, arXiv 2306.11695 (locuslab/wanda prune_wanda)")(wanda_mask)
