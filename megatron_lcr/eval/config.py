"""``lcr eval``'s config: the model, the benchmark files, decoding, the prompt window and the engines."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_lcr.data.prompts import PromptConfig
from megatron_lcr.eval.formats import FORMATS
from megatron_lcr.eval.metrics import get_metric
from megatron_lcr.rollout.sglang import SGLangLaunchConfig, cpu_reference_launch


@dataclass(kw_only=True)
class EvalRunConfig:
    """One evaluation of one model on one or more benchmark files."""

    model: str
    """Hugging Face model directory, or a megatron_lcr checkpoint (converted or ``checkpoints/iter_N``)."""
    data: list[str]
    """Benchmark files (formats in ``eval/formats.py``); each is reported as its own dataset."""
    out: str
    """Output directory: results.json, results.md, predictions.jsonl, by_length.png, config.yaml, logs/."""
    format: str = "auto"
    """Format of every file: ``auto`` (detected per file) or one of ``eval.formats.FORMATS``."""
    metric: str | None = None
    """Score every record with this ``eval.metrics.METRICS`` name; None: each format's own."""
    limit: int = 0
    """Read only the first N records of each file (records); 0: all."""
    contexts: tuple[str, ...] = ("short", "long")
    """Contexts megatron_lcr samples are prompted with (other formats have one context)."""
    temperature: float = 0.0
    """Sampling temperature; 0: greedy decoding."""
    samples: int = 1
    """Responses per prompt (k of avg@k: every score is the mean over them); > 1 needs temperature > 0."""
    seed: int = 0
    """Sampling seed of each prompt's first response (response j uses seed + j)."""
    max_new_tokens: int = 256
    """Longest response (tokens)."""
    max_prompt_tokens: int | None = None
    """Longest prompt (tokens); longer ones are cut in the middle. None: the model's
    max_position_embeddings minus max_new_tokens."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt template and answer extraction (the same as training's)."""
    server: SGLangLaunchConfig = field(default_factory=cpu_reference_launch)
    """Servers to launch (model_path is filled in); ignored when ``urls`` is given."""
    urls: list[str] = field(default_factory=list)
    """Servers already running that serve the model; non-empty: launch nothing."""
    max_concurrency: int = 64
    """Requests in flight per server (count)."""
    predictions: str | None = None
    """Score the responses of this predictions.jsonl (an earlier run's) instead of generating."""
    overwrite: bool = False
    """Replace an existing, non-empty ``out``."""

    def __post_init__(self) -> None:
        self.contexts = tuple(self.contexts)
        if not self.data:
            raise ValueError("data must name at least one benchmark file")
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"format must be auto or one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.metric is not None:
            get_metric(self.metric)
        if self.limit < 0 or self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"limit ({self.limit}) must be >= 0, samples ({self.samples}) >= 1 and "
                             f"max_new_tokens ({self.max_new_tokens}) >= 1")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"samples ({self.samples}) > 1 needs temperature > 0 (greedy responses are all equal)")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 (or None), got {self.max_prompt_tokens}")
        if not self.contexts or any(c not in ("short", "long") for c in self.contexts):
            raise ValueError(f"contexts must be a non-empty subset of ('short', 'long'), got {list(self.contexts)}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
