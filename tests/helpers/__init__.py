"""Test helpers: the float64 oracle, input builders, tiny models, the SGLang child runner and tolerances.

``pyproject.toml`` puts ``tests/`` on pytest's path, so tests import them as ``from helpers.oracle import ...``.
"""
