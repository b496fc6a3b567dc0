"""`jaxprune <command>`: convert, export, eval, generate, finetune, prune, pretrain.

Bad input prints one line on stderr and exits with code 2 (no traceback).
With ``--json`` the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .commands.finetune import add_finetune_parser
from .commands.model_io import add_model_io_parsers
from .commands.pretrain import add_pretrain_parser
from .commands.prune import add_prune_parser
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_io_parsers(sub)
    add_finetune_parser(sub)
    add_prune_parser(sub)
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
