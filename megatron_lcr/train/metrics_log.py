"""Step metrics to ``metrics.jsonl``, TensorBoard and a progress bar (rank 0 only).

A resumed run keeps the lines up to the step it resumes from and drops the ones written after that
checkpoint, so the file of an interrupted-and-resumed run reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_lcr.atomic import atomic_write_text

# Shown in the progress bar, in this order, when present.
_BAR_KEYS = (("rollout/reward_mean", "reward"), ("loss", "loss"), ("depo/aux_loss", "kd"),
             ("eval/short_em", "short_em"), ("eval/long_em", "long_em"), ("time/step_s", "s/step"))


class MetricsLog:
    """``with MetricsLog(out_dir, enabled=rank0, ...) as log: log.write(step, metrics)``."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool, total: int, first: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb_dir = Path(out_dir) / "tensorboard" if tensorboard else None
        self.total, self.first = total, first
        self._file = self._tb = self._bar = None
        self._shown: dict[str, float] = {}

    def __enter__(self) -> MetricsLog:
        if not self.enabled:
            return self
        from tqdm import tqdm

        kept = []
        if self.first and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= self.first]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        if self._tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir), purge_step=self.first + 1 if self.first else None)
        self._bar = tqdm(total=self.total, initial=self.first, desc="train", file=sys.stderr, mininterval=1.0)
        return self

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(name, value, step)
            self._tb.flush()
        self._shown.update({short: metrics[key] for key, short in _BAR_KEYS if key in metrics})
        self._bar.set_postfix({k: f"{v:.3g}" for k, v in self._shown.items()}, refresh=False)
        self._bar.update(max(step - self._bar.n, 0))

    def __exit__(self, *exc_info) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
