"""The pinned environment: scripts/constraints.txt, read and written by the set-up and maintenance scripts.

python scripts/pins.py for-venv FILE         FILE as this Python should install it: where torch is not
                                             installed in this venv itself (a system torch seen through
                                             --system-site-packages), without torch, triton and torch's
                                             own requirements
python scripts/pins.py without PKG FILE      FILE without PKG and the packages PKG requires (the
                                             installed PKG's metadata): the pins for a venv that tries
                                             another release of PKG (scripts/test-compat.sh)
python scripts/pins.py freeze HEADER_FILE    the pins of this venv (every distribution installed in it, or
                                             in its side folder .venv/sglang-live, but lightkv and pip),
                                             after the header in HEADER_FILE, on stdout
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
import sysconfig
from pathlib import Path

NOT_PINNED = {"lightkv", "pip"}  # the project itself, and the installer that reads the pins
#: Packages the test set-up installs --no-deps into a folder of their own (only the live SGLang servers of
#: tests/live/ have it on their path): torchvision, whose compiled ops need a CUDA torch (scripts/setup.sh).
SIDE_FOLDER = Path(__file__).resolve().parent.parent / ".venv" / "sglang-live"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_name(line: str) -> str | None:
    """The package a constraints line pins (``None`` for a comment or blank line)."""
    line = line.split("#", 1)[0].strip()
    return canonical(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]) if line else None


def requirements_of(package: str) -> set[str]:
    """The packages the installed ``package`` requires outside its extras."""
    names = set()
    for requirement in metadata.distribution(package).requires or []:
        if not re.search(r"\bextra\s*==", requirement):
            names.add(pinned_name(requirement))
    return names


def drop(lines: list[str], names: set[str]) -> list[str]:
    return [line for line in lines if pinned_name(line) not in names]


def own_distributions() -> dict[str, str]:
    """Canonical name -> version (without a local label such as ``+cpu``) of every distribution installed in
    this venv itself, not seen through --system-site-packages."""
    own = Path(sysconfig.get_paths()["purelib"]).resolve()
    return {
        canonical(dist.metadata["Name"]): dist.version.split("+", 1)[0]
        for dist in metadata.distributions()
        if Path(dist.locate_file("")).resolve() == own
    }


def torch_is_own() -> bool:
    """True unless torch is a system torch seen through --system-site-packages (no torch at all: the pins
    install it)."""
    try:
        metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return True
    return "torch" in own_distributions()


def side_distributions() -> dict[str, str]:
    """Canonical name -> version of every distribution in :data:`SIDE_FOLDER`."""
    found = metadata.distributions(path=[str(SIDE_FOLDER)]) if SIDE_FOLDER.is_dir() else []
    return {canonical(dist.metadata["Name"]): dist.version.split("+", 1)[0] for dist in found}


def freeze(header: Path) -> list[str]:
    installed = own_distributions() | side_distributions()
    pins = sorted(f"{name}=={version}" for name, version in installed.items() if name not in NOT_PINNED)
    comments = [line for line in header.read_text().splitlines() if line.startswith("#")]
    return comments + pins


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "for-venv":
        lines = Path(argv[1]).read_text().splitlines()
        if not torch_is_own():
            lines = drop(lines, {"torch", "triton"} | requirements_of("torch"))
    elif len(argv) == 3 and argv[0] == "without":
        package = canonical(argv[1])
        lines = drop(Path(argv[2]).read_text().splitlines(), {package} | requirements_of(package))
    elif len(argv) == 2 and argv[0] == "freeze":
        lines = freeze(Path(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
