"""Flag values checked where they are parsed: one line naming the flag and its range, exit 2.

Every numeric flag of every command has a ``type=`` from here, so a zero, a negative, NaN, inf or a
value of the wrong type is refused by argparse (or by a ``--config`` recipe, which converts values with
the same ``type``) before anything runs or is written::

    jaxprune finetune: error: argument --lora-rank: must be an integer >= 1 (got 0)

``Parser`` prints argparse's errors as that one line (no usage block) and refuses abbreviated flags
(``allow_abbrev=False``), so a flag and a recipe key always name the same option.

A ``UserError`` from the library names a config field (``exclude_layers = '99': ...``); :func:`error_line`
writes it with the flag instead (``--exclude-layers 99: ...``).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import yaml

from ..errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no abbreviations (sub-parsers inherit both)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def _get_values(self, action, arg_strings):
        # argparse drops a '--' value (``--lora-rank=--``) as the end of options and stores [] for a one-value flag
        if action.nargs is None and arg_strings == ["--"]:
            raise argparse.ArgumentError(action, "expected one argument (got '--')")
        return super()._get_values(action, arg_strings)


def _parse_int(text) -> int:
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"must be an integer (got {text!r})")
    if isinstance(text, float) and text.is_integer():
        return int(text)
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer (got {text!r})") from None


def _parse_float(text) -> float:
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})")
    try:
        value = float(str(text).strip()) if not isinstance(text, (int, float)) else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    return value


def int_range(lo: int | None = None, hi: int | None = None):
    """``type=`` for an integer in [lo, hi] (either bound optional)."""
    what = ("an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
            + (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")
            + (f" <= {hi}" if hi is not None and lo is None else ""))

    def parse(text) -> int:
        value = _parse_int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {what} (got {value})")
        return value
    parse.__name__ = what
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """``type=`` for a finite number in the interval given (open or closed at each end)."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    if lo is not None and hi is not None:
        what = f"a number in {left}{lo:g}, {hi:g}{right}"
    elif lo is not None:
        what = f"a number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        what = f"a number {'<' if hi_open else '<='} {hi:g}"
    else:
        what = "a finite number"

    def parse(text) -> float:
        value = _parse_float(text)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {what} (got {value:g})")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"must be {what} (got {value:g})")
        return value
    parse.__name__ = what
    return parse


POSITIVE_INT = int_range(1)
NONNEG_INT = int_range(0)
POSITIVE_FLOAT = float_range(0.0, lo_open=True)
NONNEG_FLOAT = float_range(0.0)
FRACTION = float_range(0.0, 1.0)                 # [0, 1]
FRACTION_BELOW_1 = float_range(0.0, 1.0, hi_open=True)  # [0, 1)
SEED = int_range(0, 2**32 - 1)
SEQ_LEN = int_range(2)                           # a window predicts seq_len - 1 tokens
OPEN_FRACTION = float_range(0.0, 1.0, lo_open=True, hi_open=True)  # (0, 1)
AT_LEAST_1 = float_range(1.0)


#: config fields whose flag is not ``--`` + the field with ``-`` for ``_`` (keyed by the field's last name:
#: ``MethodConfig.rank`` -> ``rank``)
FLAG_OF_FIELD = {
    "rank": "--lora-rank",                  # pretrain.MethodConfig
    "delta": "--sparse-ratio",
    "channel_ratio": "--lost-channel-ratio",
    "refresh_frac": "--mask-refresh-frac",  # pretrain SLoPe
    "interval": "--switch-interval",        # pretrain SwitchLoRA
    "descent_ratio": "--switch-descent-ratio",
    "freeze_steps": "--switch-freeze-steps",
    "axis_rules": "--axis-rule",            # sharding.MeshConfig (one flag per rule)
    "shard_rules": "--shard-rule",
    "include_paths": "--include-path",      # lm-eval
}


def flag_of(field: str) -> str:
    """The command-line flag of a config field: ``exclude_layers`` -> ``--exclude-layers``."""
    name = field.rpartition(".")[2]
    return FLAG_OF_FIELD.get(name, "--" + name.replace("_", "-"))


def _as_typed(value) -> str:
    """A value as it is typed after its flag (quoted only where a shell would need it)."""
    return shlex.quote(str(value))


def error_line(e: UserError) -> str:
    """A UserError as the command line shows it: its fields named by their flags."""
    return e.render(flag_of, _as_typed)


# ---- YAML recipes (--config): the same checks as the command line ------------------------------------------
def read_recipe(path) -> dict:
    """A ``--config`` recipe: a YAML mapping of option: value (a UserError naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}{where})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8 text; nesting too deep
        raise UserError(f"{path}: not a YAML text ({type(e).__name__})") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe is a mapping of option: value")
    return recipe


def recipe_value(action: argparse.Action, value):
    """A recipe's value for ``action`` as the command line would have it: converted by the flag's ``type``
    (YAML reads ``2e-4`` as a string), true / false for a switch, a string for a text option, a list (or one
    value) for a repeatable one; null only where the flag's default is null. ArgumentTypeError otherwise."""
    if action.nargs == 0:  # --overwrite, --no-progress, ...: their dest's value
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false (got {value!r})")
        return value
    if value is None:
        if action.default is None:
            return None
        raise argparse.ArgumentTypeError(f"must have a value (null; the default is {action.default!r})")
    if isinstance(action, argparse._AppendAction):
        return [_recipe_scalar(action, v) for v in (value if isinstance(value, list) else [value])]
    return _recipe_scalar(action, value)


def _recipe_scalar(action: argparse.Action, value):
    if action.type is not None:
        try:
            return action.type(value)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not a valid value ({e})") from None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise argparse.ArgumentTypeError(f"must be a string (got {value!r})")
    return str(value)
