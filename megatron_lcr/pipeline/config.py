"""``lcr pipeline``'s config: the sparse-to-dense workflow's models and its four stages.

Every stage is an ``lcr train`` run of ``base`` (a run config) with the stage's own objective, models
and ``overrides`` (``key=value``, applied last). A stage is skipped with ``skip: true`` (the paper's
ablations: no teacher RL, no warmup, no OPD).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# (stage name, the objective it runs, the model it trains, whether it learns from the teacher)
STAGES = (
    ("teacher_rl", "rl", "teacher", False),   # 1: sparse-reward RL on the larger teacher (C1: reward-shaped)
    ("fkl", "fkl", "student", True),          # 2a: forward-KL warmup on the teacher's samples (C2: close in KL)
    ("opd", "opd", "student", True),          # 2b: on-policy distillation under the student's rollouts
    ("student_rl", "rl", "student", False),   # 3: optional sparse-reward RL on the student
)


@dataclass(kw_only=True)
class StageConfig:
    """One stage."""

    skip: bool = False
    """Leave the stage out: the next one starts from what this one would have started from."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of ``base`` for this stage (e.g. ``trainer.steps=20``, ``objective=dgrpo``)."""


@dataclass(kw_only=True)
class StagesConfig:
    """The four stages, in this order."""

    teacher_rl: StageConfig = field(default_factory=StageConfig)
    """Stage 1: sparse-reward RL on the teacher (its output is the teacher of 2a and 2b)."""
    fkl: StageConfig = field(default_factory=StageConfig)
    """Stage 2a: forward-KL warmup of the student on the teacher's samples."""
    opd: StageConfig = field(default_factory=StageConfig)
    """Stage 2b: on-policy distillation (``objective=dgrpo`` in its overrides for dGRPO)."""
    student_rl: StageConfig = field(default_factory=lambda: StageConfig(skip=True))
    """Stage 3: sparse-reward RL on the student (skipped unless asked for)."""


@dataclass(kw_only=True)
class CheckConfig:
    """The check at every stage boundary (C1, C2): teacher-student KL and both models' held-out rewards."""

    num_prompts: int = 64
    """Held-out prompts the student answers (sampled at temperature 1) for the KL (count)."""
    context: str = "long"
    """Context of those prompts: 'short' or 'long'."""
    seed: int = 0
    """Sampling seed (the same check after a resume gives the same numbers)."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"check.num_prompts must be >= 1, got {self.num_prompts}")
        if self.context not in ("short", "long"):
            raise ValueError(f"check.context must be 'short' or 'long', got {self.context!r}")


@dataclass(kw_only=True)
class PipelineConfig:
    """``lcr pipeline``: the sparse-to-dense workflow as one resumable run."""

    base: str = ""
    """An ``lcr train`` config every stage starts from (data, prompt, rollout servers, optimizer, ...)."""
    student: str = ""
    """The student's Hugging Face directory (stage 2a's starting point)."""
    teacher: str = ""
    """The raw teacher's Hugging Face directory (stage 1's starting point); same tokenizer as the student."""
    launcher: list[str] = field(default_factory=list)
    """Command that runs a stage's ``lcr train`` (e.g. ``[torchrun, --nproc_per_node=8]``); empty: this
    Python, one process (the tiny CPU setup)."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    """The four stages."""
    check: CheckConfig = field(default_factory=CheckConfig)
    """The boundary check."""

    def __post_init__(self) -> None:
        for name in ("base", "student", "teacher"):
            if not getattr(self, name):
                raise ValueError(f"pipeline config: {name} must be set")
        if all(getattr(self.stages, name).skip for name, *_ in STAGES):
            raise ValueError("pipeline config: every stage is skipped")
