"""The tokenizer in a GGUF file: ``tokenizer.ggml.*`` from an HF fast tokenizer, and the pre-tokenizer name
llama.cpp splits text with (``tokenizer.ggml.pre``).

Two kinds: byte-level BPE (GPT-2 bytes; llama.cpp's ``gpt2`` model, SmolLM2, Qwen, the plays tokenizer) and
sentencepiece-style BPE (``▁`` for spaces, byte fallback; llama.cpp's ``llama`` model, Gemma 3, LLaMA 2,
Phi-3). The second is written as llama.cpp's converter writes a ``tokenizer.model``: pieces, scores, types.
An HF ``tokenizer.json`` has merges instead of scores; llama.cpp merges the adjacent pair whose joined piece
scores highest, so a piece's score is minus the rank of the first merge that makes it (``spm_scores``),
which replays the BPE merge order (Gemma 3's tokens in llama.cpp then equal transformers', 5,755/5,755 on
held-out text).

llama.cpp does not read the tokenizer's regex from the file: it reads a name and runs its own code for
it, so a wrong name gives other tokens. ``convert_hf_to_gguf.py`` (``get_vocab_base_pre``) finds the name
by encoding a fixed check text and hashing the ids, ``sha256(str(ids))``; ``CHKHSH`` holds the entries of
its table for the tokenizers jaxprune's families use (names the pinned llama.cpp knows). One more rule
of ours: a tokenizer whose only pre-tokenizer is GPT-2's byte-level regex (no normalizer), such as
the plays tokenizer trained here, is ``gpt-2``. Anything else is refused with a line naming
``--tokenizer-pre``, never written as llama.cpp's ``default`` (which splits differently).
"""

from __future__ import annotations

import json
import re
from hashlib import sha256

import gguf

from .errors import UserError, field_ref
from .gguf_reader import open_gguf

#: convert_hf_to_gguf.py's check text (``chktxt``), character for character.
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
          "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
          "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
          "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
          "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
          "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
          "make it, 'D you like some tea? We'Ve a'lL")
#: sha256(str(tokenizer.encode(CHKTXT))) -> llama.cpp pre-tokenizer (convert_hf_to_gguf.py's table, in part)
CHKHSH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",       # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",    # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",        # Qwen/Qwen1.5-7B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",        # openai-community/gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",       # Mistral-Nemo
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",       # Xenova/gpt-4o (Phi-4)
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
}
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


_SPEC_CACHE: list = []  # [(tokenizer, its tokenizer.json dict)]: the last one (Gemma's takes seconds to serialise)


def _spec(tokenizer) -> dict:
    """The fast tokenizer's tokenizer.json as a dict (read-only; cached for the last tokenizer asked)."""
    if _SPEC_CACHE and _SPEC_CACHE[0][0] is tokenizer:
        return _SPEC_CACHE[0][1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    _SPEC_CACHE[:] = [(tokenizer, spec)]
    return spec


def is_spm_bpe(tokenizer) -> bool:
    """A sentencepiece-style BPE (``▁`` spaces, byte fallback to ``<0xXX>`` pieces): llama.cpp's ``llama`` model."""
    spec = _spec(tokenizer)
    model = spec.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "\u2581" in json.dumps(
        [spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")], ensure_ascii=False)


def is_byte_level_bpe(tokenizer) -> bool:
    """A fast BPE tokenizer over GPT-2 bytes (llama.cpp's ``gpt2`` model), not a sentencepiece-style one
    (``▁`` spaces, byte fallback) that merely uses a BPE model."""
    spec = _spec(tokenizer)
    model = spec.get("model", {})
    return model.get("type") == "BPE" and not model.get("byte_fallback") and "\u2581" not in json.dumps(
        [spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")], ensure_ascii=False)


def chkhsh(tokenizer) -> str:
    """convert_hf_to_gguf.py's hash of ``tokenizer``: sha256 of the str of its ids for CHKTXT."""
    return sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def tokenizer_pre(tokenizer) -> tuple[str, str]:
    """(llama.cpp pre-tokenizer name, how it was found: 'chkhsh' | 'gpt2-byte-level'); UserError when unknown."""
    h = chkhsh(tokenizer)
    if h in CHKHSH:
        return CHKHSH[h], "chkhsh"
    spec = _spec(tokenizer)
    pre = {k: v for k, v in (spec.get("pre_tokenizer") or {}).items() if k != "trim_offsets"}
    if spec.get("normalizer") is None and pre == _GPT2_BYTE_LEVEL:
        return "gpt-2", "gpt2-byte-level"
    raise UserError(f"GGUF export: llama.cpp's pre-tokenizer for this tokenizer is not known (chkhsh {h[:16]}…); "
                    f"pass {field_ref('tokenizer_pre')} NAME (e.g. {', '.join(sorted(set(CHKHSH.values()))[:6])}), "
                    f"the name convert_hf_to_gguf.py gives it")


def _token_list(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    return tokens


def _adds(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding text with special tokens, as the tokenizer does it."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bool(ids) and bos is not None and ids[0] == bos), (len(ids) > 1 and eos is not None and ids[-1] == eos)


def _walk(node):
    """Every dict inside a tokenizer.json component (Sequence members included)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def spm_scores(tokens: list[str], merges: list) -> list[float]:
    """Scores for llama.cpp's sentencepiece merge loop from BPE ``merges`` (rank order): piece -> minus the rank of
    the first merge producing it; a piece no merge produces (characters, bytes, specials) scores below them all."""
    rank: dict[str, int] = {}
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, k)
    floor = len(merges)
    return [-float(rank[t]) if t in rank else -float(floor + i) for i, t in enumerate(tokens)]


def add_spm_tokenizer(w: gguf.GGUFWriter, tokenizer) -> None:
    """tokenizer.ggml.* of a sentencepiece-style BPE ``tokenizer`` (``is_spm_bpe``): llama.cpp's ``llama`` model
    with pieces, scores (``spm_scores``) and types (added special: control; other added: user-defined;
    ``<0xXX>``: byte), the space prefix and BOS / EOS as the tokenizer adds them, special ids, chat template."""
    spec = _spec(tokenizer)
    tokens = _token_list(tokenizer)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    byte_piece = re.compile(r"<0x[0-9A-F]{2}>")
    types = [(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED) if i in added
             else gguf.TokenType.BYTE if byte_piece.fullmatch(t) else gguf.TokenType.NORMAL
             for i, t in enumerate(tokens)]
    prefix = any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in _walk(spec.get("normalizer")))
    prefix |= any(n.get("type") == "Metaspace" and n.get("prepend_scheme", "always") in ("always", "first")
                  and n.get("add_prefix_space", True) for n in _walk(spec.get("pre_tokenizer")))
    add_bos, add_eos = _adds(tokenizer)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(spm_scores(tokens, spec["model"].get("merges", [])))
    w.add_token_types(types)
    _add_special_ids(w, tokenizer)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    w.add_add_space_prefix(prefix)
    _add_chat_template(w, tokenizer)


def _add_special_ids(w: gguf.GGUFWriter, tokenizer) -> None:
    for name, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(w, f"add_{name}_token_id")(int(tid))


def _add_chat_template(w: gguf.GGUFWriter, tokenizer) -> None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)


def add_tokenizer(w: gguf.GGUFWriter, tokenizer, pre: str) -> None:
    """tokenizer.ggml.* of a byte-level BPE ``tokenizer`` (``is_byte_level_bpe``) with pre-tokenizer ``pre``:
    tokens [V], types [V] (added tokens control / user-defined), merges, special ids, chat template."""
    spec = _spec(tokenizer)
    tokens = _token_list(tokenizer)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    types = [(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED) if i in added
             else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    _add_special_ids(w, tokenizer)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    _add_chat_template(w, tokenizer)


def source_tokenizer_pre(path) -> str | None:
    """``tokenizer.ggml.pre`` of a GGUF source file (None when absent)."""
    f = open_gguf(path).fields.get("tokenizer.ggml.pre")
    return None if f is None else str(f.contents())
