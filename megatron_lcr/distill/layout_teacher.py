"""A Megatron teacher with a tensor-parallel layout of its own inside the training job.

``distill.teacher.tensor_parallel_size: t`` splits the job's ``W`` ranks into ``W / t`` teacher groups of
``t`` consecutive ranks (one node's GPUs when ``t`` divides the GPUs per node, so the teacher's TP traffic
stays on NVLink); each group holds one whole teacher, split ``t`` ways, whatever the student's TP / PP /
DP. A 70B teacher beside an 8B student on 8 GPUs is then ``t = 8`` (17.5 GB of bf16 weights per GPU)
while the student runs TP=1, DP=8. The teacher has no pipeline stages (PP=1): its forward is one call,
outside the student's pipeline schedule.

The model is Megatron's ``GPTModel`` built with a ``ProcessGroupCollection`` of its own (Megatron-Core's
parallel_state stays the student's) and filled from a Hugging Face directory at its own TP rank.

What each service costs and how work is shared:

- :meth:`LayoutTeacher.attach_hidden` (the exact KL): every rank on the student's last pipeline stage
  needs the teacher's hidden states for its own micro-batches. The members of a teacher group exchange
  their micro-batches (token ids, a few KB), the group runs the teacher on each distinct set once
  (student TP peers hold the same set: deduplicated by student DP rank) and each member keeps its own.
- :attr:`LayoutTeacher.output_weight`: the exact KL's fused kernel splits the vocabulary like the
  student's output layer, so the teacher's output weight is gathered once at start over its group and
  this rank keeps the student's rows (``[V_student_padded / tp_student, H_teacher]``).
- :meth:`LayoutTeacher.score` (sampled-token estimators): the step's sequences are split over the teacher
  groups; each scores its share (fused log-probs over its vocabulary shards) and all ranks gather them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_lcr.kernels import logprob_entropy, output_layer_returns_hidden, output_weight
from megatron_lcr.models.builder import ModelConfig, build_gpt_model, resolved_vocab_size, use_transformer_engine
from megatron_lcr.models.families import hf_arch
from megatron_lcr.models.hf_checkpoint import SafetensorsReader, load_hf_config
from megatron_lcr.models.transfer import load_hf_into_chunk
from megatron_lcr.models.weight_map import chunk_maps
from megatron_lcr.parallel.layout import ParallelConfig
from megatron_lcr.rl.sequences import TokenSequence
from megatron_lcr.train.micro_batches import PackedBatch, PackLayout, plan_micro_batches


def teacher_group(size: int) -> tuple[dist.ProcessGroup, list[int]]:
    """This rank's teacher group (``size`` consecutive ranks) and its members. Collective: every rank
    creates every group, in the same order (``torch.distributed.new_group``'s rule)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"distill.teacher.tensor_parallel_size ({size}) must divide the job's {world} ranks")
    mine = None
    for first in range(0, world, size):
        members = list(range(first, first + size))
        group = dist.new_group(members)
        if rank in members:
            mine = (group, members)
    return mine


def _process_groups(tp: dist.ProcessGroup):
    """Megatron's ``ProcessGroupCollection`` of a PP=1, CP=1 model on ``tp``: the groups it does not split
    over are this rank alone (parallel_state's CP group, a one-rank group when the student's CP is 1)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    alone = ps.get_context_parallel_group()
    if dist.get_world_size(alone) != 1:
        raise ValueError("a teacher with its own tensor_parallel_size needs the student's parallel.cp=1")
    groups = ProcessGroupCollection()
    groups.tp = groups.tp_cp = groups.mp = tp
    groups.pp = groups.cp = groups.embd = groups.pos_embd = groups.dp = groups.dp_cp = alone
    return groups


class LayoutTeacher:
    """A frozen teacher split over its own tensor-parallel groups (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, tensor_parallel_size: int, *, vocab_size: int, temperature: float,
                 token_budget: int, student_padded_vocab: int, layout: PackLayout = PackLayout()) -> None:
        from megatron.core import parallel_state as ps

        if not model_cfg.hf_path:
            raise ValueError("a teacher with its own tensor_parallel_size loads from distill.teacher.hf_path "
                             "(a Hugging Face directory with weights; convert a checkpoint with lcr convert)")
        self.group, members = teacher_group(tensor_parallel_size)
        self.tp, self.tp_rank = tensor_parallel_size, members.index(dist.get_rank())
        self.num_groups, self.group_index = dist.get_world_size() // self.tp, members[0] // self.tp
        self.vocab_size, self.temperature, self.token_budget, self.layout = vocab_size, temperature, token_budget, layout
        parallel = ParallelConfig(tensor_model_parallel_size=self.tp)
        arch = hf_arch(load_hf_config(model_cfg.hf_path))
        model_cfg = replace(model_cfg, padded_vocab_size=resolved_vocab_size(arch, model_cfg, parallel))
        self.model = build_gpt_model(arch, model_cfg, parallel, pre_process=True, post_process=True,
                                     pg_collection=_process_groups(self.group))
        self.thd = use_transformer_engine(model_cfg)
        maps = chunk_maps(arch, te=self.thd, padded_vocab=model_cfg.padded_vocab_size)
        load_hf_into_chunk(self.model, maps, SafetensorsReader(model_cfg.hf_path).get, tp_rank=self.tp_rank,
                           tp_size=self.tp)
        if torch.cuda.is_available():
            self.model = self.model.cuda()
        self.model.requires_grad_(False)
        self.model.eval()
        rows = self._student_rows(student_padded_vocab)  # collective: every member, on any stage
        self._weight = rows if ps.is_pipeline_last_stage(ignore_virtual=True) else None

    @torch.no_grad()
    def _student_rows(self, student_padded_vocab: int) -> torch.Tensor:
        """The teacher's output weight gathered over its group, cut to this rank's student vocabulary rows
        (zero rows where the student's padding reaches past the teacher's). Collective over the group."""
        from megatron.core import parallel_state as ps

        shard = output_weight(self.model).contiguous()
        parts = [torch.empty_like(shard) for _ in range(self.tp)]
        dist.all_gather(parts, shard, group=self.group)
        full = torch.cat(parts)
        local = student_padded_vocab // ps.get_tensor_model_parallel_world_size()
        start = ps.get_tensor_model_parallel_rank() * local
        rows = full.new_zeros(local, full.shape[1])
        kept = full[start:start + local]
        rows[:len(kept)] = kept
        return rows

    @property
    def output_weight(self) -> torch.Tensor | None:
        """``[V_student / tp_student, H_teacher]``: the teacher's output weight in this rank's student
        vocabulary shard (None off the student's last pipeline stage)."""
        return self._weight

    def _hidden(self, batch: PackedBatch) -> torch.Tensor:
        """``[1, L, H_teacher]`` the teacher's final hidden states on one packed row (every group member)."""
        device = next(self.model.parameters()).device
        mask, packed = batch.attention_inputs(device, thd=self.thd)
        kwargs = {"packed_seq_params": packed} if packed is not None else {}
        with output_layer_returns_hidden(self.model):
            return self.model(batch.input_ids.to(device), batch.position_ids.to(device), mask, **kwargs)

    @staticmethod
    def _response_rows(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        index = batch.response_index.to(hidden.device)
        return hidden[0].index_select(0, index.reshape(-1)).view(*index.shape, -1)

    @torch.no_grad()
    def attach_hidden(self, batches: list[PackedBatch]) -> list[PackedBatch]:
        """``batches`` with ``teacher_hidden`` set on the student's last pipeline stage. Collective over
        the teacher group: every member calls it once per update, with its own micro-batches."""
        from megatron.core import parallel_state as ps

        needs = ps.is_pipeline_last_stage(ignore_virtual=True)
        mine = (ps.get_data_parallel_rank(), batches) if needs else (None, [])
        everyone: list = [None] * self.tp
        dist.all_gather_object(everyone, mine, group=self.group)
        hidden: dict[int, list[torch.Tensor]] = {}
        for key, theirs in everyone:  # the same order on every member: the forwards line up
            if key is not None and key not in hidden:
                hidden[key] = [self._response_rows(self._hidden(b), b) for b in theirs]
        if not needs:
            return batches
        return [replace(b, teacher_hidden=h) for b, h in zip(batches, hidden[mine[0]])]

    @torch.no_grad()
    def score(self, sequences: list[TokenSequence]) -> list[list[float]]:
        """The teacher's log-prob of every response token of each sequence, on every rank."""
        share = list(range(self.group_index, len(sequences), self.num_groups))
        batches = plan_micro_batches([sequences[i] for i in share], token_budget=self.token_budget, dp_size=1,
                                     dp_rank=0, pad_id=0, fixed_length=False, layout=self.layout) if share else []
        weight = output_weight(self.model)
        found: dict[int, list[float]] = {}
        for batch in batches:
            rows = self._response_rows(self._hidden(batch), batch)
            labels = batch.labels[0].index_select(0, batch.response_index.reshape(-1)).to(rows.device)
            labels = labels.masked_fill(batch.response_mask.reshape(-1).to(rows.device) == 0, -100)
            logp, _ = logprob_entropy(rows.reshape(-1, rows.shape[-1]), weight, labels, temperature=self.temperature,
                                      vocab_start=self.tp_rank * weight.shape[0], valid_vocab_end=self.vocab_size,
                                      tp_group=self.group if self.tp > 1 else None)
            logp = logp.view(batch.response_index.shape).cpu()
            for k, j in enumerate(batch.sequence_ids):
                found[share[j]] = logp[k, :len(sequences[share[j]].response)].tolist()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found if self.tp_rank == 0 else {})
        merged = {i: values for part in everyone for i, values in part.items()}
        return [merged[i] for i in range(len(sequences))]
