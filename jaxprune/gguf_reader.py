"""One parsed ``gguf.GGUFReader`` per GGUF file version, shared by the loader and the tokenizer code.

The reader walks every metadata array element by element (Gemma 3's 262k-token vocabulary takes ~20 s), and
``load`` asks for the architecture, the tokenizer and the tensors of the same file; this module parses it once.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import gguf

from .errors import UserError


def open_gguf(path) -> gguf.GGUFReader:
    """The file's ``GGUFReader`` (a one-line UserError for a file that is not GGUF), cached on path, mtime and size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read GGUF ({e.strerror})") from None
    return _open_gguf(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / struct errors / OSError on bad files
        raise UserError(f"{path}: cannot read GGUF ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
