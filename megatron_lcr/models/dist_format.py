"""Megatron torch_dist checkpoints of a model, written and read one tensor at a time, with no model built.

Megatron-Core's ``dist_checkpointing`` (torch_dist backend) stores a model as a
``torch.distributed.checkpoint`` (DCP) directory: ``.distcp`` files of ``torch.save``'d chunks, a
pickled ``.metadata`` giving every key's global shape, chunks and their byte ranges, plus Megatron's
``metadata.json`` and ``common.pt``. Each tensor is stored as its global (unsharded) array cut into
chunks, so a checkpoint loads at any TP/PP. What Megatron-Core 0.16 writes for the dense GPT models
here (checked against its own save in tests/models/test_convert_stream.py):

* keys use the Transformer Engine names (``self_attention.linear_qkv.layer_norm_weight``) whatever
  spec saved them; a transformer layer's tensors are stacked along a leading layer axis:
  ``decoder.layers.3.mlp.linear_fc2.weight`` is row 3 of key ``decoder.layers.mlp.linear_fc2.weight``
  of global shape ``[L, H, F]``, stored one chunk per layer (and per TP shard);
* a TP-sharded tensor is one chunk per TP rank along its split axis; ``linear_fc1``'s gate and up
  halves are sharded separately: rank r's gate rows at ``r*F/t``, its up rows at ``F + r*F/t``;
* replicated tensors (norms) are stored once; a tied output layer is not stored at all;
* every linear layer's ``_extra_state`` (``None`` in Megatron's local spec) is a ShardedObject per
  layer: a BYTE_IO item ``{module}._extra_state/shard_{l}_{L}`` holding ``torch.save([None])``.

The writer drives DCP's own ``FileSystemWriter`` and ``DefaultSavePlanner`` through their public
interfaces, one plan per output file as DCP does for one rank, but with a planner that produces each
chunk from the Hugging Face tensors only when the writer asks for it, in layer order: at most one full
tensor (and the chunk being written) is in memory. The reader asks DCP's ``FileSystemReader`` for one
layer's region of one key at a time. Neither imports Megatron.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    FileSystemReader,
    FileSystemWriter,
    LoadPlan,
    SavePlan,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_lcr.models.families import HFArch
from megatron_lcr.models.megatron_checkpoint import CheckpointError
from megatron_lcr.models.weight_map import TensorMap, chunk_maps, hf_shapes, megatron_shape

LAYER_PREFIX = "decoder.layers."
# Megatron's dist_checkpointing.core.save_config writes this (json.dump of its CheckpointingConfig);
# its TorchCommonSaveStrategy saves the model's common state, empty for a model, to common.pt.
MEGATRON_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}
CONFIG_FILE, COMMON_FILE = "metadata.json", "common.pt"
# A new .distcp file starts at every pipeline stage and after this many bytes (big models on
# parallel filesystems read faster from several files than from one).
MAX_FILE_BYTES = 4 * 2**30

Region = tuple[tuple[int, ...], tuple[int, ...]]
"""``(offsets, sizes)`` of a box in a key's global tensor."""


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """One Megatron parameter of the whole model (one layer of it, for layer tensors) as stored."""

    map: TensorMap
    """Its Hugging Face map, with TP=1 PP=1 Transformer Engine names."""
    key: str
    """The checkpoint key, e.g. ``decoder.layers.mlp.linear_fc1.weight``."""
    layer: int | None
    """Index along the key's leading layer axis; None for tensors outside the layers."""
    num_layers: int
    """Length of the layer axis."""
    shape: tuple[int, ...]
    """The full (TP=1) Megatron tensor of this parameter (of one layer)."""

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.shape if self.layer is None else (self.num_layers, *self.shape)

    def region(self) -> Region:
        """This parameter's box in the key's global tensor."""
        if self.layer is None:
            return (0,) * len(self.shape), self.shape
        return (self.layer,) + (0,) * len(self.shape), (1, *self.shape)

    def chunks(self, tp: int) -> list[Region]:
        """The chunks Megatron stores at tensor-parallel size ``tp``, in global coordinates."""
        chunks = tp_chunks(self.shape, self.map.tp, tp)
        if self.layer is None:
            return chunks
        return [((self.layer, *offsets), (1, *sizes)) for offsets, sizes in chunks]

    @property
    def extra_state_key(self) -> str | None:
        """The ShardedObject key of this layer's linear module's ``_extra_state`` (one per linear)."""
        module, _, leaf = self.key.rpartition(".")
        if self.layer is None or leaf != "weight" or not module.rpartition(".")[2].startswith("linear_"):
            return None
        return f"{module}._extra_state/shard_{self.layer}_{self.num_layers}"


def tp_chunks(shape: tuple[int, ...], mode: str, tp: int) -> list[Region]:
    """The TP shards of a full tensor of ``shape`` as boxes, in rank order (``glu``: gate halves, then up;
    Megatron stores gate and up as separate chunks even at TP=1)."""
    if mode == "replicated" or (tp == 1 and mode != "glu"):
        return [((0,) * len(shape), shape)]
    axis = 1 if mode == "col" else 0
    pieces = 2 * tp if mode == "glu" else tp
    if shape[axis] % pieces:
        raise ValueError(f"dimension {shape[axis]} of {list(shape)} does not split into {pieces} TP pieces")
    size = shape[axis] // pieces
    boxes = []
    for i in range(pieces):
        offsets, sizes = [0] * len(shape), list(shape)
        offsets[axis], sizes[axis] = i * size, size
        boxes.append((tuple(offsets), tuple(sizes)))
    return boxes


def stored_tensors(arch: HFArch, *, padded_vocab: int) -> list[StoredTensor]:
    """Every stored tensor of the model, in layer order (what a Megatron checkpoint of ``arch`` holds)."""
    shapes = hf_shapes(arch)
    stored = []
    for tm in chunk_maps(arch, te=True, padded_vocab=padded_vocab):
        key, layer = tm.megatron, None
        if key.startswith(LAYER_PREFIX):
            index, _, rest = key.removeprefix(LAYER_PREFIX).partition(".")
            key, layer = LAYER_PREFIX + rest, int(index)
        stored.append(StoredTensor(map=tm, key=key, layer=layer, num_layers=arch.num_layers,
                                   shape=megatron_shape(tm, shapes)))
    return stored


def _extra_state_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save([None], buffer)
    return buffer.getvalue()


# ---- writing ----------------------------------------------------------------------------------


def _file_plans(stored: list[StoredTensor], *, tp: int, pp: int, dtype: torch.dtype) -> list[list[WriteItem]]:
    """Write items grouped into files: one group per pipeline stage, split every MAX_FILE_BYTES."""
    files: list[list[WriteItem]] = []
    stage_of_file, size = None, 0
    per_stage = stored[0].num_layers // pp
    properties = TensorProperties(dtype=dtype)
    for st in stored:
        stage = st.layer // per_stage if st.layer is not None else (0 if st.key.startswith("embedding.") else pp - 1)
        nbytes = math.prod(st.shape) * dtype.itemsize
        if stage != stage_of_file or (files[-1] and size + nbytes > MAX_FILE_BYTES):
            files.append([])
            stage_of_file, size = stage, 0
        size += nbytes
        for offsets, sizes in st.chunks(tp):
            files[-1].append(WriteItem(
                index=MetadataIndex(st.key, torch.Size(offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                            properties=properties, size=torch.Size(st.global_shape))))
        if st.extra_state_key is not None:
            files[-1].append(WriteItem(index=MetadataIndex(st.extra_state_key), type=WriteItemType.BYTE_IO))
    return files


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP's default planner, except that a chunk's data is made when the writer asks for it.

    The writer asks in plan order, so the chunks of one parameter come one after another: the
    planner keeps that parameter's full tensor until the next parameter's first chunk is asked for.
    """

    def __init__(self, stored: list[StoredTensor], tp: int, dtype: torch.dtype,
                 full_tensor: Callable[[StoredTensor], torch.Tensor], on_tensor: Callable[[StoredTensor], None] | None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(st.key, offsets): (st, offsets, sizes) for st in stored for offsets, sizes in st.chunks(tp)}
        self._dtype, self._full_tensor, self._on_tensor = dtype, full_tensor, on_tensor
        self._current: tuple[StoredTensor | None, torch.Tensor | None] = (None, None)

    def _full(self, st: StoredTensor) -> torch.Tensor:
        if self._current[0] is not st:
            self._current = (None, None)  # drop the previous tensor before making the next
            full = self._full_tensor(st)
            if tuple(full.shape) != st.shape:
                raise CheckpointError(f"{st.map.megatron}: made from {st.map.hf} with shape {list(full.shape)}, "
                                      f"the model needs {list(st.shape)}")
            self._current = (st, full)
            if self._on_tensor is not None:
                self._on_tensor(st)
        return self._current[1]

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(_extra_state_bytes())
        st, offsets, sizes = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        piece = self._full(st)
        skip = 0 if st.layer is None else 1  # the layer axis is not in the full tensor
        for dim, (offset, size) in enumerate(zip(offsets[skip:], sizes[skip:])):
            piece = piece.narrow(dim, offset, size)
        return piece.reshape(sizes).to(self._dtype)  # the writer copies a view out of its base


def write_model(
    model_dir: str | Path, stored: list[StoredTensor], full_tensor: Callable[[StoredTensor], torch.Tensor], *,
    tp: int, pp: int, dtype: torch.dtype, on_tensor: Callable[[StoredTensor], None] | None = None,
) -> None:
    """Write a Megatron torch_dist checkpoint of ``stored`` (chunked for TP ``tp``) into ``model_dir``.

    ``full_tensor(st)`` returns the full (TP=1) tensor of one stored parameter; it is called once per
    parameter, in order, and its result is dropped before the next call.
    """
    model_dir = Path(model_dir)
    writer = FileSystemWriter(str(model_dir), thread_count=1, per_thread_copy_ahead=0)  # serial, in plan order
    planner = _StreamingSavePlanner(stored, tp, dtype, full_tensor, on_tensor)
    writer.set_up_storage_writer(True)
    planner.set_up_planner({}, writer.storage_meta(), True)
    plans = [writer.prepare_local_plan(SavePlan(items)) for items in _file_plans(stored, tp=tp, pp=pp, dtype=dtype)]
    plans, metadata = planner.create_global_plan(plans)  # validates that the chunks tile every tensor
    plans = writer.prepare_global_plan(plans)  # file i is __i_0.distcp
    results = []
    for plan in plans:
        future = writer.write_data(planner.finish_plan(plan), planner)
        future.wait()
        results.append(future.value())
    writer.finish(metadata, results)
    (model_dir / CONFIG_FILE).write_text(json.dumps(MEGATRON_CONFIG))
    torch.save({}, model_dir / COMMON_FILE)


# ---- reading ----------------------------------------------------------------------------------


class _CopyInto(DefaultLoadPlanner):
    """Lets DCP's reader copy the chunks it reads into one destination box."""

    def __init__(self, dest: torch.Tensor):
        super().__init__()
        self._dest = dest

    def resolve_tensor(self, read_item):
        view = self._dest
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view


class DistCheckpointReader:
    """Reads one stored parameter at a time from a torch_dist checkpoint directory (any TP/PP layout)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._reader = FileSystemReader(str(self.model_dir))
        self.metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, True)

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{self.model_dir / '.metadata'}: tensor '{key}' is not in the checkpoint")
        return md

    def check(self, stored: list[StoredTensor]) -> None:
        """Every stored tensor is in the checkpoint with the global shape the model's config gives."""
        for st in stored:
            size = tuple(self._tensor_md(st.key).size)
            if size != st.global_shape:
                raise CheckpointError(f"{self.model_dir / '.metadata'}: '{st.key}' has shape {list(size)}, "
                                      f"the model's config needs {list(st.global_shape)}")

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_md(key).properties.dtype

    def read(self, st: StoredTensor) -> torch.Tensor:
        """The full (TP=1) tensor of one stored parameter, whatever chunks it was saved in."""
        md = self._tensor_md(st.key)
        offsets, sizes = st.region()
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        box = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        items = create_read_items_for_chunk_list(st.key, md, [box])
        if sum(math.prod(item.lengths) for item in items) != dest.numel():
            raise CheckpointError(f"{self.model_dir / '.metadata'}: the chunks of '{st.key}' do not cover "
                                  f"offsets {list(offsets)} sizes {list(sizes)}")
        self._reader.read_data(LoadPlan(items), _CopyInto(dest)).wait()
        return dest[0] if st.layer is not None else dest
