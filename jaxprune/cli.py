"""`jaxprune <command>`: convert, export, eval, lm-eval, generate, finetune, prune, pretrain.

Bad input prints one line on stderr and exits with code 2 (no traceback).
With ``--json`` the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .commands.finetune import add_finetune_parser
from .commands.flags import Parser, error_line
from .commands.lm_eval import add_lm_eval_parser
from .commands.loram import add_loram_parser
from .commands.model_io import add_model_io_parsers
from .commands.pretrain import add_pretrain_parser
from .commands.prune import add_prune_parser
from .errors import UserError
from .plugins import load_entry_point_plugins, load_plugin, plugin_args
from .runs import release_run_dirs
from .train import PREEMPTED_EXIT, CommandSignals, Preempted, StoppedEarly

#: exit codes: 0 done; 2 bad input (one line on stderr); 74 an output could not be written (disk full,
#: read-only); 75 stopped by SIGTERM / SIGINT (in training after saving a checkpoint, elsewhere at once with
#: nothing half-written: rerun with --resume); 130 a second SIGINT during training's checkpoint
IO_ERROR_EXIT = 74


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_io_parsers(sub)
    add_lm_eval_parser(sub)
    add_finetune_parser(sub)
    add_prune_parser(sub)
    add_pretrain_parser(sub)
    add_loram_parser(sub)
    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # plugins first: their methods are among the parser's choices
        load_entry_point_plugins()
        for spec in plugin_args(argv):
            load_plugin(spec)
    except UserError as e:
        print(f"jaxprune: error: {error_line(e)}", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad flag (one line already on stderr), or --help
        return e.code if isinstance(e.code, int) else 0
    args.argv = argv  # recipes (--config) must know which flags were given explicitly
    try:
        with CommandSignals():
            result = args.fn(args)
    except StoppedEarly as e:
        out = getattr(args, "out", None)
        again = ("rerun the same command with --resume to finish" if out and (Path(out) / "run.json").exists()
                 else "rerun the same command")
        print(f"jaxprune {args.command}: {e}; {again}", file=sys.stderr)
        return PREEMPTED_EXIT
    except UserError as e:
        print(f"jaxprune {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"jaxprune {args.command}: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except OSError as e:  # ENOSPC, EROFS, EACCES, ...: outputs are written atomically, earlier ones stay intact
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"jaxprune {args.command}: error: cannot write{where}: {e.strerror or e}", file=sys.stderr)
        return IO_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"jaxprune {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        release_run_dirs()
    if args.json:
        print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
