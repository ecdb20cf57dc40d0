"""Teachers: the protocol the trainer uses (:class:`Teacher`, :class:`HiddenStateTeacher`) and the engine
teacher, rollout servers (SGLang, vLLM, ``lcr serve``) serving the teacher model, asked for the log-prob
of every response token (``max_new_tokens: 0``, ``logprob_start_len: 0``). The other provider, a frozen
Megatron model inside the job, is ``distill.megatron_teacher``.

Global rank 0 launches the servers (or attaches to ``urls``) and talks to them through a
:class:`~megatron_lcr.rollout.client.RolloutClient`, as for rollouts; what they return is broadcast to
every rank. The teacher must share the student's tokenizer: a launched teacher's tokenizer and
vocabulary are compared with the student's before any work.

Temperature: the engines return *input* log-probs of the unscaled distribution (SGLang 0.5.23
computes them as ``log_softmax(logits)``, ``srt/layers/logprob_processor.py``; ``lcr serve`` does the
same), so an engine teacher scores at temperature 1. A KL against it must take the student's
log-probs at temperature 1 too; ``temperature`` other than 1 is refused rather than silently mixed
(the known bug elsewhere: a teacher at one temperature, the student at another).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from megatron_lcr.rl.sequences import TokenSequence
from megatron_lcr.rollout.client import RolloutRequestError
from megatron_lcr.rollout.served import ServedModel, served
from megatron_lcr.rollout.sglang import SGLangLaunchConfig, cpu_reference_launch


class Teacher(Protocol):
    """What the trainer asks of any teacher."""

    def score(self, sequences: list[TokenSequence]) -> list[list[float]]:
        """The teacher's log-prob of every response token of each sequence (at the distillation
        temperature), on every rank."""
        ...


class TopKTeacher(Teacher, Protocol):
    """A teacher that also names its k most likely tokens at each position (an engine: ``Needs.teacher_topk``)."""

    def score_topk(self, sequences: list[TokenSequence], k: int) -> list[tuple[list[float], list[list[int]], list[list[float]]]]:
        """Per sequence ``(response log-probs, [R][k] top ids, [R][k] their log-probs)``, on every rank."""
        ...


class HiddenStateTeacher(Teacher, Protocol):
    """A teacher in the job that hands over hidden states for the exact KL (``Needs.teacher_kl``)."""

    @property
    def output_weight(self) -> torch.Tensor | None:
        """``[V/tp, H_teacher]``: this rank's output-weight shard (None off the last pipeline stage)."""
        ...

    def attach_hidden(self, batches: list) -> list:
        """The student's packed micro-batches with ``teacher_hidden`` set on the last pipeline stage."""
        ...


# Files whose content defines a tokenizer (those present are compared).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(kw_only=True)
class EngineTeacherConfig:
    """Servers serving the teacher model."""

    server: SGLangLaunchConfig = field(default_factory=cpu_reference_launch)
    """Servers to launch (``server.model_path``: the teacher's Hugging Face directory)."""
    urls: list[str] = field(default_factory=list)
    """Teacher servers already running; non-empty: launch nothing."""
    temperature: float = 1.0
    """Softmax temperature of the teacher's log-probs: engines score at 1 only (module docstring)."""
    max_concurrency: int = 64
    """Requests in flight per server (count)."""
    request_timeout_s: float = 600.0
    """Limit on one scoring request (seconds)."""

    def __post_init__(self) -> None:
        if self.temperature != 1.0:
            raise ValueError(f"teacher temperature {self.temperature:g}: engine teachers score at temperature 1 "
                             "only (their input log-probs are unscaled); score the student at 1 as well")


def _tokenizer_digest(hf_dir: Path) -> tuple[int | None, dict[str, str]]:
    """``(config vocab_size, {tokenizer file: sha256})`` of a Hugging Face directory."""
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    files = {name: hashlib.sha256((hf_dir / name).read_bytes()).hexdigest()
             for name in _TOKENIZER_FILES if (hf_dir / name).is_file()}
    return config.get("vocab_size"), files


def check_same_tokenizer(teacher_dir: str | Path, student_dir: str | Path) -> None:
    """Refuse a teacher whose vocabulary size or tokenizer files differ from the student's."""
    (t_vocab, t_files), (s_vocab, s_files) = _tokenizer_digest(Path(teacher_dir)), _tokenizer_digest(Path(student_dir))
    if t_vocab != s_vocab:
        raise ValueError(f"teacher {teacher_dir} has vocab_size {t_vocab}, the student {student_dir} {s_vocab}: "
                         "distillation needs one tokenizer")
    differ = sorted(name for name in t_files.keys() & s_files.keys() if t_files[name] != s_files[name])
    if differ or t_files.keys() != s_files.keys():
        raise ValueError(f"teacher {teacher_dir} and student {student_dir} have different tokenizers "
                         f"({', '.join(differ or sorted(t_files.keys() ^ s_files.keys()))}): distillation needs one")


def _response_scores(result, prompt_len: int, k: int) -> tuple:
    """``(log-probs, top-k ids, top-k log-probs)`` of the response positions of one scored sequence."""
    logp = result.input_logprobs[prompt_len:]
    if not k:
        return logp, None, None
    rows = result.input_top_logprobs[prompt_len:]
    return logp, [[i for i, _ in row] for row in rows], [[v for _, v in row] for row in rows]


class EngineTeacher:
    """Teacher log-probs from rollout servers. Use as a context manager on every rank."""

    def __init__(self, cfg: EngineTeacherConfig, *, student_dir: str, log_dir: str,
                 attach: ServedModel | None = None) -> None:
        """``attach``: score through these already-open servers (rank 0's; the forward-KL warmup's generator)
        instead of launching or connecting to ``cfg``'s; the teacher then owns nothing."""
        if not cfg.urls and not cfg.server.model_path:
            raise ValueError("an engine teacher needs server.model_path (the teacher's HF directory) or urls")
        self.cfg = cfg
        self.is_source = torch.distributed.get_rank() == 0
        self._stack, self.model = contextlib.ExitStack(), attach
        if attach is None and cfg.server.model_path:
            check_same_tokenizer(cfg.server.model_path, student_dir)
        if not self.is_source or attach is not None:
            return
        server = dataclasses.replace(cfg.server, log_dir=log_dir)
        try:
            self.model = self._stack.enter_context(served(server, urls=cfg.urls, timeout_s=cfg.request_timeout_s,
                                                          max_concurrency=cfg.max_concurrency))
            self.model.model_info()  # an unreachable teacher fails here, before any work
        except RolloutRequestError as exc:
            urls = list(self.model.client.urls) if self.model else list(cfg.urls)
            self.close()
            raise RolloutRequestError(f"teacher servers {', '.join(urls)}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> EngineTeacher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def score(self, sequences: list[TokenSequence]) -> list[list[float]]:
        """The teacher's log-prob of every response token of each sequence, on every rank."""
        return [logp for logp, _, _ in self._scored(sequences, 0)]

    def score_topk(self, sequences: list[TokenSequence], k: int) -> list[tuple[list[float], list[list[int]], list[list[float]]]]:
        """Per sequence ``(log-probs of its response tokens, [R][k] the teacher's k most likely ids at each
        response position, [R][k] their log-probs)``, on every rank."""
        return self._scored(sequences, k)

    def _scored(self, sequences: list[TokenSequence], k: int) -> list[tuple]:
        box: list = [None]
        if self.is_source:
            try:
                results = self.model.score([s.prompt + s.response for s in sequences], top_k=k)
                box[0] = ("done", [_response_scores(r, len(s.prompt), k) for r, s in zip(results, sequences)])
            except Exception as exc:  # noqa: BLE001 - every rank raises it, not only rank 0
                box[0] = ("error", f"teacher: {type(exc).__name__}: {exc}")
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise RolloutRequestError(value)
        return value

    def close(self) -> None:
        self._stack.close()
        self.model = None
