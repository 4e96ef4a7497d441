"""Errors shared by the core and the packages above it."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad command-line value: ``lightkv`` prints ``lightkv: error: <message>`` and exits with 2.

    Raise it where a command turns its options into objects, from the ``ValueError`` that conversion raised, so the
    message reaches the user in one line; any other exception keeps its traceback. It is a ``ValueError``, so code
    that calls a command's ``run`` directly and catches ``ValueError`` still does."""
