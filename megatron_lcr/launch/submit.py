"""Write the job's script next to the run and hand it to ``sbatch``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.launch.sbatch import LOG_DIR, SCRIPT_NAME

# sbatch answers at once, or its controller is unreachable (seconds).
SBATCH_TIMEOUT_S = 60.0


def script_path(out: str | os.PathLike) -> Path:
    return Path(out).absolute() / LOG_DIR / SCRIPT_NAME


def write_script(out: str | os.PathLike, text: str) -> Path:
    """``OUT/slurm/job.sbatch``, written whole (SLURM opens its log directory before the script runs)."""
    path = script_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    path.chmod(0o755)
    return path


def submit(path: Path) -> str:
    """``sbatch --parsable PATH``; returns the job id."""
    if shutil.which("sbatch") is None:
        raise RuntimeError(f"sbatch is not on PATH (no SLURM client here); the script is {path}")
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                              timeout=SBATCH_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"sbatch did not answer in {SBATCH_TIMEOUT_S:g} s; the script is {path}") from None
    if proc.returncode != 0:
        reason = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise RuntimeError(f"sbatch refused {path}: {reason}")
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    match = re.match(r"\s*(\d+)", proc.stdout)
    if match is None:
        raise RuntimeError(f"sbatch printed no job id for {path}: {proc.stdout.strip()!r}")
    return match.group(1)
