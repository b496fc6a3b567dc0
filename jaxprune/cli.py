"""`jaxprune <command>`: convert, export, eval, generate, finetune, prune.

Bad input prints one line on stderr and exits with code 2 (no traceback).
With ``--json`` the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight / compute dtype (default: as stored; GGUF: float32)")


def cmd_convert(a) -> dict:
    from . import checkpoint, load
    from .hf import check_output_dir

    check_output_dir(Path(a.out), a.overwrite)
    model = load.load_model(a.src, a.dtype)
    tok = load.load_tokenizer(a.src, required=False)
    checkpoint.save_model(model, Path(a.out), tokenizer=tok, overwrite=a.overwrite)
    return {"out": str(a.out), "params": model.config.num_params()}


def cmd_export(a) -> dict:
    from . import hf, load
    from .hf import check_output_dir

    check_output_dir(Path(a.out), a.overwrite)
    model = load.load_model(a.model, a.dtype)
    tok = load.load_tokenizer(a.model, required=False)
    hf.export_hf(model, Path(a.out), tokenizer=tok, overwrite=a.overwrite)
    return {"out": str(a.out), "uniform": model.config.is_uniform}


def cmd_eval(a) -> dict:
    from . import evaluate, load

    text = evaluate.read_text(a.text)
    model = load.load_model(a.model, a.dtype)
    tokens = evaluate.tokenize_text(load.load_tokenizer(a.model), text)
    res = evaluate.perplexity(model, tokens, seq_len=a.seq_len, batch_size=a.batch_size, max_tokens=a.max_tokens,
                              progress=not a.json)
    res["params"] = model.config.num_params()
    if not a.json:
        print(f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['windows']} windows of "
              f"{a.seq_len}); {res['tokens_per_s']:.0f} tokens/s")
    return res


def cmd_generate(a) -> dict:
    from . import load
    from .generate import generate

    model = load.load_model(a.model, a.dtype)
    tok = load.load_tokenizer(a.model)
    ids = tok(a.prompt)["input_ids"]
    out = generate(model, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                   eos_token_id=tok.eos_token_id)
    text = tok.decode(out, skip_special_tokens=True)
    if not a.json:
        print(a.prompt + text)
    return {"prompt": a.prompt, "completion": text, "token_ids": [int(t) for t in out]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF dir or .gguf -> jaxprune checkpoint")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    _model_args(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export", help="jaxprune checkpoint / run dir -> HF dir loadable by transformers")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    _model_args(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("eval", help="perplexity on a text file (see README: protocol)")
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=None)
    _model_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="greedy / sampled generation with a KV cache")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    _model_args(p)
    p.set_defaults(fn=cmd_generate)

    from .train_cli import add_finetune_parser
    add_finetune_parser(sub)
    from .prune.cli import add_prune_parser
    add_prune_parser(sub)
    from .pretrain.cli import add_pretrain_parser
    add_pretrain_parser(sub)

    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recipes (--config) must know which flags were given explicitly
    try:
        result = args.fn(args)
    except UserError as e:
        print(f"jaxprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxprune {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
