"""Errors shared by the core and the packages above it."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad command-line value: ``lightkv`` prints ``lightkv: error: <message>`` and exits with 2.

    Raise it where a command turns its options into objects, from the ``ValueError`` that conversion raised, so the
    message reaches the user in one line; any other exception keeps its traceback. It is a ``ValueError``, so code
    that calls a command's ``run`` directly and catches ``ValueError`` still does."""


def error_line(error: Exception, width: int) -> str:
    """An error in one line, for a table of rejected configs: its type and the first non-blank line of its message,
    cut to ``width`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:width] if lines else ''}"
