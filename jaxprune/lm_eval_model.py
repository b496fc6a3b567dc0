"""A jaxprune model as an lm-evaluation-harness ``TemplateLM`` (lm-eval is imported lazily: ``make_lm``).

Scoring mirrors the harness's own ``hf`` backend request for request (same tokenization, left truncation to
``max_length + 1`` tokens, prefix token for empty contexts, rolling windows), so numbers are comparable with
papers' tables. Requests are sorted by length, cut into batches of ``batch_size`` rows and right-padded to a
few bucket lengths (powers of two), so the jitted forward compiles once per bucket, not once per request.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from .generate import generate
from .sharding import to_host

#: The lm-eval version this adapter is written and tested against (its LM API has broken peers before).
LM_EVAL_VERSION = "0.4.13"
MIN_BUCKET = 16


def bucket_length(n: int, max_len: int) -> int:
    """The padded length of a batch whose longest row has ``n`` tokens: a power of two >= 16, capped."""
    return min(max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()), max(max_len, n))


def _score_fn(graphdef):
    @jax.jit
    def score(state, tokens, targets, mask):
        """tokens, targets [B, T] int32, mask [B, T] bool -> (sum of target log-probs [B], all greedy [B])."""
        logits = nnx.merge(graphdef, state)(tokens)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logits, axis=-1) == targets
        return jnp.where(mask, tok, 0.0).sum(-1), jnp.where(mask, greedy, True).all(-1)
    return score


def pack(requests: list[tuple[list[int], list[int]]], max_length: int, rows: int):
    """(context ids, continuation ids) pairs -> tokens, targets, mask [rows, T] (right-padded, T a bucket).

    Like the harness: the pair is cut to its last ``max_length + 1`` tokens; the input is all but the last,
    the targets the input shifted by one; the mask marks the continuation's positions."""
    full = [(c + k)[-(max_length + 1):] for c, k in requests]
    T = bucket_length(max(len(f) - 1 for f in full), max_length)
    tokens, targets = np.zeros((rows, T), np.int32), np.zeros((rows, T), np.int32)
    mask = np.zeros((rows, T), bool)
    for i, ((_, cont), f) in enumerate(zip(requests, full)):
        n = len(f) - 1
        tokens[i, :n], targets[i, :n] = f[:-1], f[1:]
        mask[i, n - min(len(cont), n):n] = True
    return tokens, targets, mask


class TokenScorer:
    """Log-likelihood and greedy match of token continuations under a model, batched and bucketed."""

    def __init__(self, model, *, batch_size: int, max_length: int, placement=None):
        graphdef, state = nnx.split(model)
        self.state = placement.put(state) if placement is not None else state
        self.placement, self.batch_size, self.max_length = placement, batch_size, max_length
        self._score = _score_fn(graphdef)
        self.buckets: set[int] = set()  # the padded lengths compiled so far

    def __call__(self, requests: list[tuple[list[int], list[int]]], progress: bool = True,
                 desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """[(context ids, continuation ids)] -> [(log p(continuation | context), continuation is greedy)]."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc=desc, disable=not progress, unit="req") as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                arrays = pack([requests[i] for i in idx], self.max_length, self.batch_size)
                self.buckets.add(arrays[0].shape[1])
                if self.placement is not None:
                    arrays = [self.placement.put_batch(a, 0, strict=False) for a in arrays]
                lp, greedy = to_host(self._score(self.state, *arrays))
                for row, i in enumerate(idx):
                    out[i] = (float(lp[row]), bool(greedy[row]))
                bar.update(len(idx))
        return out


def truncate_at(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@functools.cache
def lm_class():
    """The ``TemplateLM`` subclass (built on first use: lm-eval and torch load only for ``lm-eval``)."""
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM

    class JaxpruneLM(TemplateLM):
        """lm-eval's model API over a jaxprune ``LlamaForCausalLM`` and its HF tokenizer."""

        def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                     max_gen_toks: int = 256, placement=None, progress: bool = True, seed: int = 0):
            super().__init__()
            self.model, self.tokenizer, self.progress, self.seed = model, tokenizer, progress, seed
            self._max_length = max_length or model.config.max_position_embeddings
            self._max_gen_toks = max_gen_toks
            if placement is not None:  # generate_until runs on the placed weights too
                nnx.update(model, placement.put(nnx.state(model)))
            self.scorer = TokenScorer(model, batch_size=batch_size, max_length=self._max_length, placement=placement)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                       **kwargs) -> list[int]:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            bos = self.tokenizer.decode(self.prefix_token_id)
            if add_special_tokens is None and bos and string.startswith(bos):
                kw = {"add_special_tokens": False}  # the string already carries its BOS (as the hf backend)
            ids = self.tokenizer.encode(string, **kw)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            res = self.scorer([(ctx, cont) for _, ctx, cont in requests], self.progress and not disable_tqdm)
            for (key, _, _), answer in zip(requests, res):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return res

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            owner, windows = [], []
            for i, req in enumerate(requests):
                toks = self.tok_encode(req.args[0])
                for w in lm_utils.get_rolling_token_windows(token_list=toks, prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1):
                    owner.append(i)
                    windows.append(lm_utils.make_disjoint_window(w))
            scores = self.scorer(windows, self.progress and not disable_tqdm, desc="loglikelihood_rolling")
            totals = [0.0] * len(requests)
            for i, (lp, _) in zip(owner, scores):
                totals[i] += lp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            for req in tqdm(requests, desc="generate_until", disable=disable_tqdm or not self.progress):
                context, gen_kwargs = req.args
                kw = dict(gen_kwargs or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
                temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
                new = generate(self.model, np.asarray(ids, np.int32), max_new_tokens=max_new,
                               temperature=temperature, seed=self.seed, eos_token_id=self.eot_token_id)
                text = truncate_at(self.tok_decode(new.tolist()), until + [eos])
                self.cache_hook.add_partial("generate_until", req.args, text)
                out.append(text)
            return out

        def get_model_info(self) -> dict:
            return {"model_num_parameters": self.model.config.num_params(), "model_dtype": str(self.model.dtype),
                    "buckets": sorted(self.scorer.buckets)}

    return JaxpruneLM


def make_lm(model, tokenizer, **kwargs):
    """A ``JaxpruneLM`` (an ``lm_eval.api.model.TemplateLM``) over ``model``; kwargs: batch_size, max_length,
    max_gen_toks, placement (a ``sharding.Placement``), progress, seed."""
    return lm_class()(model, tokenizer, **kwargs)
