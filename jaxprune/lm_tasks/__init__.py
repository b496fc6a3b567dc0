"""The local lm-eval task family (YAML + JSONL, built by ``scripts/make_lm_tasks.py``): ``jaxprune lm-eval``
always includes this folder, so ``--tasks shakespeare`` (the tag) or one task by name runs offline."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
