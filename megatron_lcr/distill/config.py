"""The ``distill`` section of ``lcr train``: the teacher, on-policy distillation (OPD / dGRPO) and the
forward-KL warmup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_lcr.distill.teacher import EngineTeacherConfig
from megatron_lcr.models.megatron_checkpoint import HF_DIR
from megatron_lcr.parallel.layout import ParallelConfig

OPD_MODES = ("loss", "reward")
OPD_ESTIMATORS = ("k1", "k3", "full", "topk")
FKL_ESTIMATORS = ("sampled", "full", "topk")


@dataclass(kw_only=True)
class TeacherConfig:
    """The teacher: a frozen Megatron model inside the job, or engine servers, or both (scoring by one,
    generation for the forward-KL warmup by the servers)."""

    hf_path: str = ""
    """The teacher's Hugging Face directory: its weights (or config + tokenizer with ``load``); launched
    teacher servers serve it. Same tokenizer and vocabulary as the student (checked)."""
    load: str | None = None
    """A megatron_lcr checkpoint with the teacher's weights (the Megatron teacher; e.g. a stage's output)."""
    scorer: Literal["megatron", "engine"] = "megatron"
    """Who computes the teacher's log-probs: the frozen Megatron model (any temperature; hidden states for
    the exact KL) or the engine servers (``engine``; temperature 1 only)."""
    tensor_parallel_size: int | None = None
    """The Megatron teacher's own TP size: the job's ranks form groups of ``tensor_parallel_size x
    pipeline_parallel_size`` consecutive ranks, each holding one whole teacher (from ``hf_path``;
    ``distill.layout_teacher``). None: the teacher takes the student's TP/PP layout."""
    pipeline_parallel_size: int = 1
    """The Megatron teacher's own PP size, with ``tensor_parallel_size``."""
    params_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """The Megatron teacher's dtype; None: the student's (the fused KL takes one dtype)."""
    temperature: float | None = None
    """Softmax temperature of teacher AND student log-probs in the distillation terms; None: the rollout
    temperature ``rl.temperature``. Another value only with the exact KL (estimator 'full'; the student is
    then scored twice); an engine scorer needs 1."""
    engine: EngineTeacherConfig = field(default_factory=EngineTeacherConfig)
    """Teacher servers (launched from ``hf_path`` unless ``engine.urls``): the scorer with
    ``scorer: engine``, and the forward-KL warmup's generator."""

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"distill.teacher.temperature must be > 0, got {self.temperature}")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise ValueError(f"distill.teacher.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1 or (self.pipeline_parallel_size > 1 and not self.tensor_parallel_size):
            raise ValueError(f"distill.teacher.pipeline_parallel_size ({self.pipeline_parallel_size}) must be >= 1, "
                             "and other than 1 only with distill.teacher.tensor_parallel_size (the teacher's own layout)")

    @property
    def own_layout(self) -> ParallelConfig | None:
        """The teacher's own TP x PP layout (``tensor_parallel_size``), or None: the student's."""
        if not self.tensor_parallel_size:
            return None
        return ParallelConfig(tensor_model_parallel_size=self.tensor_parallel_size,
                              pipeline_model_parallel_size=self.pipeline_parallel_size)

    @property
    def configured(self) -> bool:
        return bool(self.hf_path or self.load or self.engine.urls)

    @property
    def hf_dir(self) -> str:
        """The teacher's Hugging Face directory (config, tokenizer; weights unless ``load``); empty if none."""
        return self.hf_path or (str(Path(self.load) / HF_DIR) if self.load else "")


@dataclass(kw_only=True)
class OPDConfig:
    """On-policy distillation: the per-token reverse KL ``KL(student || teacher)`` on the student's samples."""

    lam: float = 1.0
    """lambda: weight of the OPD term (dGRPO: ``L_GRPO + lam * L_OPD``; OPD alone: its scale); >= 0."""
    mode: str = "loss"
    """'loss': a direct loss (score-function ``sg(k1) * log pi_s``, or the exact KL with 'full'); 'reward':
    a dense per-token advantage ``A - lam * KL`` in the policy-gradient loss."""
    estimator: str = "k1"
    """Per-token KL: 'k1' / 'k3' on the sampled token (any teacher); 'full': exact over the vocabulary
    from a Megatron teacher's hidden states (fused kernels); 'topk': exact over an engine teacher's
    ``top_k`` most likely tokens plus one tail bucket for the rest (``distill.opd.topk_reverse_kl``).
    'k3' only as a reward: its score-function gradient is not the KL's."""
    top_k: int = 20
    """With 'topk': how many of the teacher's most likely tokens per position the engine returns (count)."""
    tail: bool = True
    """With 'topk': add the bucket of every other token. Without it the sum runs over the teacher's top-k
    only and the student can lower it by moving its mass outside that set (the known collapse)."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"distill.opd.top_k must be >= 1, got {self.top_k}")
        if self.lam < 0:
            raise ValueError(f"distill.opd.lam must be >= 0, got {self.lam}")
        if self.mode not in OPD_MODES:
            raise ValueError(f"distill.opd.mode must be one of {', '.join(OPD_MODES)}, got {self.mode!r}")
        if self.estimator not in OPD_ESTIMATORS:
            raise ValueError(f"distill.opd.estimator must be one of {', '.join(OPD_ESTIMATORS)}, got {self.estimator!r}")
        if self.mode == "loss" and self.estimator == "k3":
            raise ValueError("distill.opd.estimator='k3' needs mode='reward': as a loss its gradient is not the KL's "
                             "(use k1 or full)")


@dataclass(kw_only=True)
class FKLConfig:
    """Forward-KL warmup: the student fits ``KL(teacher || student)`` on sequences the teacher samples."""

    estimator: str = "sampled"
    """'sampled': ``log pi_t(y) - log pi_s(y)`` on the teacher's tokens (its gradient is SFT's on them);
    'full': exact over the vocabulary from a Megatron teacher's hidden states; 'topk': over the teacher
    servers' ``top_k`` most likely tokens at each position plus a tail bucket (scored at temperature 1)."""
    top_k: int = 20
    """With 'topk': tokens per position the teacher servers return (count)."""
    tail: bool = True
    """With 'topk': add the bucket of every other token."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"distill.fkl.top_k must be >= 1, got {self.top_k}")
        if self.estimator not in FKL_ESTIMATORS:
            raise ValueError(f"distill.fkl.estimator must be one of {', '.join(FKL_ESTIMATORS)}, got {self.estimator!r}")


@dataclass(kw_only=True)
class DistillConfig:
    """Distillation from a teacher (objectives ``opd``, ``dgrpo``, ``fkl``)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher model."""
    opd: OPDConfig = field(default_factory=OPDConfig)
    """On-policy distillation (``opd``, ``dgrpo``)."""
    fkl: FKLConfig = field(default_factory=FKLConfig)
    """Forward-KL warmup (``fkl``)."""
