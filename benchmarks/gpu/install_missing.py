"""Install the carried wheels (``.whl/``) whose distribution this Python does not already have.

The GPU image has its own torch, triton, numpy, protobuf, ...: installing a carried copy over them
(or shadowing them on PYTHONPATH) could break it, so only what is absent goes into the target dir.
Usage: ``python3 benchmarks/gpu/install_missing.py .whl /tmp/site`` then ``PYTHONPATH=/tmp/site``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def distribution(wheel: str) -> str:
    """The normalised distribution name of a wheel file name (PEP 427: ``{name}-{version}-...whl``)."""
    return re.sub(r"[-_.]+", "-", Path(wheel).name.split("-", 1)[0]).lower()


def missing(wheels: list[str], installed) -> list[str]:
    """The wheels whose distribution ``installed(name) -> bool`` says is absent."""
    return [w for w in wheels if not installed(distribution(w))]


def _installed(name: str) -> bool:
    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def main(argv: list[str]) -> int:
    wheel_dir, target = argv
    wheels = sorted(str(p) for p in Path(wheel_dir).glob("*.whl"))
    todo = missing(wheels, _installed)
    print(f"install_missing: {len(wheels) - len(todo)} already installed, installing "
          f"{[distribution(w) for w in todo]}", file=sys.stderr)
    if not todo:
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--target", target, *todo]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
