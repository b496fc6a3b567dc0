"""The one exception type that the CLI turns into a single line on stderr and exit code 2.

A library error names the config field (or argument) at fault, not a command-line flag::

    raise UserError(f"layer {i} out of range 0..{n - 1}", field="exclude_layers", value=exclude)

reads ``exclude_layers = '99': layer 99 out of range 0..1`` from Python; the command layer
(``commands.flags.error_line``) writes the same error as ``--exclude-layers 99: layer 99 out of range 0..1``.
Another field named inside the message is written ``field_ref(name)``: ``name`` from Python, its flag on the
command line. A message that starts with ``field_ref(field)`` gets no ``field = value:`` head.
"""

from __future__ import annotations

from typing import Any, Callable

_MARK = "\x00"  # around a field_ref in the stored message; never shown


class _NoValue:
    def __reduce__(self):  # pickles as this module's one instance (default Exception pickling keeps __dict__)
        return "_NO_VALUE"

    def __repr__(self):
        return "<no value>"


_NO_VALUE = _NoValue()


def field_ref(name: str) -> str:
    """A config field named inside a UserError message (``name`` from Python, ``--flag`` on the command line)."""
    return f"{_MARK}{name}{_MARK}"


class UserError(Exception):
    """Bad input from the user (path, config, data). The message is one line naming the problem.

    ``field``: the config field / argument the message is about (snake_case, e.g. ``"exclude_layers"`` or
    ``"MethodConfig.rank"``); ``value``: its bad value (optional)."""

    def __init__(self, message: str = "", *, field: str | None = None, value: Any = _NO_VALUE):
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value

    @property
    def has_value(self) -> bool:
        return self.value is not _NO_VALUE

    def render(self, name: Callable[[str], str] | None = None, shown: Callable[[Any], str] = str) -> str:
        """The one line: naming config fields (``name=None``: ``str(e)``), or with ``name`` (field -> flag) and
        ``shown`` (value -> text) as the command line writes it."""
        cli = name is not None
        name = name or (lambda f: f)
        parts = self.message.split(_MARK)
        text = "".join(name(p) if i % 2 else p for i, p in enumerate(parts))
        if self.field is None or self.message.startswith(field_ref(self.field)):
            return text
        head = name(self.field)
        if self.has_value:
            head += f" {shown(self.value)}" if cli else f" = {self.value!r}"
        return f"{head}: {text}"

    def __str__(self) -> str:
        return self.render()
