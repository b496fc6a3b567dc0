"""A registered method's options dataclass as a group of checked flags, and back.

Each field made with ``prune.registry.option`` becomes ``--field-name`` with its help, its type and range
checked by ``flags`` (one line, exit 2) and its default; :func:`options_from_args` builds the dataclass from
the parsed namespace. A flag two methods share is added once (by the first)."""

from __future__ import annotations

import argparse
import dataclasses

from .flags import float_range, int_range


def _flag_type(f: dataclasses.Field):
    m, kind = f.metadata, str(f.type)
    if m.get("choices") is not None:
        return None
    if kind.startswith("int"):
        return int_range(m.get("lo"), m.get("hi"))
    if kind.startswith("float"):
        return float_range(m.get("lo"), m.get("hi"), lo_open=m.get("lo_open", False), hi_open=m.get("hi_open", False))
    return str


def add_options_group(p: argparse.ArgumentParser, title: str, options_cls, owners: dict[str, set[str]],
                      method: str) -> None:
    """Add ``options_cls``'s fields as flags in a group ``title``; ``owners[dest]`` collects the methods a flag
    belongs to (a flag given with another ``--method`` is refused by :func:`check_foreign_options`)."""
    g = p.add_argument_group(title)
    for f in dataclasses.fields(options_cls):
        owners.setdefault(f.name, set()).add(method)
        if len(owners[f.name]) > 1:
            continue  # added by an earlier method
        flag = "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            g.add_argument(flag, action="store_true", default=f.default, help=f.metadata.get("help"))
        else:
            g.add_argument(flag, type=_flag_type(f), choices=f.metadata.get("choices"), default=f.default,
                           help=f.metadata.get("help"))


def options_from_args(options_cls, args: argparse.Namespace):
    """The options dataclass from the parsed flags (None if the method has none)."""
    if options_cls is None:
        return None
    return options_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options_cls)})


def foreign_option(owners: dict[str, set[str]], given: set[str], method: str) -> str | None:
    """The first flag given on the command line that only other methods take, as ``'--flag (m1, m2)'``."""
    for dest, methods in owners.items():
        if dest in given and method not in methods:
            return f"--{dest.replace('_', '-')} is an option of {', '.join(sorted(methods))}"
    return None
