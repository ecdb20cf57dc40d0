"""The SLURM cluster the `slurm` tests submit to: the one ``$SLURM_CONF`` names when it answers (``.ci/run``
starts one with tools/slurm_local.sh), else one started here with that script and stopped afterwards.
Where neither works (SLURM not installed, not root) the tests skip, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.distributed import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "slurm_local.sh"
# The jobs of the tests span this many nodes (2 trainer nodes + 1 rollout node).
NODES_NEEDED = 3


def _idle_nodes(env: dict[str, str]) -> int:
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    states = proc.stdout.split() if proc.returncode == 0 else []
    return sum(state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for state in states)


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """The environment (``SLURM_CONF``) under which sbatch/squeue reach a cluster of NODES_NEEDED nodes."""
    env = dict(os.environ)
    if env.get("SLURM_CONF") and _idle_nodes(env) >= NODES_NEEDED:
        yield env
        return
    if shutil.which("sbatch") is None or shutil.which("slurmd", path="/usr/sbin:" + env["PATH"]) is None:
        pytest.skip("SLURM is not installed (as root: bash tools/slurm_local.sh install, as .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster answers $SLURM_CONF, and starting one (tools/slurm_local.sh) needs root")
    local = {**env, "LCR_SLURM_NODES": str(NODES_NEEDED)}
    proc = subprocess.run(["bash", str(SCRIPT), "start"], env=local, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.skip(f"could not start a SLURM cluster: {(proc.stderr or proc.stdout).strip()}")
    conf = subprocess.run(["bash", str(SCRIPT), "conf"], env=local, capture_output=True, text=True).stdout.strip()
    env["SLURM_CONF"] = conf
    started = "already running" not in proc.stdout
    yield env
    if started:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=local, capture_output=True, timeout=60)
