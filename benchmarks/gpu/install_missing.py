"""Install, from the carried wheels (``.whl/``), each package the GPU check needs that this Python lacks
or has at a version that does not satisfy the requirement.

Why not ``pip install --no-index --find-links .whl``: the image's own torch, triton, numpy, ... must
stay (reinstalling them could break its CUDA build, and ``pip --target`` installs every dependency
anew), while a too-old package on the image (say megatron-core 0.15) must not be used silently. So
each requirement is decided here, one line per package, and only the carried wheels that are needed
go into a target dir that check.sh puts first on PYTHONPATH (verified below to win over the image).

Requirements: setup.py's ``install_requires`` and its ``dev`` extra (the test tools), minus what the
check never imports (NOT_IMPORTED); liger-kernel for the kernel table if carried (OPTIONAL); and the
``Requires-Dist`` of every wheel chosen, so a carried aiohttp brings a yarl new enough for it.
Rules, per distribution, for the intersection of all its specifiers (``plan``):
  installed and satisfies it         -> use the installed one
  else a carried wheel satisfies it  -> install the newest such wheel
  else, OPTIONAL                     -> go on without it
  else                               -> one error line; exit 1 before installing anything.
Usage: ``python3 benchmarks/gpu/install_missing.py .whl /tmp/site [setup.py]`` then
``PYTHONPATH=/tmp/site:...`` (check.sh does both).
"""

from __future__ import annotations

import ast
import enum
import importlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from importlib.metadata import distributions, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

SETUP_PY = Path(__file__).resolve().parents[2] / "setup.py"
# Declared by setup.py but imported by nothing the check runs: Megatron's timers import tensorboard
# under `try/except ImportError` and check.sh passes trainer.tensorboard=false; matplotlib is lcr plot.
NOT_IMPORTED = {"tensorboard", "matplotlib"}
# Used when present: bench_kernels.py reports the Liger row as "not installed" otherwise.
OPTIONAL = {"liger-kernel": SpecifierSet(">=0.8.5")}


class Action(enum.Enum):
    USE = "use"  # the installed version satisfies the requirement
    INSTALL = "install"  # a carried wheel goes into the target dir
    SKIP = "skip"  # optional, absent (or unsatisfied) and not carried
    MISSING = "MISSING"  # required, and no installed version or carried wheel satisfies it


@dataclass(frozen=True)
class Decision:
    name: str
    action: Action
    spec: SpecifierSet
    needed_by: tuple[str, ...]
    installed: str | None = None
    wheel: str | None = None

    def line(self) -> str:
        """One line a person reads in the device log: what was decided for this package and why."""
        want = f"{self.name}{self.spec or ' (any version)'} [{', '.join(self.needed_by)}]"
        have = f"installed {self.installed}" if self.installed else "absent"
        if self.action is Action.INSTALL:
            have += f", carried {Path(self.wheel).name}"
        elif self.action is not Action.USE:
            have += ", no carried wheel satisfies it"
        return f"{self.action.value:<8} {want}: {have}"


def satisfies(installed: str | None, spec: SpecifierSet) -> bool:
    """Whether an installed version meets ``spec``; a version PEP 440 cannot parse meets nothing."""
    try:
        return installed is not None and spec.contains(Version(installed), prereleases=True)
    except InvalidVersion:
        return False


def decide(name: str, spec: SpecifierSet, needed_by: tuple[str, ...], installed: str | None,
           wheels: list[str], optional: bool) -> Decision:
    """The rule for one distribution (see the module docstring); ``wheels`` are its carried files."""
    fields = dict(name=name, spec=spec, needed_by=needed_by, installed=installed)
    if satisfies(installed, spec):
        return Decision(action=Action.USE, **fields)
    fitting = [w for w in wheels if satisfies(str(parse_wheel_filename(Path(w).name)[1]), spec)]
    if fitting:
        newest = max(fitting, key=lambda w: parse_wheel_filename(Path(w).name)[1])
        return Decision(action=Action.INSTALL, wheel=newest, **fields)
    return Decision(action=Action.SKIP if optional else Action.MISSING, **fields)


def plan(required: dict[str, SpecifierSet], installed: dict[str, str],
         wheels: dict[str, dict[str, SpecifierSet]],
         optional: dict[str, SpecifierSet] | None = None) -> list[Decision]:
    """One decision per distribution that ``required`` or ``optional`` names or a chosen wheel requires.

    installed: name -> version on this Python; wheels: carried file -> its Requires-Dist (name ->
    specifier, markers already evaluated); specifiers may be strings (``">=0.16.1"``, ``"==1.0"``).
    A wheel's requirements can tighten a name decided earlier (megatron-core needs torch>=2.6),
    which is then decided again.
    """
    required = {canonicalize_name(n): SpecifierSet(str(s)) for n, s in required.items()}
    optional = {canonicalize_name(n): SpecifierSet(str(s)) for n, s in (optional or {}).items()}
    specs = {**required, **{n: s for n, s in optional.items() if n not in required}}
    installed = {canonicalize_name(n): v for n, v in installed.items()}
    needed_by = {name: ["check" if name in required else "optional"] for name in specs}
    by_name: dict[str, list[str]] = {}
    for wheel in wheels:
        by_name.setdefault(canonicalize_name(parse_wheel_filename(Path(wheel).name)[0]), []).append(wheel)
    decisions: dict[str, Decision] = {}
    todo = list(specs)
    while todo:
        name = todo.pop(0)
        decisions[name] = decide(name, specs[name], tuple(needed_by[name]), installed.get(name),
                                 by_name.get(name, []), needed_by[name] == ["optional"])
        if decisions[name].action is not Action.INSTALL:
            continue
        for dep, spec in wheels[decisions[name].wheel].items():
            dep = canonicalize_name(dep)
            merged = specs.get(dep, SpecifierSet()) & spec
            requirers = needed_by.setdefault(dep, [])
            if name in requirers and merged == specs[dep]:
                continue  # nothing new: this wheel was already counted with this specifier
            specs[dep] = merged
            if name not in requirers:
                requirers.append(name)
            todo.append(dep)
    return [decisions[name] for name in specs]


def setup_requirements(setup_py: Path = SETUP_PY) -> dict[str, SpecifierSet]:
    """setup.py's install_requires and dev extra, minus NOT_IMPORTED (read, not executed)."""
    lists = {}
    for node in ast.walk(ast.parse(setup_py.read_text())):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            lists[node.arg] = ast.literal_eval(node.value)
    requirements = [Requirement(r) for r in lists["install_requires"] + lists["extras_require"]["dev"]]
    return {canonicalize_name(r.name): r.specifier for r in requirements
            if canonicalize_name(r.name) not in NOT_IMPORTED}


def wheel_requirements(wheel: Path) -> dict[str, SpecifierSet]:
    """A wheel's Requires-Dist that apply to this Python without extras: canonical name -> specifier."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(archive.read(metadata).decode())
    requirements = [Requirement(line) for line in headers.get_all("Requires-Dist") or []]
    out: dict[str, SpecifierSet] = {}
    for r in requirements:
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            name = canonicalize_name(r.name)
            out[name] = out.get(name, SpecifierSet()) & r.specifier
    return out


def installed_versions() -> dict[str, str]:
    """Canonical name -> version of each distribution on sys.path; the first found wins, as in imports."""
    found: dict[str, str] = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def install(wheels: list[str], target: Path) -> int:
    """pip-install the chosen wheels, and only them, into ``target`` (replacing an earlier copy)."""
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                           "--target", str(target), *wheels]).returncode


def shadowed(chosen: list[Decision], target: Path) -> list[str]:
    """The installed wheels that do not win with ``target`` first on sys.path (as check.sh sets it)."""
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    wrong = []
    for d in chosen:
        want = str(parse_wheel_filename(Path(d.wheel).name)[1])
        if Version(version(d.name)) != Version(want):
            wrong.append(f"{d.name}: {version(d.name)} is found first, not the installed {want}")
    return wrong


def main(argv: list[str]) -> int:
    """``WHEEL_DIR TARGET [SETUP_PY]``: exit 0 once every required package is usable with TARGET first."""
    wheel_dir, target = Path(argv[0]), Path(argv[1])
    setup_py = Path(argv[2]) if len(argv) > 2 else SETUP_PY
    carried = {str(w): wheel_requirements(w) for w in sorted(wheel_dir.glob("*.whl"))}
    decisions = plan(setup_requirements(setup_py), installed_versions(), carried, OPTIONAL)
    for d in decisions:
        print(f"install_missing: {d.line()}")
    missing = [d.name for d in decisions if d.action is Action.MISSING]
    if missing:
        print(f"install_missing: error: {', '.join(missing)} not installed at a fitting version and "
              f"not carried in {wheel_dir}/ (add to benchmarks/gpu/fetch_wheels.sh)")
        return 1
    chosen = [d for d in decisions if d.action is Action.INSTALL]
    if chosen and install([d.wheel for d in chosen], target) != 0:
        print(f"install_missing: error: pip could not install the carried wheels into {target}")
        return 1
    wrong = shadowed(chosen, target)
    for line in wrong:
        print(f"install_missing: error: {line}")
    print(f"install_missing: {len(chosen)} installed into {target}, "
          f"{sum(d.action is Action.USE for d in decisions)} used as installed")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
