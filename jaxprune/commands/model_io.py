"""`jaxprune convert | export | eval | generate`: models in and out, perplexity, generation."""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint, evaluate, gguf_io, gguf_vocab, hf, load
from ..errors import UserError
from ..fileio import check_output_dir
from ..generate import generate
from ..weights import block_sparse_linears, set_linear_impl
from .common import add_impl_arg, add_model_args
from .flags import NONNEG_FLOAT, NONNEG_INT, POSITIVE_INT, SEED, SEQ_LEN


def cmd_convert(a) -> dict:
    check_output_dir(Path(a.out), a.overwrite)
    model = load.load_model(a.src, a.dtype)
    tok = load.load_tokenizer(a.src, required=False)
    checkpoint.save_model(model, Path(a.out), tokenizer=tok, overwrite=a.overwrite)
    return {"out": str(a.out), "params": model.config.num_params()}


def cmd_export(a) -> dict:
    out = Path(a.out)
    if a.format == "vllm" and a.pad:
        raise UserError("--pad applies to --format hf and gguf (--format vllm keeps per-layer widths)")
    if a.format == "gguf" and out.suffix != ".gguf":
        raise UserError(f"{out}: --format gguf writes one file; name it *.gguf")
    check_output_dir(out, a.overwrite)
    model = load.load_model(a.model, a.dtype)
    tok = load.load_tokenizer(a.model, required=False)
    cfg = model.config
    res = {"out": str(out), "format": a.format, "uniform": cfg.is_uniform, "params": cfg.num_params()}
    if a.format == "gguf":
        pre = a.tokenizer_pre
        kind, src = load.resolve(a.model)
        if pre is None and kind == "gguf":  # a GGUF source names its own pre-tokenizer
            pre = gguf_vocab.source_tokenizer_pre(src)
        res.update(gguf_io.export_gguf(model, out, tokenizer=tok, outtype=a.outtype, overwrite=a.overwrite,
                                       tokenizer_pre=pre, pad=a.pad))
        if pre is not None and a.tokenizer_pre is None and res["tokenizer"] and res["tokenizer_pre_from"] == "given":
            res["tokenizer_pre_from"] = "source gguf"
    else:
        if a.format == "vllm":
            hf.export_vllm(model, out, tokenizer=tok, overwrite=a.overwrite)
            res.setdefault("notes", []).append(f"serve it with: vllm serve {out} --trust-remote-code (the DeciLM "
                                               "config class ships in the directory)")
        else:
            hf.export_hf(model, out, tokenizer=tok, overwrite=a.overwrite, pad=a.pad)
        res["bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        res["stored_params"] = hf.config_from_hf_json(json.loads((out / "config.json").read_text())).num_params()
    res["padded_fraction"] = res["stored_params"] / res["params"] - 1.0
    if not a.json:
        pad = f", {100 * res['padded_fraction']:.1f}% zero padding" if res["padded_fraction"] > 0 else ""
        tok_note = (f"; llama.cpp pre-tokenizer {res['tokenizer_pre']!r} ({res['tokenizer_pre_from']})"
                    if res.get("tokenizer") else "")
        arch = f" {res['arch']}" if a.format == "gguf" else ""
        print(f"wrote {out} ({a.format}{arch}, {res['stored_params']:,} parameters stored for {res['params']:,}{pad}; "
              f"{res['bytes'] / 1e6:.1f} MB of weights{tok_note})")
        for note in res.get("notes", ()):
            print(f"note: {note}")
    return res


def cmd_eval(a) -> dict:
    text = evaluate.read_text(a.text) if a.text else evaluate.read_dataset_text(a.dataset)
    model = load.load_model(a.model, a.dtype)
    impl = set_linear_impl(model, a.impl, inference=True)
    tokens = evaluate.tokenize_text(load.load_tokenizer(a.model), text)
    res = evaluate.perplexity(model, tokens, seq_len=a.seq_len, batch_size=a.batch_size, max_tokens=a.max_tokens,
                              progress=not a.json)
    res["params"] = model.config.num_params()
    res["impl"] = impl
    res["block_sparse_linears"] = len(block_sparse_linears(model))
    if not a.json:
        print(f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['windows']} windows of "
              f"{a.seq_len}); {res['tokens_per_s']:.0f} tokens/s")
    return res


def cmd_generate(a) -> dict:
    model = load.load_model(a.model, a.dtype)
    impl = set_linear_impl(model, a.impl, inference=True)
    tok = load.load_tokenizer(a.model)
    ids = tok(a.prompt)["input_ids"]
    out = generate(model, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                   eos_token_id=tok.eos_token_id)
    text = tok.decode(out, skip_special_tokens=True)
    if not a.json:
        print(a.prompt + text)
    return {"prompt": a.prompt, "completion": text, "token_ids": [int(t) for t in out], "impl": impl,
            "block_sparse_linears": len(block_sparse_linears(model))}


def add_model_io_parsers(sub) -> None:
    p = sub.add_parser("convert", help="HF dir or .gguf -> jaxprune checkpoint")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    add_model_args(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export", help="model -> stock-transformers HF dir, GGUF file or vLLM DeciLM dir")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--format", choices=("hf", "gguf", "vllm"), default="hf",
                   help="hf: stock transformers model of the family (layers of one width); gguf: one file in the "
                        "family's llama.cpp arch (llama, qwen2, qwen3, gemma3, phi3; LLaMA / Mistral layers of "
                        "different widths as 'deci'); vllm: DeciLM config with per-layer widths")
    p.add_argument("--pad", action="store_true",
                   help="hf, gguf: zero-pad layers of different widths to the widest (same logits, dense size)")
    p.add_argument("--outtype", choices=gguf_io.OUTTYPES, default="f16",
                   help="gguf: weight type of 2-D tensors (f32, f16, q8_0 written here; q4_0, q4_k_m, ... by "
                        "llama.cpp's own quantizer, which needs llama-cpp-cffi)")
    p.add_argument("--tokenizer-pre", default=None,
                   help="gguf: llama.cpp's pre-tokenizer name (e.g. smollm, llama-bpe, qwen2); default: the GGUF "
                        "source's own, else found as llama.cpp's convert_hf_to_gguf.py finds it")
    add_model_args(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("eval", help="perplexity on a text file or a datasets dataset (see README: protocol)")
    p.add_argument("model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a .txt file or a directory of them")
    src.add_argument("--dataset", metavar="NAME[:CONFIG][:SPLIT]",
                     help="a datasets dataset, e.g. 'wikitext:wikitext-2-raw-v1:test' or "
                          "'ptb_text_only:penn_treebank:test' (hub: needs network), or a local"
                          " .jsonl/.csv/.parquet/.txt file (FILE[:SPLIT]) or dir")
    p.add_argument("--seq-len", type=SEQ_LEN, default=512)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=4)
    p.add_argument("--max-tokens", type=SEQ_LEN, default=None)
    add_model_args(p)
    add_impl_arg(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="greedy / sampled generation with a KV cache")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=NONNEG_INT, default=64)
    p.add_argument("--temperature", type=NONNEG_FLOAT, default=0.0)
    p.add_argument("--seed", type=SEED, default=0)
    add_model_args(p)
    add_impl_arg(p)
    p.set_defaults(fn=cmd_generate)
