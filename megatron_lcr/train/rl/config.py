"""The configuration of ``lcr train``: RL (GRPO / DAPO / GSPO / CISPO), DePO and DePO-IW, on-policy distillation,
dGRPO and the forward-KL warmup, section by section."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from megatron_lcr.data.prompts import PromptConfig
from megatron_lcr.data.tasks import TaskDataConfig
from megatron_lcr.distill.config import DistillConfig
from megatron_lcr.distill.depo import DePOConfig
from megatron_lcr.distill.teacher import check_same_tokenizer
from megatron_lcr.kernels.config import KernelConfig
from megatron_lcr.models.builder import ModelConfig
from megatron_lcr.models.megatron_checkpoint import config_dir, read_meta
from megatron_lcr.parallel.layout import DEFAULT_COLLECTIVE_TIMEOUT_S, ParallelConfig
from megatron_lcr.registry import lookup
from megatron_lcr.rl.advantages import AdvantageConfig
from megatron_lcr.rl.losses import PolicyLossConfig
from megatron_lcr.rl.rewards import REWARDS
from megatron_lcr.rollout.engines import RolloutConfig
from megatron_lcr.train.evaluate import EvalConfig
from megatron_lcr.train.micro_batches import PackLayout
from megatron_lcr.train.optimizer import OptimizerConfig, check_precision

# Slack of the collective timeout over the longest wait rank 0 imposes on the other ranks (seconds).
COLLECTIVE_MARGIN_S = 300.0
# What rl.algorithm sets in rl.loss: a field the user left None is filled from its preset, one set to
# another value is an error (RLConfig.__post_init__); with no algorithm, GRPO's preset fills the unset
# fields. The algorithms' other settings (clip range, dynamic sampling, aggregation) are explicit
# config values, see examples/ for each recipe.
ALGORITHM_PRESETS: dict[str, dict[str, str]] = {
    "grpo": {"name": "ppo"},
    "dapo": {"name": "ppo"},
    "gspo": {"name": "gspo"},
    "cispo": {"name": "cispo"},
}


@dataclass(kw_only=True)
class RLConfig:
    """The RL algorithm: what is sampled, how it is rewarded, and the policy loss."""

    algorithm: Literal["grpo", "dapo", "gspo", "cispo"] | None = None
    """Base algorithm, a preset of rl.loss (ALGORITHM_PRESETS: loss.name 'ppo' for GRPO/DAPO, else its
    name); None: no preset, an unset rl.loss.name is 'ppo' (GRPO)."""
    context: Literal["short", "long", "short_long"] = "short"
    """Contexts the RL rollouts see: the paper's GRPO(Short), GRPO(Long) and GRPO(Short-Long)."""
    group_size: int = 8
    """Responses sampled per prompt (a GRPO group; >= 2)."""
    reward: str = ""
    """Reward function name (em, f1, sub_em, math, rougeL); empty: each sample's family default."""
    temperature: float = 0.7
    """Rollout sampling temperature (the trainer's log-probs use the same)."""
    top_p: float = 1.0
    """Rollout nucleus sampling (must be 1.0 for exact log-probs: the trainer does not truncate)."""
    max_new_tokens: int = 1024
    """Longest response (tokens)."""
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    """The policy loss, clipping, aggregation, KL and entropy terms (loss.name unset: algorithm's preset)."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Group advantages, dynamic sampling, overlong shaping."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.reward:
            lookup(REWARDS, self.reward, "reward")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for RL rollouts, got {self.temperature}")
        if self.top_p != 1.0:
            raise ValueError(f"top_p must be 1.0 (the trainer's log-probs are over the full vocabulary), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self._apply_preset()

    def _apply_preset(self) -> None:
        """Fill the loss fields ALGORITHM_PRESETS[algorithm] sets (GRPO's with no algorithm) that the user
        left None, on a copy (a PolicyLossConfig passed in is not changed); with an algorithm, a field
        set to another value is an error."""
        preset = ALGORITHM_PRESETS[self.algorithm or "grpo"]
        for key, value in preset.items():
            given = getattr(self.loss, key)
            if self.algorithm and given is not None and given != value:
                raise ValueError(f"rl.loss.{key}={given!r} conflicts with rl.algorithm={self.algorithm!r} "
                                 f"(its preset sets {value!r}): drop one of them")
        self.loss = replace(self.loss, **{k: v for k, v in preset.items() if getattr(self.loss, k) is None})


@dataclass(kw_only=True)
class RLTrainerConfig:
    """The step loop."""

    steps: int = 100
    """Optimizer steps (one rollout batch each)."""
    prompts_per_step: int = 64
    """Prompts per rollout batch (each sampled group_size times)."""
    token_budget: int = 8192
    """Tokens per packed micro-batch (prompt + response; gradient accumulation over micro-batches)."""
    seed: int = 1234
    """Seed of initialisation, data order and rollout sampling."""
    save_interval: int = 0
    """Steps between checkpoints (model, optimizer, RNG, data cursor); 0: only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    load: str | None = None
    """megatron_lcr checkpoint to start the policy from instead of model.hf_path's weights."""
    resume: bool = True
    """Continue from the newest checkpoint under --out when there is one."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient that are skipped before the run stops."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard events under --out/tensorboard."""
    check_rollout_logprobs: bool = True
    """Report max |trainer log-prob - engine log-prob| every step (a sync/numerics check)."""
    mini_batches: int = 1
    """Optimizer updates per pass over a step's rollouts (each on an equal share of them; the old
    log-probs stay the rollout policy's, so later updates are off-policy and clipping is live)."""
    epochs: int = 1
    """Passes over a step's rollouts (``mini_batches`` updates each)."""
    logprobs_from: Literal["auto", "hidden", "logits"] = "auto"
    """'hidden': final hidden states x output weight inside the fused kernels (no [tokens, vocab]
    logits); 'logits': Megatron's output layer, then the kernels; 'auto': hidden unless sequence
    parallelism is on (its hidden states are sequence shards)."""

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "token_budget", "keep_last", "max_bad_steps", "mini_batches", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_interval < 0:
            raise ValueError(f"save_interval must be >= 0, got {self.save_interval}")


@dataclass(kw_only=True)
class RLRunConfig:
    """``lcr train``: every section of an RL / DePO run."""

    objective: str = "rl"
    """What the step optimises (``train.rl.objectives.OBJECTIVES``): 'rl' (the policy loss of ``rl``),
    'depo' (+ lam * KD from the short to the long context), 'depo-iw' (+ lam * importance-weighted RL
    on the long context), both configured by ``depo``; 'opd' (on-policy distillation from a teacher),
    'dgrpo' (the policy loss + lam * OPD) and 'fkl' (forward-KL warmup on the teacher's samples),
    configured by ``distill``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/CP/DP layout of the trainer."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and the LR schedule (warmup, decay)."""
    trainer: RLTrainerConfig = field(default_factory=RLTrainerConfig)
    """The step loop."""
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    """Train and held-out samples."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt template and answer extraction."""
    rl: RLConfig = field(default_factory=RLConfig)
    """The RL algorithm."""
    depo: DePOConfig = field(default_factory=DePOConfig)
    """DePO / DePO-IW (objectives 'depo', 'depo-iw'): short-to-long self-distillation."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation from a teacher (objectives 'opd', 'dgrpo', 'fkl')."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation (before, every eval.interval steps, after)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout servers and weight sync."""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    """Log-prob / entropy / KL implementation."""

    def __post_init__(self) -> None:
        if not self.model.hf_path and not self.trainer.load:
            raise ValueError("model.hf_path (a Hugging Face model directory) or trainer.load must be set")
        check_precision(self.model.params_dtype, self.optimizer)
        rows = self.pack_layout
        if self.trainer.token_budget % rows.row_multiple:
            raise ValueError(f"trainer.token_budget ({self.trainer.token_budget}) must be a multiple of "
                             f"{rows.row_multiple} (zigzag chunks of 2*cp; cp*tp with sequence parallelism; "
                             "16 tokens per rank with fp8)")
        if self.trainer.logprobs_from == "hidden" and self.parallel.sequence_parallel:
            raise ValueError("trainer.logprobs_from='hidden' needs parallel.sp=false (use 'logits' or 'auto')")
        self._check_objective()
        self._derive_collective_timeout()

    def _check_objective(self) -> None:
        from megatron_lcr.train.rl.objectives import build_objective

        needs = build_objective(self).needs
        if needs.pair_kl and self.parallel.context_parallel_size > 1:
            raise ValueError(f"objective {self.objective!r} (depo.kd_estimator='full') needs parallel.cp=1: its exact KL "
                             "compares a response's distributions on two packed sequences, which context "
                             "parallelism puts on different ranks")
        if needs.any_teacher:
            self._check_teacher(needs)
        rollouts = self.trainer.prompts_per_step * self.rl.group_size * (2 if self.rl.context == "short_long" else 1)
        if rollouts % self.trainer.mini_batches:
            raise ValueError(f"trainer.mini_batches ({self.trainer.mini_batches}) must divide the rollout batch "
                             f"({rollouts} = trainer.prompts_per_step x rl.group_size"
                             f"{' x 2 contexts' if self.rl.context == 'short_long' else ''})")

    def _check_teacher(self, needs) -> None:
        """One-line errors, before any work, for a teacher the objective cannot use."""
        teacher, name = self.distill.teacher, f"objective {self.objective!r}"
        if not teacher.configured:
            raise ValueError(f"{name} needs a teacher: set distill.teacher.hf_path (or .load, or .engine.urls)")
        if teacher.load:
            read_meta(teacher.load)  # a missing or unfinished checkpoint fails here, naming it
        student_dir = config_dir(self.model.hf_path, self.trainer.load)
        if teacher.hf_dir:
            check_same_tokenizer(teacher.hf_dir, student_dir)
        distill_t = self.distill_temperature
        if distill_t != self.rl.temperature and not (needs.teacher_kl or needs.teacher_topk):
            raise ValueError(f"distill.teacher.temperature ({distill_t:g}) differs from rl.temperature "
                             f"({self.rl.temperature:g}): only a KL over the distributions (estimator 'full' or "
                             "'topk') can use another temperature; sampled-token estimates need the temperature "
                             "the tokens were sampled at")
        if teacher.tensor_parallel_size and (teacher.scorer != "megatron" or teacher.load or not teacher.hf_path
                                             or self.parallel.context_parallel_size > 1):
            raise ValueError("distill.teacher.tensor_parallel_size (a Megatron teacher with its own layout) needs "
                             "scorer: megatron, hf_path with the weights (not load: convert it with lcr convert "
                             "megatron-to-hf) and parallel.cp=1")
        if needs.teacher_topk and not needs.teacher_rollouts and teacher.scorer != "engine":
            raise ValueError(f"{name} with estimator 'topk' needs an engine teacher (distill.teacher.scorer: engine); "
                             "a Megatron teacher gives the exact KL over the whole vocabulary (estimator 'full')")
        if needs.teacher_topk and self.parallel.context_parallel_size > 1:
            raise ValueError(f"{name} with estimator 'topk' needs parallel.cp=1")
        if needs.teacher_kl and (teacher.scorer != "megatron" or not (teacher.hf_path or teacher.load)):
            raise ValueError(f"{name} with an exact KL (estimator 'full') needs a Megatron teacher "
                             "(distill.teacher.scorer: megatron with hf_path or load)")
        if needs.teacher_kl and (self.parallel.context_parallel_size > 1 or self.parallel.sequence_parallel
                                 or self.trainer.logprobs_from == "logits"):
            raise ValueError(f"{name} with an exact KL (estimator 'full') needs parallel.cp=1, parallel.sp=false and "
                             "trainer.logprobs_from hidden/auto: the teacher hands over hidden states")
        if ((needs.teacher and teacher.scorer == "engine") or needs.teacher_topk) and distill_t != 1.0:
            raise ValueError(f"distill.teacher.scorer='engine' (and any top-k estimator: engines give the top-k) "
                             "scores at temperature 1 only, but the distillation "
                             f"temperature is {distill_t:g} (distill.teacher.temperature, else rl.temperature): use "
                             "the Megatron scorer or sample at 1")
        if needs.teacher_rollouts and not (teacher.hf_path or teacher.engine.urls):
            raise ValueError(f"{name} samples from the teacher: set distill.teacher.hf_path (servers are launched "
                             "from it) or distill.teacher.engine.urls")

    @property
    def distill_temperature(self) -> float:
        """Temperature of teacher and student log-probs in distillation terms (default: the rollouts')."""
        given = self.distill.teacher.temperature
        return self.rl.temperature if given is None else given

    @property
    def pack_layout(self) -> PackLayout:
        """What the parallel layout (and FP8) requires of every packed micro-batch of this run."""
        return PackLayout.for_parallel(self.parallel, fp8=self.model.fp8 is not None)

    def _derive_collective_timeout(self) -> None:
        """The other ranks wait in a collective while rank 0 starts the rollout servers (up to
        rollout.server.startup_timeout_s) and while it finishes a weight sync (up to
        rollout.sync.timeout_s); generation does not count (rank 0 sends a heartbeat every minute).
        parallel.timeout_s unset: derived to cover both; set shorter: an error naming both."""
        waits = {"rollout.sync.timeout_s": self.rollout.sync.timeout_s}
        if not self.rollout.urls:
            waits["rollout.server.startup_timeout_s"] = self.rollout.server.startup_timeout_s
        name, longest = max(waits.items(), key=lambda item: item[1])
        needed = longest + COLLECTIVE_MARGIN_S
        if self.parallel.timeout_s is None:
            self.parallel.timeout_s = max(DEFAULT_COLLECTIVE_TIMEOUT_S, needed)
        elif self.parallel.timeout_s < needed:
            raise ValueError(f"parallel.timeout_s ({self.parallel.timeout_s:g}) must exceed {name} ({longest:g}) by "
                             f"{COLLECTIVE_MARGIN_S:g} s: the other ranks wait in a collective meanwhile (leave it "
                             "unset to derive it)")
