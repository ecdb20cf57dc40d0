"""A Megatron teacher with a tensor x pipeline layout of its own inside the training job.

``distill.teacher.tensor_parallel_size: t`` (and ``pipeline_parallel_size: p``, default 1) splits the
job's ``W`` ranks into ``W / (t p)`` teacher groups of ``t p`` consecutive ranks (one node's GPUs when
``t p`` divides the GPUs per node, so the teacher's traffic stays on NVLink); each group holds one whole
teacher, ``p`` stages of ``t`` tensor ranks, whatever the student's TP / PP / DP. A 70B teacher beside an
8B student on 8 GPUs is then ``t = 8`` (17.5 GB of bf16 weights per GPU) while the student runs TP=1,
DP=8; a teacher too large for one node's memory at TP=8 takes ``p = 2`` over 16 ranks.

The model is Megatron's ``GPTModel`` built with a ``ProcessGroupCollection`` of its own (Megatron-Core's
parallel_state stays the student's) and filled from a Hugging Face directory at its own TP/PP rank. Its
forward runs outside the student's pipeline schedule: stage after stage, each sending its activations
to the next with point-to-point sends (a frozen forward has no backward to interleave; the stages wait
on each other, which is the price of a layout that does not follow the student's).

What each service costs and how work is shared:

- :meth:`LayoutTeacher.attach_hidden` (the exact KL): every rank on the student's last pipeline stage
  needs the teacher's hidden states for its own micro-batches. The members of a teacher group exchange
  their micro-batches (token ids, a few KB), the group runs the teacher on each distinct set once
  (student TP peers hold the same set: deduplicated by student DP rank), the last stage broadcasts the
  response positions' hidden states (``[n, R, H_teacher]``) to the group and each member keeps its own.
- :attr:`LayoutTeacher.output_weight`: the exact KL's fused kernel splits the vocabulary like the
  student's output layer, so the teacher's output weight is gathered once at start over its last stage,
  shared with the group, and this rank keeps the student's rows (``[V_student_padded / tp_student, H_teacher]``).
- :meth:`LayoutTeacher.score` (sampled-token estimators): the step's sequences are split over the teacher
  groups; each scores its share (fused log-probs over its last stage's vocabulary shards) and all ranks
  gather them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from megatron_lcr.kernels import logprob_entropy, output_layer_returns_hidden, output_weight
from megatron_lcr.models.builder import ModelConfig, build_gpt_model, resolved_vocab_size, use_transformer_engine
from megatron_lcr.models.families import hf_arch, model_dims
from megatron_lcr.models.hf_checkpoint import SafetensorsReader, load_hf_config
from megatron_lcr.models.transfer import load_hf_into_chunk
from megatron_lcr.models.weight_map import chunk_maps
from megatron_lcr.parallel.layout import ParallelConfig, validate_layout
from megatron_lcr.rl.sequences import TokenSequence
from megatron_lcr.train.micro_batches import PackedBatch, PackLayout, plan_micro_batches


@dataclass(frozen=True)
class TeacherGroups:
    """This rank's place in the teacher's layout: ``members`` (``tp x pp`` consecutive ranks) hold one whole
    teacher; member ``i`` is pipeline stage ``i // tp``, tensor rank ``i % tp`` (Megatron's order)."""

    members: list[int]
    group: dist.ProcessGroup
    """All members (micro-batches are exchanged and hidden states shared over it)."""
    tp_group: dist.ProcessGroup
    """The members of this rank's stage."""
    pp_group: dist.ProcessGroup
    """The members with this rank's tensor rank, one per stage."""
    tp: int
    pp: int

    @property
    def index(self) -> int:
        return self.members.index(dist.get_rank())

    @property
    def tp_rank(self) -> int:
        return self.index % self.tp

    @property
    def pp_rank(self) -> int:
        return self.index // self.tp

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        """The global rank of a member."""
        return self.members[pp_rank * self.tp + tp_rank]


def teacher_groups(tp: int, pp: int) -> TeacherGroups:
    """This rank's teacher groups (``tp x pp`` divides the world: ``validate_layout``). Collective: every
    rank creates every group, in the same order (``torch.distributed.new_group``'s rule)."""
    world, rank, size = dist.get_world_size(), dist.get_rank(), tp * pp
    mine: dict = {}
    for first in range(0, world, size):
        members = list(range(first, first + size))
        whole = dist.new_group(members)
        stages = [dist.new_group(members[s * tp:(s + 1) * tp]) for s in range(pp)]
        columns = [dist.new_group(members[t::tp]) for t in range(tp)]
        if rank in members:
            i = members.index(rank)
            mine = {"members": members, "group": whole, "tp_group": stages[i // tp], "pp_group": columns[i % tp]}
    return TeacherGroups(**mine, tp=tp, pp=pp)


def _process_groups(groups: TeacherGroups):
    """Megatron's ``ProcessGroupCollection`` of the teacher: its own TP and PP groups; CP and DP are this
    rank alone (parallel_state's CP group, one rank when the student's CP is 1). No embedding group: the
    tied-embedding sync it serves is for training, and the weights come from the HF checkpoint."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    alone = ps.get_context_parallel_group()
    if dist.get_world_size(alone) != 1:
        raise ValueError("a teacher with its own layout needs the student's parallel.cp=1")
    pgs = ProcessGroupCollection()
    pgs.tp, pgs.tp_cp, pgs.pp, pgs.mp = groups.tp_group, groups.tp_group, groups.pp_group, groups.group
    pgs.cp = pgs.dp = pgs.dp_cp = pgs.pos_embd = alone
    pgs.embd = None
    return pgs


class LayoutTeacher:
    """A frozen teacher on tensor x pipeline groups of its own (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, parallel: ParallelConfig, *, vocab_size: int, temperature: float,
                 token_budget: int, student_padded_vocab: int, layout: PackLayout = PackLayout()) -> None:
        """``parallel``: the teacher's own layout (``TeacherConfig.own_layout``: TP and PP only)."""
        from megatron.core import parallel_state as ps

        if not model_cfg.hf_path:
            raise ValueError("a teacher with its own layout loads from distill.teacher.hf_path (a Hugging Face "
                             "directory with weights; convert a checkpoint with lcr convert megatron-to-hf)")
        arch = hf_arch(load_hf_config(model_cfg.hf_path))
        try:  # the model's sizes and the job's ranks, as for the policy's layout
            validate_layout(parallel, world_size=dist.get_world_size(), dims=model_dims(arch))
        except ValueError as err:
            raise ValueError(f"teacher {model_cfg.hf_path} on its own layout (distill.teacher.tensor_parallel_size, "
                             f"pipeline_parallel_size): {err}") from None
        self.groups = g = teacher_groups(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
        self.num_groups, self.group_index = dist.get_world_size() // len(g.members), g.members[0] // len(g.members)
        self.vocab_size, self.temperature, self.token_budget, self.layout = vocab_size, temperature, token_budget, layout
        model_cfg = replace(model_cfg, padded_vocab_size=resolved_vocab_size(arch, model_cfg, parallel))
        self.model = build_gpt_model(arch, model_cfg, parallel, pre_process=g.pp_rank == 0, post_process=g.last_stage,
                                     pg_collection=_process_groups(g))
        self.thd = use_transformer_engine(model_cfg)
        maps = chunk_maps(arch, te=self.thd, padded_vocab=model_cfg.padded_vocab_size, pp_rank=g.pp_rank, pp_size=g.pp)
        load_hf_into_chunk(self.model, maps, SafetensorsReader(model_cfg.hf_path).get, tp_rank=g.tp_rank, tp_size=g.tp)
        if torch.cuda.is_available():
            self.model = self.model.cuda()
        self.model.requires_grad_(False)
        self.model.eval()
        self.hidden_size = arch.hidden_size
        rows = self._student_rows(student_padded_vocab, model_cfg.padded_vocab_size)  # collective over the group
        self._weight = rows if ps.is_pipeline_last_stage(ignore_virtual=True) else None
        if dist.get_rank() == 0:
            print(f"lcr: teacher {model_cfg.hf_path} on its own layout: TP={g.tp} PP={g.pp}, {self.num_groups} "
                  f"group(s) of {len(g.members)} consecutive rank(s)", file=sys.stderr, flush=True)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _from_last_stage(self, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """``tensor`` (on the last stage's tensor rank 0) on every member of the group."""
        if self.groups.pp == 1 and tensor is not None:
            return tensor
        tensor = torch.empty(shape, dtype=self._dtype, device=self._device) if tensor is None else tensor.contiguous()
        dist.broadcast(tensor, src=self.groups.rank_of(self.groups.pp - 1, 0), group=self.groups.group)
        return tensor

    @torch.no_grad()
    def _student_rows(self, student_padded_vocab: int, teacher_padded_vocab: int) -> torch.Tensor:
        """The teacher's output weight gathered over its last stage and shared with the group, cut to this
        rank's student vocabulary rows (zero rows where the student's padding reaches past the teacher's)."""
        from megatron.core import parallel_state as ps

        g, full = self.groups, None
        if g.last_stage:
            shard = output_weight(self.model).contiguous()
            parts = [torch.empty_like(shard) for _ in range(g.tp)]
            dist.all_gather(parts, shard, group=g.tp_group)
            full = torch.cat(parts)
        full = self._from_last_stage(full, (teacher_padded_vocab, self.hidden_size))
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

    def _response_hidden(self, batch: PackedBatch) -> torch.Tensor | None:
        """``[n, R, H_teacher]`` the teacher's final hidden states at the positions predicting each response
        token, on its last stage (None elsewhere). Every member runs it: stage after stage, each sending its
        activations to the next (a frozen forward needs no schedule; the stages wait on each other)."""
        g, device = self.groups, self._device
        mask, packed = batch.attention_inputs(device, thd=self.thd)
        kwargs = {"packed_seq_params": packed} if packed is not None else {}
        length = batch.input_ids.shape[1]
        if g.pp_rank > 0:
            received = torch.empty(length, 1, self.hidden_size, dtype=self._dtype, device=device)
            dist.recv(received, src=g.rank_of(g.pp_rank - 1, g.tp_rank))
            self.model.set_input_tensor(received)
        ids, positions = batch.input_ids.to(device), batch.position_ids.to(device)
        if not g.last_stage:
            dist.send(self.model(ids, positions, mask, **kwargs).contiguous(), dst=g.rank_of(g.pp_rank + 1, g.tp_rank))
            return None
        with output_layer_returns_hidden(self.model):
            hidden = self.model(ids, positions, mask, **kwargs)  # [1, L, H]
        index = batch.response_index.to(device)
        return hidden[0].index_select(0, index.reshape(-1)).view(*index.shape, -1)

    @torch.no_grad()
    def attach_hidden(self, batches: list[PackedBatch]) -> list[PackedBatch]:
        """``batches`` with ``teacher_hidden`` set on the student's last pipeline stage. Collective over
        the teacher group: every member calls it once per update, with its own micro-batches."""
        from megatron.core import parallel_state as ps

        needs = ps.is_pipeline_last_stage(ignore_virtual=True)
        mine = (ps.get_data_parallel_rank(), batches) if needs else (None, [])
        everyone: list = [None] * len(self.groups.members)
        dist.all_gather_object(everyone, mine, group=self.groups.group)
        hidden: dict[int, list[torch.Tensor]] = {}
        for key, theirs in everyone:  # the same order on every member: the forwards line up
            if key is not None and key not in hidden:
                hidden[key] = [self._from_last_stage(self._response_hidden(b), (*b.response_index.shape, self.hidden_size))
                               for b in theirs]
        if not needs:
            return batches
        return [replace(b, teacher_hidden=h) for b, h in zip(batches, hidden[mine[0]])]

    @torch.no_grad()
    def score(self, sequences: list[TokenSequence]) -> list[list[float]]:
        """The teacher's log-prob of every response token of each sequence, on every rank."""
        g = self.groups
        share = list(range(self.group_index, len(sequences), self.num_groups))
        batches = plan_micro_batches([sequences[i] for i in share], token_budget=self.token_budget, dp_size=1,
                                     dp_rank=0, pad_id=0, fixed_length=False, layout=self.layout) if share else []
        found: dict[int, list[float]] = {}
        for batch in batches:
            rows = self._response_hidden(batch)
            if rows is None:
                continue
            weight = output_weight(self.model)
            index = batch.response_index.reshape(-1)
            labels = batch.labels[0].index_select(0, index).masked_fill(batch.response_mask.reshape(-1) == 0, -100)
            logp, _ = logprob_entropy(rows.reshape(-1, rows.shape[-1]), weight, labels.to(rows.device),
                                      temperature=self.temperature, vocab_start=g.tp_rank * weight.shape[0],
                                      valid_vocab_end=self.vocab_size, tp_group=g.tp_group if g.tp > 1 else None)
            logp = logp.view(batch.response_index.shape).cpu()
            for k, j in enumerate(batch.sequence_ids):
                found[share[j]] = logp[k, :len(sequences[share[j]].response)].tolist()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found if g.last_stage and g.tp_rank == 0 else {})
        merged = {i: values for part in everyone for i, values in part.items()}
        return [merged[i] for i in range(len(sequences))]
