"""The prepared GPU check (benchmarks/gpu/): which carried wheels it installs, and that its scripts parse."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"


def _install_missing():
    spec = importlib.util.spec_from_file_location("install_missing", GPU / "install_missing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheel_file_names_give_normalised_distribution_names():
    dist = _install_missing().distribution
    assert dist(".whl/megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl") == "megatron-core"
    assert dist("tensorboard_data_server-0.7.2-py3-none-any.whl") == "tensorboard-data-server"
    assert dist("Markdown-3.11.3-py3-none-any.whl") == "markdown"
    assert dist("antlr4_python3_runtime-4.13.2-py3-none-any.whl") == "antlr4-python3-runtime"


def test_only_absent_distributions_are_installed():
    module = _install_missing()
    wheels = ["a/pytest_timeout-2.4.0-py3-none-any.whl", "a/liger_kernel-0.8.5-py3-none-any.whl",
              "a/math_verify-0.9.0-py3-none-any.whl"]
    assert module.missing(wheels, {"pytest-timeout", "math-verify"}.__contains__) == [wheels[1]]
    # Against this interpreter: pytest is installed (it runs this test), a made-up name is not.
    assert module._installed("pytest") and not module._installed("no-such-distribution-xq7")


def test_fetch_list_pins_what_the_check_needs_and_scripts_parse():
    fetch = (GPU / "fetch_wheels.sh").read_text()
    for pin in ("megatron-core==0.16.1", "liger-kernel==0.8.5"):
        assert pin in fetch
    for script in ("fetch_wheels.sh", "check.sh"):
        proc = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
