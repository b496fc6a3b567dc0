"""A thin wrapper over llama.cpp's C API, from the CPU extension of the PyPI wheel ``llama-cpp-cffi==0.4.42``
(``llama/_llama_cpp_cpu.*.so``: cffi ``lib`` / ``ffi``; installed ``--no-deps`` by ``make setup``). That is
llama.cpp build b4965 (March 2025): it runs the llama, deci, qwen2, gemma3 and phi3 archs jaxprune writes, not
qwen3 (added to llama.cpp later).

What jaxprune needs from llama.cpp: load a GGUF, tokenize text, logits for token ids, perplexity, its own
quantizer (``llama_model_quantize``) and prompt / generation tokens per second. The extension is loaded
lazily with ``RTLD_LAZY`` (it names ``__cxa_call_terminate``, absent from GCC 12's libstdc++ on Debian 12).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import UserError

WHEEL = "llama-cpp-cffi==0.4.42"
INSTALL = f"pip install --no-deps {WHEEL} cffi==2.1.1 (make setup does)"
#: ``export --outtype`` names -> llama.cpp ``llama_ftype`` names (``LLAMA_FTYPE_MOSTLY_*``)
FTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
          "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
_STATE: dict = {}


def _load():
    """(lib, ffi), loaded once; UserError naming the install line when the wheel is absent."""
    if "lib" not in _STATE:
        flags = sys.getdlopenflags()
        sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)
        try:
            mod = importlib.import_module("llama._llama_cpp_cpu")
        except ImportError as e:
            raise UserError(f"llama.cpp is not installed ({e.__class__.__name__}: {e}); {INSTALL}") from None
        finally:
            sys.setdlopenflags(flags)
        lib, ffi = mod.lib, mod.ffi
        lib.llama_backend_init()
        log: list[str] = []

        def keep(level, text, user):  # llama.cpp's log, kept (the last 50 lines) instead of printed
            log.append(ffi.string(text).decode(errors="replace"))
            del log[:-50]

        quiet = ffi.callback("void(enum ggml_log_level, char *, void *)", keep)
        lib.llama_log_set(quiet, ffi.NULL)
        _STATE.update(lib=lib, ffi=ffi, quiet=quiet, log=log)  # keep the callback alive
    return _STATE["lib"], _STATE["ffi"]


def last_error() -> str:
    """llama.cpp's last logged error since the last load / quantize (why it failed) on one line, or ''."""
    lines = [" ".join(x.split()) for x in _STATE.get("log", [])]
    errors = [x for x in lines if "error" in x.lower()] or [x for x in lines if "failed" in x.lower()]
    return errors[-1] if errors else ""


def require() -> None:
    """Load llama.cpp now: one UserError line naming the install command when it is absent."""
    _load()


class LlamaCpp:
    """A GGUF loaded in llama.cpp (CPU) with one context of ``n_ctx`` tokens, no flash attention.

    ``kv_f32``: an f32 KV cache (exact comparisons; llama.cpp's default, False, stores it in f16);
    ``vocab_only``: only the tokenizer (fast; no context)."""

    def __init__(self, path: str | Path, *, n_ctx: int = 512, n_threads: int = 2, kv_f32: bool = True,
                 vocab_only: bool = False):
        if not Path(path).is_file():
            raise UserError(f"{path}: no such GGUF file")
        lib, ffi = _load()
        _STATE["log"].clear()
        self.lib, self.ffi, self.path = lib, ffi, Path(path)
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.vocab_only = vocab_only
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if self.model == ffi.NULL:
            raise UserError(f"{path}: llama.cpp could not load this GGUF ({last_error()})")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.ctx = ffi.NULL
        if not vocab_only:
            cp = lib.llama_context_default_params()
            cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
            cp.n_threads = cp.n_threads_batch = n_threads
            if kv_f32:
                cp.type_k = cp.type_v = lib.GGML_TYPE_F32
            cp.flash_attn = False
            cp.no_perf = True
            self.ctx = lib.llama_init_from_model(self.model, cp)
            if self.ctx == ffi.NULL:
                self.close()
                raise UserError(f"{path}: llama.cpp could not create a context ({n_ctx} tokens)")
        self.n_ctx, self.n_threads = n_ctx, n_threads

    def close(self) -> None:
        if self.ctx != self.ffi.NULL:
            self.lib.llama_free(self.ctx)
            self.ctx = self.ffi.NULL
        if self.model != self.ffi.NULL:
            self.lib.llama_model_free(self.model)
            self.model = self.ffi.NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp read it (``general.architecture``, ``tokenizer.ggml.pre``, ...)."""
        buf = self.ffi.new("char[]", 4096)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, 4096)
        return None if n < 0 else self.ffi.string(buf).decode()

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """llama.cpp's token ids of ``text`` (special tokens in the text are not parsed)."""
        data = text.encode()
        cap = len(data) + 8
        buf = self.ffi.new("int32_t[]", cap)
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize: needs {-n} tokens, room for {cap}")
        return list(buf[0:n])

    def _decode(self, ids, pos0: int, want_logits: bool) -> None:
        lib, ffi = self.lib, self.ffi
        n = len(ids)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for j, t in enumerate(ids):
                batch.token[j] = int(t)
                batch.pos[j] = pos0 + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = want_logits
            batch.n_tokens = n
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            lib.llama_batch_free(batch)

    def logits(self, ids) -> np.ndarray:
        """[T, V] float32 logits of one sequence of T ≤ n_ctx token ids (a fresh KV cache)."""
        ids = [int(t) for t in ids]
        if not 0 < len(ids) <= self.n_ctx:
            raise ValueError(f"{len(ids)} tokens for a context of {self.n_ctx}")
        self.lib.llama_kv_self_clear(self.ctx)
        self._decode(ids, 0, True)
        ptr = self.lib.llama_get_logits(self.ctx)
        buf = self.ffi.buffer(ptr, 4 * len(ids) * self.n_vocab)
        return np.frombuffer(buf, np.float32).reshape(len(ids), self.n_vocab).copy()

    def perplexity(self, ids, seq_len: int) -> dict:
        """exp(mean NLL) over non-overlapping windows of ``seq_len`` tokens (each scored from its 2nd token),
        the protocol of ``jaxprune.evaluate.perplexity``; {'ppl', 'nll', 'tokens'}."""
        ids = np.asarray(ids)
        total, count = 0.0, 0
        for s in range(0, len(ids) - seq_len + 1, seq_len):
            w = ids[s:s + seq_len]
            total += float(nll_sum(self.logits(w), w))
            count += seq_len - 1
        return {"ppl": float(np.exp(total / count)), "nll": total / count, "tokens": count}

    def speed(self, *, n_prompt: int = 128, n_gen: int = 32, reps: int = 3, warmup: bool = True,
              seed: int = 0, threads: int | None = None) -> dict:
        """llama-bench's two numbers: prompt processing (one batch of ``n_prompt`` random tokens) and generation
        (``n_gen`` single-token decodes after it) in tokens/s, the median of ``reps`` runs (after one warm-up).
        ``*_tokens_per_cpu_s`` divide by the process's CPU time instead of wall time: with one thread, the
        compute itself, whatever else the machine runs (with more, llama.cpp's spin-waits count too)."""
        if threads is not None and threads != self.n_threads:
            self.lib.llama_set_n_threads(self.ctx, threads, threads)
            self.n_threads = threads
        ids = np.random.default_rng(seed).integers(0, self.n_vocab, n_prompt + n_gen).tolist()
        runs = []
        for r in range(reps + bool(warmup)):
            self.lib.llama_kv_self_clear(self.ctx)
            w0, c0 = time.perf_counter(), time.process_time()
            self._decode(ids[:n_prompt], 0, False)
            w1, c1 = time.perf_counter(), time.process_time()
            for j in range(n_gen):
                self._decode([ids[n_prompt + j]], n_prompt + j, True)
            w2, c2 = time.perf_counter(), time.process_time()
            if r or not warmup:
                runs.append((n_prompt / (w1 - w0), n_gen / (w2 - w1), n_prompt / max(c1 - c0, 1e-9),
                             n_gen / max(c2 - c1, 1e-9)))
        med = np.median(np.asarray(runs), axis=0)
        return {"pp_tokens_per_s": float(med[0]), "tg_tokens_per_s": float(med[1]),
                "pp_tokens_per_cpu_s": float(med[2]), "tg_tokens_per_cpu_s": float(med[3]),
                "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "threads": self.n_threads}


def speed_rounds(paths: dict, *, rounds: int, n_prompt: int = 128, n_gen: int = 32, threads=(2,),
                 on_round=None) -> list[dict]:
    """Time several GGUFs fairly: every file at every thread count in each of ``rounds`` rounds, round-robin, so
    ratios between files come from the same machine load (take them round by round, then the median).

    ``paths``: {key: GGUF path}. Each model is opened once (context ``n_prompt + n_gen``, f16 KV cache) and warmed
    once. Returns one dict per round, ``{(key, threads): LlamaCpp.speed(...)}``; ``on_round(r, that dict)`` is
    called after each round (progress)."""
    threads = list(threads)
    models = {k: LlamaCpp(p, n_ctx=n_prompt + n_gen, n_threads=threads[0], kv_f32=False) for k, p in paths.items()}
    try:
        for m in models.values():
            m.speed(n_prompt=n_prompt, n_gen=n_gen, reps=1)
        out = []
        for r in range(rounds):
            out.append({(k, t): m.speed(n_prompt=n_prompt, n_gen=n_gen, reps=1, warmup=False, seed=r, threads=t)
                        for k, m in models.items() for t in threads})
            if on_round is not None:
                on_round(r, out[-1])
        return out
    finally:
        for m in models.values():
            m.close()


def nll_sum(logits: np.ndarray, ids) -> float:
    """Σ −log p(ids[t+1] | ids[:t+1]) from [T, V] logits (float64 log-softmax)."""
    x = np.asarray(logits, np.float64)[:-1]
    x = x - x.max(-1, keepdims=True)
    lse = np.log(np.exp(x).sum(-1))
    tgt = np.asarray(ids)[1:]
    return float((lse - x[np.arange(len(tgt)), tgt]).sum())


def quantize(src: str | Path, dst: str | Path, outtype: str, *, n_threads: int = 2) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``, as ``llama-quantize SRC DST TYPE``) from an f32 / f16
    GGUF to ``outtype`` (one of FTYPES); tensors whose rows do not split into the type's blocks fall back as
    llama.cpp decides (k-quants -> q5_0 / q8_0 / f16)."""
    if outtype not in FTYPES:
        raise UserError(f"expected one of {', '.join(FTYPES)}", field="outtype", value=outtype)
    lib, ffi = _load()
    _STATE["log"].clear()
    params = ffi.new("struct llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = n_threads
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize to {outtype} ({last_error() or f'returned {rc}'}; "
                        f"a weight's row length may not divide into {outtype}'s blocks: try q4_k_m)")
