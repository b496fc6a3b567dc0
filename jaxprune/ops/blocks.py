"""Block structure of a boolean mask: is it whole ``b x b`` tiles, kept or pruned (``prune --pattern block:BxB``)?"""

from __future__ import annotations

import numpy as np

#: block sizes tried, largest first (the kernel's tiles; a mask of 32x32 blocks is also one of 16x16 blocks)
CANDIDATES = (128, 64, 32, 16, 8)


def block_grid(mask: np.ndarray, b: tuple[int, int]) -> np.ndarray | None:
    """[ceil(in/bk), ceil(out/bn)] keep-per-block when ``mask [in, out]`` is constant on every block (edge
    blocks over what they hold), else None."""
    m = np.asarray(mask, bool)
    bk, bn = b
    gk, gn = -(-m.shape[0] // bk), -(-m.shape[1] // bn)
    padded = np.pad(m, ((0, gk * bk - m.shape[0]), (0, gn * bn - m.shape[1])), mode="edge")
    tiles = padded.reshape(gk, bk, gn, bn)
    anyk, allk = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
    return allk if np.array_equal(anyk, allk) else None


def block_shape_of(mask: np.ndarray, candidates=CANDIDATES) -> tuple[int, int] | None:
    """The largest square block size in ``candidates`` on which ``mask`` is whole blocks with at least one
    pruned block (so a block-sparse matmul skips something); None for an unstructured / N:M / full mask."""
    for b in candidates:
        grid = block_grid(mask, (b, b))
        if grid is not None and not grid.all():
            return b, b
    return None
