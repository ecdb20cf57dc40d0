"""The prepared GPU check (benchmarks/gpu/): the installer's decisions for simulated images, a real
install that overrides a too-old package, and a dry run of check.sh on CPU that reaches its end."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"
MEGATRON_WHEEL = "megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
PSUTIL_WHEEL = "psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl"
PACKAGING_WHEEL = "packaging-26.4-py3-none-any.whl"
# What the bare CUDA image has (the device README), with what transformers brings along.
IMAGE = {"torch", "triton", "transformers", "safetensors", "pytest", "pyyaml", "nvidia-ml-py",
         "tokenizers", "numpy"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


im = _load("install_missing")


def _by_name(decisions) -> dict:
    return {d.name: d for d in decisions}


def test_simulated_image_present_absent_and_too_old():
    """torch fits, psutil is absent, megatron-core 0.15 and packaging 24.1 are too old (the latter
    only for the carried megatron-core's Requires-Dist), numpy is carried but the image's fits."""
    wheels = {MEGATRON_WHEEL: {"torch": SpecifierSet(">=2.6.0"), "numpy": SpecifierSet(""),
                               "packaging": SpecifierSet(">=24.2")},
              PSUTIL_WHEEL: {}, PACKAGING_WHEEL: {}, "numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl": {}}
    installed = {"torch": "2.9.1+cu128", "megatron-core": "0.15.0", "packaging": "24.1", "numpy": "1.26.4"}
    decisions = im.plan({"torch": ">=2.4", "megatron-core": ">=0.16.1", "psutil": ""}, installed, wheels)

    got = {name: (d.action, d.wheel) for name, d in _by_name(decisions).items()}
    assert got == {"torch": (im.Action.USE, None), "megatron-core": (im.Action.INSTALL, MEGATRON_WHEEL),
                   "psutil": (im.Action.INSTALL, PSUTIL_WHEEL), "numpy": (im.Action.USE, None),
                   "packaging": (im.Action.INSTALL, PACKAGING_WHEEL)}
    lines = [d.line() for d in decisions]
    assert lines[0] == "use      torch>=2.4,>=2.6.0 [check, megatron-core]: installed 2.9.1+cu128"
    assert lines[1] == f"install  megatron-core>=0.16.1 [check]: installed 0.15.0, carried {MEGATRON_WHEEL}"
    assert lines[2] == f"install  psutil (any version) [check]: absent, carried {PSUTIL_WHEEL}"
    assert lines[4] == f"install  packaging>=24.2 [megatron-core]: installed 24.1, carried {PACKAGING_WHEEL}"


def test_a_carried_wheels_requirement_can_make_an_installed_package_insufficient():
    """setup.py accepts torch 2.5, but the carried megatron-core 0.16.1 needs torch>=2.6, and no torch
    is carried: the planner says so rather than letting Megatron fail at import on the device."""
    wheels = {MEGATRON_WHEEL: {"torch": SpecifierSet(">=2.6.0")}}
    decisions = _by_name(im.plan({"torch": ">=2.4", "megatron-core": ">=0.16.1"}, {"torch": "2.5.1"}, wheels))
    assert decisions["torch"].action is im.Action.MISSING
    assert decisions["torch"].needed_by == ("check", "megatron-core")
    assert decisions["torch"].line() == ("MISSING  torch>=2.4,>=2.6.0 [check, megatron-core]: "
                                         "installed 2.5.1, no carried wheel satisfies it")


def test_no_fitting_wheel_is_missing_unless_optional_and_the_newest_fitting_wheel_wins():
    old, new = "megatron_core-0.15.0-py3-none-any.whl", "megatron_core-0.16.1-py3-none-any.whl"
    only_old = _by_name(im.plan({"megatron-core": ">=0.16.1", "psutil": ""}, {}, {old: {}}))
    assert only_old["megatron-core"].action is im.Action.MISSING  # a carried wheel that is too old
    assert only_old["psutil"].action is im.Action.MISSING  # no wheel at all
    both = _by_name(im.plan({"megatron-core": "==0.16.1"}, {"megatron-core": "0.15.0"}, {old: {}, new: {}}))
    assert both["megatron-core"].wheel == new
    optional = _by_name(im.plan({}, {}, {}, optional={"liger-kernel": ">=0.8.5"}))
    assert optional["liger-kernel"].action is im.Action.SKIP
    assert optional["liger-kernel"].line() == ("skip     liger-kernel>=0.8.5 [optional]: absent, "
                                               "no carried wheel satisfies it")


def test_names_are_normalised_and_unparsable_installed_versions_are_replaced():
    wheel = "latex2sympy2_extended-1.11.0-py3-none-any.whl"
    decisions = _by_name(im.plan({"Latex2Sympy2_Extended": "==1.11.0"}, {"latex2sympy2-extended": "unknown"},
                                 {wheel: {}}))
    assert decisions["latex2sympy2-extended"].action is im.Action.INSTALL
    assert decisions["latex2sympy2-extended"].wheel == wheel


def test_requirements_come_from_setup_py_minus_what_the_check_never_imports():
    required = im.setup_requirements()
    assert required["megatron-core"] == SpecifierSet(">=0.16.1")
    assert required["pytest"] == SpecifierSet(">=8")
    assert {"psutil", "aiohttp", "math-verify", "pytest-timeout", "triton"} <= set(required)
    assert not {"tensorboard", "matplotlib"} & set(required)


def test_fetch_list_pins_every_requirement_the_image_lacks_at_a_fitting_version():
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][\w.]*)", (GPU / "fetch_wheels.sh").read_text()))
    pins = {im.canonicalize_name(name): version for name, version in pins.items()}
    for name, spec in {**im.setup_requirements(), **im.OPTIONAL}.items():
        if name not in IMAGE:
            assert name in pins, f"{name} is required, not on the image and not fetched"
            assert spec.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {spec}"
    for script in ("fetch_wheels.sh", "check.sh"):
        proc = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A real pure-Python wheel (PEP 427) with module ``name`` whose __version__ is ``version``."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\n",
             f"{info}/METADATA": metadata + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for member, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(text.encode())}\n")
    files[f"{info}/RECORD"] = "".join(record) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def _pip_install(wheel: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True)


def _setup_py(path: Path, requires: list[str]) -> Path:
    path.write_text(f"setup(install_requires={requires!r}, extras_require={{'dev': []}})\n")
    return path


def _run_installer(tmp_path: Path, image: Path, wheels: Path, setup_py: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(image)}  # the "image": this venv with image/ in front
    command = [sys.executable, str(GPU / "install_missing.py"), wheels, tmp_path / "site", setup_py]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_installer_overrides_a_too_old_installed_package_and_the_carried_one_wins(tmp_path):
    """lcrprobe 1.0 is on the image, 2.0 and its absent dependency are carried: both are installed,
    and with the target first on PYTHONPATH (as check.sh sets it) Python imports 2.0."""
    image, wheels = tmp_path / "image", tmp_path / "wheels"
    wheels.mkdir()
    _pip_install(_wheel(tmp_path, "lcrprobe", "1.0"), image)
    _wheel(wheels, "lcrprobe", "2.0", requires=("lcrprobedep>=1", "lcrprobe_unused; extra == 'x'"))
    _wheel(wheels, "lcrprobedep", "1.5")
    proc = _run_installer(tmp_path, image, wheels, _setup_py(tmp_path / "setup.py", ["lcrprobe>=2"]))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.removeprefix("install_missing: ") for line in proc.stdout.splitlines()]
    assert "install  lcrprobe>=2 [check]: installed 1.0, carried lcrprobe-2.0-py3-none-any.whl" in lines
    assert "install  lcrprobedep>=1 [lcrprobe]: absent, carried lcrprobedep-1.5-py3-none-any.whl" in lines
    assert not any("lcrprobe-unused" in line for line in lines)  # an extra's requirement is not needed
    show = ("import lcrprobe, lcrprobedep; from importlib.metadata import version; "
            "print(lcrprobe.__version__, version('lcrprobe'), lcrprobedep.__version__)")
    probe = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{image}"})
    assert probe.stdout.split() == ["2.0", "2.0", "1.5"], probe.stderr


def test_installer_stops_before_installing_when_a_requirement_is_not_carried(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "lcrprobe", "2.0")
    proc = _run_installer(tmp_path, tmp_path / "image", wheels,
                          _setup_py(tmp_path / "setup.py", ["lcrprobe", "lcrabsent>=1"]))
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == (f"install_missing: error: lcrabsent not installed at a fitting "
                                            f"version and not carried in {wheels}/ (add to "
                                            f"benchmarks/gpu/fetch_wheels.sh)")
    assert not (tmp_path / "site").exists()


@pytest.mark.e2e
def test_dry_run_of_check_sh_reaches_its_end_on_cpu(tmp_path):
    """Every step of the device command on this Python: install (all present here), collection of the
    GPU tests, one small training step, a one-shape kernel table; ~1 minute on 2 cores."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SITE_DIR": str(tmp_path / "site"), "WHEELS": str(tmp_path / "none"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3 is this venv's
    proc = subprocess.run(["bash", str(GPU / "check.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=540)

    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    last = proc.stdout.splitlines()[-1]
    assert re.fullmatch(r"== check\.sh end: install=0 pytest=0 e2e=0 kernels=0 \(dry run\) \d+s", last), last
    collected = re.search(r"(\d+)/\d+ tests collected", (out / "pytest_gpu.log").read_text())
    assert collected and int(collected.group(1)) >= 5  # the GPU tests of kernels, parity and training
    metrics = [json.loads(line) for line in (out / "e2e_metrics.jsonl").read_text().splitlines()]
    assert any(m["step"] == 1 and "loss" in m for m in metrics)  # one training step was taken
    profile = (out / "e2e_profile.md").read_text()  # lcr profile's report of that step
    assert "| forward_backward |" in profile and "NVML unavailable" in profile
    assert "megatron-core 0.16.1" in (out / "env.txt").read_text()
    assert json.loads((out / "kernels_cpu.json").read_text())
