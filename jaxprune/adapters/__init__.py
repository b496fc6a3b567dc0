"""Adapters: what ``finetune`` trains on a frozen base, one module each with its formula and citation.

* ``registry``: :class:`Adapter`, ``ADAPTERS`` (by name), ``attach_adapter`` (LoRA layers -> the adapter's layers)
* ``lora``: ``W + s·A@B`` (the layer is ``layers.Linear`` itself)
* ``dora``: ``m ⊙ (W + s·A@B) / ‖W + s·A@B‖_c``, a trained magnitude per output feature (``DoRALinear``)
* ``randlora``: ``W + s·Σ_j B_j Λ_j A Γ_j``, fixed random bases shared by the model, diagonal scalings trained
* ``sparse``: ``W + s·(A⊙M_A)@(B⊙M_B)``, a rank-⌈r/d⌉ LoRA on a fixed random support (SparseAdapter, Large-Sparse)
* ``bone``: ``W + E@D``, one trained block D [r, out] added to every r-row shard of W (Bone / PEFT's MiSS)

Importing ``jaxprune.adapters`` registers every built-in adapter; plugins register the same way.
"""

from . import lora  # noqa: F401  (imported so that they register, LoRA first)
from . import dora, randlora, sparse, bone  # noqa: F401,I001
from .registry import ADAPTERS, FEATURES, Adapter, adapter_of, attach_adapter, register_adapter  # noqa: F401
