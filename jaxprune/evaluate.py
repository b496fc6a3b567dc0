"""Perplexity and forward throughput.

Protocol (the LLM-Pruner / LoRAPrune one): tokenize the whole text once with the
model's tokenizer (its default special tokens), cut the token stream into
non-overlapping windows of ``seq_len`` (the tail shorter than a window is
dropped), score each window with teacher forcing, and report
``exp(sum of next-token NLL / number of predicted tokens)`` over all windows
(each window predicts ``seq_len - 1`` tokens).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from .errors import UserError
from .model import summed_nll


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise UserError(f"{p}: directory holds no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return p.read_text(encoding="utf-8", errors="replace")


#: local files ``--dataset`` reads with datasets' packaged builders, by suffix
DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str]:
    """``NAME[:CONFIG][:SPLIT]`` -> (name, config, split); a local file takes ``FILE[:SPLIT]`` (split 'train')."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise UserError("expected NAME[:CONFIG][:SPLIT]", field="dataset", value=spec)
    if Path(parts[0]).is_file():
        if len(parts) > 2:
            raise UserError("a local file takes FILE[:SPLIT]", field="dataset", value=spec)
        return parts[0], None, parts[1] if len(parts) == 2 else "train"
    return parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "test"


def read_dataset_text(spec: str) -> str:
    """A ``datasets`` dataset as one text, as LLM-Pruner's perplexity does: the rows of its ``text`` column
    joined by blank lines (WikiText-2), else of its ``sentence`` column joined by spaces (PTB), else of its
    only string column. A hub name needs the network; a local dir or .jsonl/.json/.csv/.parquet/.txt file not."""
    import datasets

    name, config, split = parse_dataset_spec(spec)
    suffix = Path(name).suffix.lower()
    try:
        if Path(name).is_file():
            if suffix not in DATASET_BUILDERS:
                raise UserError(f"unknown file type (expected one of {', '.join(DATASET_BUILDERS)})",
                                field="dataset", value=name)
            ds = datasets.load_dataset(DATASET_BUILDERS[suffix], data_files=name, split=split)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as e:  # not found, no such split or config, no network: datasets raises many types
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot be loaded: {msg}", field="dataset", value=spec) from None
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    for column, sep in (("text", "\n\n"), ("sentence", " ")):
        if column in columns:
            return sep.join(ds[column])
    if len(columns) != 1:
        raise UserError(f"no 'text' or 'sentence' column and {len(columns)} string columns "
                        f"({', '.join(columns) or 'none'})", field="dataset", value=spec)
    return "\n\n".join(ds[columns[0]])


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """The whole text as one int32 token stream, with the tokenizer's default special tokens."""
    tokenizer.model_max_length = 10**12  # a whole play is one sequence here, on purpose
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)


def windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping [n, seq_len] windows of the first ``max_tokens`` tokens (tail dropped)."""
    if max_tokens:
        tokens = tokens[:max_tokens]
    n = len(tokens) // seq_len
    if n == 0:
        raise UserError(f"text too short: {len(tokens)} tokens is less than one window of seq-len {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def _nll_fn(graphdef):
    @jax.jit
    def nll(state, batch):
        return summed_nll(nnx.merge(graphdef, state), batch)
    return nll


def perplexity(model, tokens: np.ndarray, *, seq_len: int = 512, batch_size: int = 4,
               max_tokens: int | None = None, progress: bool = True) -> dict:
    """{'ppl', 'nll', 'tokens' (predicted), 'windows', 'tokens_per_s' (forward tokens / s, compile excluded)}."""
    win = windows(tokens, seq_len, max_tokens)
    graphdef, state = nnx.split(model)
    nll = _nll_fn(graphdef)
    n_full = len(win) // batch_size * batch_size
    batches = [win[i:i + batch_size] for i in range(0, n_full, batch_size)]
    tail = win[n_full:]
    total, elapsed, fwd_tokens = 0.0, 0.0, 0
    for i, b in enumerate(tqdm(batches + ([tail] if len(tail) else []), desc="perplexity", disable=not progress,
                               unit="batch")):
        if i == 0 or len(b) != batch_size:  # compile outside the timed region
            jax.block_until_ready(nll(state, jnp.asarray(b)))
        t = time.perf_counter()
        total += float(nll(state, jnp.asarray(b)))
        elapsed += time.perf_counter() - t
        fwd_tokens += b.size
    predicted = len(win) * (seq_len - 1)
    mean = total / predicted
    return {"ppl": float(np.exp(mean)), "nll": mean, "tokens": int(predicted), "windows": int(len(win)),
            "seq_len": seq_len, "tokens_per_s": fwd_tokens / max(elapsed, 1e-9)}


def _timed_forward(model, batch_size: int, seq_len: int, seed: int):
    """A compiled, warmed-up forward of ``model`` -> a function returning one call's seconds."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    x = jax.random.randint(jax.random.key(seed), (batch_size, seq_len), 0, model.config.vocab_size)
    jax.block_until_ready(fwd(state, x))

    def once() -> float:
        t = time.perf_counter()
        jax.block_until_ready(fwd(state, x))
        return time.perf_counter() - t
    return once


def forward_throughput(model, *, batch_size: int = 4, seq_len: int = 256, iters: int = 5, seed: int = 0) -> float:
    """Forward tokens / s of the jitted logits computation (compile excluded, median of ``iters``)."""
    once = _timed_forward(model, batch_size, seq_len, seed)
    return batch_size * seq_len / float(np.median([once() for _ in range(iters)]))


def forward_speedup(model, baseline, *, batch_size: int = 4, seq_len: int = 256, rounds: int = 7,
                    seed: int = 0) -> tuple[float, float]:
    """(speed of ``model`` over ``baseline``, ``model``'s forward tokens / s). The speed-up is the median
    over ``rounds`` of (baseline time / model time), the two timed back to back each round so that load
    on the machine hits both alike; tokens / s is the median of the model's own timings."""
    a = _timed_forward(model, batch_size, seq_len, seed)
    b = _timed_forward(baseline, batch_size, seq_len, seed)
    pairs = [(a(), b()) for _ in range(rounds)]
    speedup = float(np.median([tb / ta for ta, tb in pairs]))
    return speedup, batch_size * seq_len / float(np.median([ta for ta, _ in pairs]))


def torch_forward_speedup(hf_dir, baseline_dir, *, batch_size: int = 4, seq_len: int = 256, rounds: int = 5,
                          seed: int = 0) -> tuple[float, float, float]:
    """Stock transformers (torch, fp32, CPU) forward of two exported HF dirs, timed back to back each round:
    (speed of ``hf_dir`` over ``baseline_dir``, its tokens / s, the baseline's tokens / s)."""
    import torch
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (hf_dir, baseline_dir)]
    vocab = min(m.config.vocab_size for m in models)
    ids = torch.as_tensor(np.random.default_rng(seed).integers(0, vocab, (batch_size, seq_len)))

    def once(m) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            m(ids, use_cache=False)
        return time.perf_counter() - t

    for m in models:
        once(m)  # warm-up
    pairs = [(once(models[0]), once(models[1])) for _ in range(rounds)]
    tokens = batch_size * seq_len
    return (float(np.median([tb / ta for ta, tb in pairs])), tokens / float(np.median([ta for ta, _ in pairs])),
            tokens / float(np.median([tb for _, tb in pairs])))
