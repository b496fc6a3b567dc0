"""Per-backend tile sizes for the jaxprune Pallas kernels, plus padding helpers.

Tile sizes are a *performance* knob only: every kernel pads its operands with zeros up to a
multiple of the tile size (and masks the padding out, see each kernel's docstring), so any shape
is accepted and results never depend on the tile size beyond float rounding.

Table rationale (``python scripts/bench_kernels.py --tiles`` times every candidate on a GPU/TPU):

* ``tpu``: 128 x 128 tiles match the MXU and the (8, 128) VMEM tiling; ``bm`` = 128 (not measured: no TPU yet).
* ``gpu``: 64 x 64 x 64 (power-of-2, >= 16 for ``tl.dot``). Measured on an H200 (benchmarks/kernels_gpu.json,
  bf16, 2048 tokens, 90% blocks): at the LLaMA-7B shape 4096x11008 the masked low-rank kernel took 1.84 ms with
  64x64x64 against 2.57 ms (128x64x128) and 7.53 ms (64x128x128); 128x128x128 and larger exceed the 227 KiB of
  shared memory. The block-sparse kernel's ``bm`` = 64 was fastest there too (0.231 ms; 32: 0.290, 128: 0.315).
  At the SmolLM2 shape the candidates were within the run-to-run spread (up to 1.5x between two calls).
* ``cpu``: interpret mode; large tiles mean fewer (slow, Python-level) grid steps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TileSizes(NamedTuple):
    """Tile sizes of a 2-D matmul ``[M, K] @ [K, N]``: rows ``bm``, contraction ``bk``, columns ``bn``."""

    bm: int
    bk: int
    bn: int


BLOCK_SIZES: dict[str, TileSizes] = {
    "tpu": TileSizes(bm=128, bk=128, bn=128),
    "gpu": TileSizes(bm=64, bk=64, bn=64),
    "cpu": TileSizes(bm=128, bk=128, bn=128),
}
DEFAULT = TileSizes(bm=128, bk=128, bn=128)

# Minimum multiple for the low-rank dimension r (zero-padding A's columns / B's rows is exact).
# Triton's tl.dot needs every dimension >= 16; Mosaic is happiest with multiples of 8.
RANK_MULTIPLE: dict[str, int] = {"tpu": 8, "gpu": 16, "cpu": 1}


def tile_sizes(backend: str | None = None, **overrides: int | None) -> TileSizes:
    """Tile sizes for ``backend`` (default: ``jax.default_backend()``), with non-None ``overrides``."""
    backend = backend or jax.default_backend()
    base = BLOCK_SIZES.get(backend, DEFAULT)
    return base._replace(**{k: v for k, v in overrides.items() if v is not None})


def rank_multiple(backend: str | None = None) -> int:
    """The multiple that the low-rank dimension r is zero-padded to on ``backend``."""
    return RANK_MULTIPLE.get(backend or jax.default_backend(), 8)


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (and >= ``multiple``)."""
    return max(multiple, -(-n // multiple) * multiple)


def fit_tile(tile: int, dim: int, variant: str) -> int:
    """Shrink ``tile`` for a small dimension ``dim`` (so tiny problems are not padded to 128).

    ``gpu`` (Triton): every loaded tile must have a power-of-2 size, so the result is a power of 2
    >= 16; otherwise (TPU / interpret) a multiple of 16, which equals the padded full dimension
    when it is smaller than ``tile`` (Mosaic accepts a block equal to the full array dimension).
    """
    if variant == "gpu":
        return min(tile, max(16, 1 << max(dim - 1, 0).bit_length()))
    return min(tile, round_up(max(dim, 1), 16))


def pad_rank(r: int, variant: str) -> int:
    """Padded low-rank dimension: a power of 2 >= 16 for ``gpu``, else a multiple of ``RANK_MULTIPLE``."""
    if variant == "gpu":
        return fit_tile(1 << 30, r, "gpu")
    return round_up(r, RANK_MULTIPLE.get(variant, 8))


def pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zero-pad ``a`` at the end of each axis up to ``shape`` (no-op when already that shape)."""
    if tuple(a.shape) == tuple(shape):
        return a
    return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


IMPLS = ("auto", "xla", "pallas", "pallas_tpu", "pallas_gpu")


def resolve_impl(impl: str = "auto", interpret: bool | None = None,
                 backend: str | None = None) -> tuple[str, bool]:
    """Map the user's ``impl`` flag to ``(variant, interpret)``; ``variant`` in {"xla", "tpu", "gpu"}.

    * ``auto``: Pallas on TPU/GPU, the XLA reference elsewhere (CPU interpret mode is slow).
    * ``pallas``: the backend's own Pallas kernel; on CPU the TPU-style kernel with ``interpret=True``.
    * ``pallas_tpu`` / ``pallas_gpu``: force a kernel flavour (interpreted unless on its own backend).
    * ``xla``: the pure-jnp reference (``reference.py``), autodiffed by XLA.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = backend or jax.default_backend()
    if impl == "xla" or (impl == "auto" and backend not in ("tpu", "gpu")):
        return "xla", False
    if impl in ("auto", "pallas"):
        variant = backend if backend in ("tpu", "gpu") else "tpu"
    else:
        variant = impl.removeprefix("pallas_")
    if interpret is None:
        interpret = backend != variant
    return variant, bool(interpret)
