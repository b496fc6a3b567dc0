"""lm-eval's ``custom_dataset`` for the local tasks: ``<data>.<split>.jsonl`` next to this file, read without
any download (``datasets.Dataset.from_list``), so the tasks run offline."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data: str, **_metadata) -> datasets.DatasetDict:
    """{split: Dataset} for every ``<data>.<split>.jsonl`` here (lm-eval passes task metadata as kwargs too)."""
    splits = {}
    for path in sorted(HERE.glob(f"{data}.*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[path.name.split(".")[1]] = datasets.Dataset.from_list(rows)
    if not splits:
        raise FileNotFoundError(f"{HERE}: no {data}.*.jsonl")
    return datasets.DatasetDict(splits)
