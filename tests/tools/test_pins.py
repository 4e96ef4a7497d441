"""The pinned environment (scripts/constraints.txt, scripts/pins.py): what the set-up installs is what is pinned."""

from __future__ import annotations

import sys
from pathlib import Path

import pins
import pytest

ROOT = Path(__file__).resolve().parents[2]

CONSTRAINTS = ROOT / "scripts" / "constraints.txt"


def pinned() -> dict[str, str]:
    versions = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name = pins.pinned_name(line)
        if name is not None:
            assert line.count("==") == 1, f"constraints.txt: {line!r} is not an exact pin"
            assert name not in versions, f"constraints.txt pins {name} twice"
            versions[name] = line.split("==", 1)[1].strip()
    return versions


def test_every_installed_package_is_pinned_at_its_installed_version():
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in the set-up's venv")
    versions = pinned()
    installed = pins.own_distributions()
    unpinned = sorted(set(installed) - set(versions) - pins.NOT_PINNED)
    assert not unpinned, f"installed but not pinned in constraints.txt (rerun scripts/refresh-pins.sh): {unpinned}"
    differ = {name: (installed[name], pin) for name, pin in versions.items() if installed.get(name, pin) != pin}
    assert not differ, f"installed vs pinned versions differ: {differ}"


def test_constraints_lines_are_read_as_the_packages_they_pin():
    assert pins.pinned_name("Torch==2.13.0") == "torch"
    assert pins.pinned_name("typing_extensions==4.15.0  # why") == "typing-extensions"
    assert pins.pinned_name("triton==3.9.0; platform_system == 'Linux'") == "triton"
    assert pins.pinned_name("# a comment") is None and pins.pinned_name("   ") is None


def test_without_a_package_drops_it_and_what_it_requires():
    lines = CONSTRAINTS.read_text().splitlines()
    dropped = {"transformers"} | pins.requirements_of("transformers")
    kept = {pins.pinned_name(line) for line in pins.drop(lines, dropped)}
    assert "transformers" not in kept and "tokenizers" not in kept and "huggingface-hub" not in kept
    assert "torch" in kept and "hypothesis" in kept
    assert all(line.startswith("#") for line in lines[:3])  # the header survives
