"""Atomic writes: a temp file in the target's directory, then ``os.replace`` (never half a file);
output directories written to a temp dir and moved into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError, field_ref


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: output already exists (pass {field_ref('overwrite')} to replace it)")
    if not out_dir.parent.exists():
        raise UserError(f"{out_dir.parent}: parent directory does not exist")


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished temp dir into place (the old one is removed only once the new one is complete)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
