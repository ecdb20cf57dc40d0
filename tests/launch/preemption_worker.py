"""Two gloo ranks and a preemption request that only one of them sees (tests/launch/test_preemption.py).

    torchrun --nproc_per_node=2 preemption_worker.py OUT_DIR

Phase 1: rank 1 sends itself SIGUSR1 during step 2; rank 0 gets no signal. Phase 2: rank 0 finds the
request file, written during step 3. After each step both ranks ask ``requested()``, then save (a
barrier, like the real collective checkpoint) and leave through ``exit()``. Each rank prints one line
per phase: ``phase P rank R stopped after step S reason X code C handler H``.
"""

import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_lcr.parallel.env import init_process_group, read_dist_env
from megatron_lcr.train.preemption import Preempted, Preemption


def run_phase(phase: int, out: Path, request: Path | None) -> None:
    rank = dist.get_rank()
    try:
        with Preemption(out, request_file=str(request) if request else None) as preempt:
            for step in range(1, 6):
                if phase == 1 and rank == 1 and step == 2:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if phase == 2 and rank == 0 and step == 3:
                    request.write_text("SIGUSR1\n")
                if preempt.requested():
                    dist.barrier()  # the checkpoint: every rank must be here, or this hangs
                    preempt.exit(step, out / f"iter_{step}")
        print(f"phase {phase} rank {rank} ran through", flush=True)
    except Preempted as stop:
        handler = signal.getsignal(signal.SIGUSR1)
        print(f"phase {phase} rank {rank} stopped after step {stop.step} reason {stop.reason} code {stop.code} "
              f"handler {'default' if handler == signal.SIG_DFL else handler}", flush=True)


def main() -> None:
    out = Path(sys.argv[1])
    init_process_group(read_dist_env(os.environ), backend="gloo")
    run_phase(1, out / "phase1", None)
    dist.barrier()
    run_phase(2, out / "phase2", out / "request")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
