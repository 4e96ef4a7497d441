"""The transformers releases the adapter is tested against, and the warning it gives outside them.

The adapter relies on transformers internals (attention and mask interfaces, the cache classes, each family's
forward signature), which change between minor releases. ``scripts/test-compat.sh`` runs the adapter's tests
on the oldest and newest release below (and on the pinned one); the README's support table is its output.
"""

from __future__ import annotations

import warnings

import transformers
from packaging.version import Version

#: Oldest and newest transformers release the adapter's tests pass on (both included).
TESTED_TRANSFORMERS = ("5.0.0", "5.24.0")


def warn_if_untested(version: str | None = None) -> bool:
    """Warn (``UserWarning``) if ``version`` (default: the installed transformers) lies outside
    :data:`TESTED_TRANSFORMERS`; returns whether it does."""
    version = transformers.__version__ if version is None else version
    oldest, newest = TESTED_TRANSFORMERS
    if Version(oldest) <= Version(version) <= Version(newest):
        return False
    warnings.warn(
        f"lightkv's Transformers adapter is tested with transformers {oldest} to {newest}, and this is "
        f"{version}: it hooks transformers internals, so check its outputs (scripts/test-compat.sh {version} "
        f"runs the adapter's tests on it) or install a tested release",
        UserWarning,
        stacklevel=3,
    )
    return True
