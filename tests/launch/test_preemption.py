"""``train/preemption.py`` on two real gloo ranks: a request that only one rank sees stops both at the
same step, with the record and exit status a requeued job relies on.

- SIGUSR1 delivered to rank 1 alone during step 2: both ranks stop after step 2 (rank 0 never got a
  signal; without the all-reduce it would go on into step 3's collectives while rank 1 saves).
- The request file ($LCR_PREEMPT_REQUEST, what the sbatch script writes), seen by rank 0 alone during
  step 3: both stop after step 3; rank 0 records step, reason and checkpoint in preempted.json and
  removes the request it answered.
- Every rank leaves with exit status 75, and the previous signal handlers are back afterwards.
(The whole loop, checkpoint and resume under SLURM: test_slurm_jobs.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.distributed import run_torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("preemption_worker.py")
LINE = re.compile(r"phase (\d) rank (\d) stopped after step (\d) reason (.+) code (\d+) handler (\S+)")


def test_one_rank_told_stops_every_rank_at_the_same_step(tmp_path):
    output = run_torchrun(WORKER, 2, [tmp_path], timeout=300)
    stops = {(int(m[1]), int(m[2])): (int(m[3]), m[4], int(m[5]), m[6]) for m in LINE.finditer(output)}
    assert "ran through" not in output, output[-2000:]
    assert stops == {
        (1, 0): (2, "SIGUSR1", 75, "default"),
        (1, 1): (2, "SIGUSR1", 75, "default"),
        (2, 0): (3, "request file", 75, "default"),
        (2, 1): (3, "request file", 75, "default"),
    }, output[-2000:]
    for phase, step, reason in ((1, 2, "SIGUSR1"), (2, 3, "request file")):
        record = json.loads((tmp_path / f"phase{phase}" / "preempted.json").read_text())
        assert (record["step"], record["reason"]) == (step, reason)
        assert record["checkpoint"] == str(tmp_path / f"phase{phase}" / f"iter_{step}")
    assert not (tmp_path / "request").exists()  # answered, so a later run is not stopped by it
