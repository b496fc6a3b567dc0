"""Build the local lm-eval task family (``jaxprune/lm_tasks/*.jsonl``) from the held-out plays.

    python scripts/make_lm_tasks.py          # needs the fixtures (scripts/fixtures.py); deterministic

The plays in ``jaxprune.fixtures.HELDOUT_PLAYS`` are never used for training or calibration. Three tasks:

* ``shakespeare_next_line`` (multiple choice): a speaker and 2-3 lines of a speech; pick the true next line
  among four (three distractors drawn from the same play's verse lines). acc, acc_norm.
* ``shakespeare_last_word`` (loglikelihood, a LAMBADA-style cloze): the speech's lines up to a line's last
  word; the word. acc (is the word the greedy continuation) and perplexity.
* ``shakespeare_passages`` (loglikelihood_rolling): whole passages; word / byte perplexity, bits per byte.

The JSONL files are committed; this script only regenerates them.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fixtures import HELDOUT_PLAYS, fixture_paths  # noqa: E402

OUT = REPO / "jaxprune" / "lm_tasks"
SPEAKER = re.compile(r"^[A-Z][A-Z' .,-]+\.$")
SPLITS = {"test": 250, "train": 40}  # docs per split (train: few-shot examples only)


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, verse lines) of every speech: a block opened by an all-caps 'NAME.' line."""
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r", "")):
        lines = [l.strip() for l in block.strip().split("\n") if l.strip()]
        if len(lines) < 2 or not SPEAKER.match(lines[0]):
            continue
        body = [l for l in lines[1:] if not l.startswith("[")]
        if body:
            out.append((lines[0], body))
    return out


def next_line_docs(play: list[tuple[str, list[str]]], rng: random.Random) -> list[dict]:
    pool = [l for _, body in play for l in body if len(l.split()) >= 4]
    docs = []
    for speaker, body in play:
        for i in range(2, len(body)):
            gold = body[i]
            if len(gold.split()) < 4 or rng.random() > 0.5:
                continue
            wrong = set()
            while len(wrong) < 3:
                cand = rng.choice(pool)
                if cand != gold and cand not in body:
                    wrong.add(cand)
            choices = sorted(wrong)
            label = rng.randrange(4)
            choices.insert(label, gold)
            docs.append({"context": "\n".join([speaker, *body[max(0, i - 3):i]]), "choices": choices,
                         "label": label})
    return docs


def last_word_docs(play: list[tuple[str, list[str]]], rng: random.Random) -> list[dict]:
    docs = []
    for speaker, body in play:
        for i, line in enumerate(body):
            words = line.split()
            word = re.sub(r"[^A-Za-z']+$", "", words[-1]) if words else ""
            if len(words) < 5 or not re.fullmatch(r"[A-Za-z]{3,}", word) or rng.random() > 0.5:
                continue
            context = "\n".join([speaker, *body[max(0, i - 3):i], " ".join(words[:-1])])
            docs.append({"context": context, "target": word})
    return docs


def passage_docs(play: list[tuple[str, list[str]]], rng: random.Random) -> list[dict]:
    docs, cur = [], []
    for speaker, body in play:
        cur.append("\n".join([speaker, *body]))
        if sum(len(c) for c in cur) >= 600:
            docs.append({"text": "\n\n".join(cur)})
            cur = []
    return [d for d in docs if len(d["text"]) <= 1500]


def write(name: str, docs: list[dict], rng: random.Random, sizes: dict[str, int]) -> None:
    rng.shuffle(docs)
    start = 0
    for split, n in sizes.items():
        part = docs[start:start + n]
        start += n
        if len(part) < n:
            raise SystemExit(f"{name}: only {len(part)} docs for {split} (wanted {n})")
        (OUT / f"{name}.{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
        print(f"{name}.{split}.jsonl: {len(part)} docs")


def main() -> None:
    plays = [speeches((fixture_paths().plays / name).read_text(encoding="utf-8", errors="replace"))
             for name in HELDOUT_PLAYS]
    for name, build, sizes in (("next_line", next_line_docs, SPLITS), ("last_word", last_word_docs, SPLITS),
                               ("passages", passage_docs, {"test": 40})):
        rng = random.Random(f"jaxprune-{name}")
        docs = [d for play in plays for d in build(play, rng)]
        write(name, docs, rng, sizes)


if __name__ == "__main__":
    main()
