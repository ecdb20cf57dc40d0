"""A teacher inside the training job: a frozen Megatron model, forward only, on the student's layout.

It is built like the policy (from a Hugging Face directory or a megatron_lcr checkpoint) but without
DDP, gradients or optimizer state, and may differ from the student in every size but the vocabulary
(a larger teacher: more layers, a wider hidden size). It shares the training job's parallel groups,
so its TP/PP layout is the student's: its output weight is split into the same vocabulary shards as
the student's, which is what lets the fused kernels compute the exact KL between the two from
hidden states (``kernels.kl_divergence``), and its last pipeline stage is the student's. A teacher too
large for the student's layout takes one of its own: ``distill.layout_teacher``.

Two services:

- :meth:`MegatronTeacher.score`: the teacher's log-prob of every response token at ``temperature``
  (sampled-token OPD estimators; the same numbers an engine serving the same weights returns);
- :meth:`MegatronTeacher.attach_hidden`: its final hidden states at the response positions of the
  student's packed micro-batches (``[n, R, H_teacher]``, on the last stage), handed to the student's
  loss for the exact KL. They are ``R x H_teacher`` numbers per response, far fewer than the
  ``R x V`` of logits, and live for one optimizer update.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_lcr.kernels import output_weight
from megatron_lcr.models.builder import ModelConfig
from megatron_lcr.parallel.layout import ParallelConfig
from megatron_lcr.rl.sequences import TokenSequence
from megatron_lcr.train.micro_batches import PackedBatch, PackLayout
from megatron_lcr.train.model_setup import build_policy
from megatron_lcr.train.token_logprobs import ScoringSpec, run_packed_schedule, score


class MegatronTeacher:
    """A frozen teacher model on this rank (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, parallel: ParallelConfig, spec: ScoringSpec, *, load: str | None,
                 token_budget: int, layout: PackLayout = PackLayout(), fixed_length: bool = False,
                 student_padded_vocab: int | None = None) -> None:
        self.model = build_policy(model_cfg, parallel, load=load, trainable=False)
        padded = self.model.model_cfg.padded_vocab_size
        if student_padded_vocab is not None and padded != student_padded_vocab:
            raise ValueError(f"teacher {model_cfg.hf_path or load}: padded vocabulary {padded} differs from the "
                             f"student's {student_padded_vocab}: the exact KL needs the same vocabulary shards")
        # Only its log-probs at ``spec.temperature`` (the distillation temperature): no second pass.
        self.spec = replace(spec, entropy=False, pair_kl=False, teacher_kl=None, teacher_weight=None,
                            distill_temperature=None)
        self._pack = dict(token_budget=token_budget, layout=layout, fixed_length=fixed_length)

    @property
    def output_weight(self) -> torch.Tensor | None:
        """``[V/tp, H_teacher]`` this rank's output-weight shard (None off the last pipeline stage)."""
        last = self.model.chunks[-1]
        return output_weight(last) if getattr(last, "post_process", False) else None

    def score(self, sequences: list[TokenSequence]) -> list[list[float]]:
        """The teacher's log-prob of every response token of each sequence, on every rank."""
        return score(self.model.chunks, sequences, self.spec, **self._pack)

    @torch.no_grad()
    def attach_hidden(self, batches: list[PackedBatch]) -> list[PackedBatch]:
        """``batches`` with ``teacher_hidden`` set on the last pipeline stage (a forward-only pass)."""
        if not batches:
            return batches
        spec = replace(self.spec, from_hidden=True, hidden_rows=True)

        def keep(outputs: dict[str, torch.Tensor], batch: PackedBatch):
            return outputs["logp"].new_zeros(()), {"hidden": outputs["hidden"].detach()}

        reports = run_packed_schedule(self.model.chunks, batches, spec, keep, forward_only=True)
        if not reports:  # not the last stage: the loss, and so the hidden states, live there
            return batches
        return [replace(b, teacher_hidden=r["hidden"]) for b, r in zip(batches, reports)]
