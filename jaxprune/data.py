"""Text -> token blocks: `datasets` text loader over local files, tokenized once and cached.

* ``token_stream(files, tokenizer)``: one int32 stream (documents joined by EOS), cached by datasets'
  fingerprinting (a second call with the same files and tokenizer is a cache hit).
* ``Blocks``: the stream packed into ``seq_len`` blocks, a held-out validation split, and a
  deterministic shuffle: ``batch(step)`` depends only on (seed, step), which makes resume exact.
* ``calibration(n, length, seed)``: n sequences of ``length`` tokens from the training blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError


def text_files(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    files = sorted(str(f) for f in p.glob("*.txt")) if p.is_dir() else [str(p)]
    if not files:
        raise UserError(f"{p}: directory holds no .txt files")
    return files


def token_stream(path: str | Path, tokenizer) -> np.ndarray:
    """All documents of ``path`` (a .txt file or a dir of them) as one int32 token stream."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files=text_files(path), sample_by="document", split="train")
    eos = tokenizer.eos_token_id
    tokenizer.model_max_length = 10**12

    def tok(batch):
        ids = tokenizer(batch["text"])["input_ids"]
        return {"ids": [x + [eos] if eos is not None else x for x in ids]}

    ds = ds.map(tok, batched=True, remove_columns=["text"])
    return np.concatenate([np.asarray(x, np.int32) for x in ds["ids"]])


@dataclass
class Blocks:
    """Token blocks [n, seq_len] split into train / validation, with a seeded per-epoch shuffle."""

    train: np.ndarray
    val: np.ndarray
    seed: int = 0

    @classmethod
    def from_stream(cls, stream: np.ndarray, seq_len: int, *, val_fraction: float = 0.05, seed: int = 0,
                    min_val_blocks: int = 1) -> "Blocks":
        n = len(stream) // seq_len
        if n < 2:
            raise UserError(f"text too short: {len(stream)} tokens make fewer than 2 blocks of seq-len {seq_len}")
        blocks = stream[: n * seq_len].reshape(n, seq_len)
        n_val = max(min_val_blocks, int(round(n * val_fraction)))
        n_val = min(n_val, n - 1)
        # validation = the last blocks of the stream (contiguous text, never trained on)
        return cls(train=blocks[: n - n_val], val=blocks[n - n_val:], seed=seed)

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """The [batch_size, seq_len] batch of global step ``step``: a function of (seed, step) only."""
        n = len(self.train)
        idx = np.empty(batch_size, np.int64)
        for j in range(batch_size):
            k = step * batch_size + j
            epoch, pos = divmod(k, n)
            perm = np.random.default_rng((self.seed, epoch)).permutation(n)
            idx[j] = perm[pos]
        return self.train[idx]

    def calibration(self, n: int, length: int, seed: int = 0) -> np.ndarray:
        """n sequences of ``length`` tokens sampled from the training blocks: [n, length]."""
        if length > self.train.shape[1]:
            raise UserError(f"calibration length {length} exceeds the block length {self.train.shape[1]}")
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, len(self.train), n)
        starts = rng.integers(0, self.train.shape[1] - length + 1, n)
        return np.stack([self.train[r, s:s + length] for r, s in zip(rows, starts)])
