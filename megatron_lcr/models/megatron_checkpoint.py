"""megatron_lcr's Megatron checkpoint directory: a Megatron distributed checkpoint plus metadata.

Layout::

    CKPT/
      lcr_checkpoint.json   format version, architecture, vocab sizes, dtype, layout it was saved at
      hf/                   config.json and tokenizer files of the Hugging Face model it came from
      model/                Megatron ``dist_checkpointing`` (torch_dist) checkpoint of the model

``dist_checkpointing`` stores each tensor as its global (unsharded) array with the shards' offsets,
so a checkpoint written at one TP/PP layout loads at any other: Megatron reads each rank's slice.
The only layout-dependent size is the padded vocabulary, which is recorded here and reused on load
when the new TP size divides it. Training checkpoints (``megatron_lcr.train``) add optimizer and
loop state next to ``model/``. ``lcr convert`` writes and reads ``model/`` without building a model,
one tensor at a time, in the layout Megatron's save gives (``dist_format``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

META_NAME = "lcr_checkpoint.json"
MODEL_DIR = "model"
HF_DIR = "hf"
FORMAT_VERSION = 1


def config_dir(hf_path: str, load: str | None) -> Path:
    """Where a run's model config and tokenizer are: the checkpoint's ``hf/`` when it starts from one
    (``trainer.load``), else its Hugging Face directory (``model.hf_path``)."""
    return Path(load) / HF_DIR if load else Path(hf_path)


class CheckpointError(ValueError):
    """A Megatron checkpoint directory is missing, incomplete or corrupt."""


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """What a reader needs to rebuild the model a checkpoint holds."""

    format_version: int
    """Version of this directory layout."""
    architecture: str
    """Hugging Face architecture, e.g. LlamaForCausalLM."""
    vocab_size: int
    """Tokenizer vocabulary (Hugging Face embedding rows)."""
    padded_vocab_size: int
    """Megatron embedding rows (vocabulary padded for TP)."""
    params_dtype: str
    """Dtype of the stored model tensors."""
    tensor_model_parallel_size: int
    """TP size the checkpoint was written at (informational: it loads at any TP)."""
    pipeline_model_parallel_size: int
    """PP size the checkpoint was written at (informational)."""
    iteration: int = 0
    """Optimizer steps taken when it was saved (0 for converted checkpoints)."""


def checkpoint_meta(arch, model_cfg, parallel, *, iteration: int = 0) -> CheckpointMeta:
    """The metadata of a checkpoint of ``arch`` built with ``model_cfg`` at the ``parallel`` layout."""
    from megatron_lcr.models.builder import resolved_vocab_size

    return CheckpointMeta(
        format_version=FORMAT_VERSION,
        architecture=arch.architecture,
        vocab_size=arch.vocab_size,
        padded_vocab_size=resolved_vocab_size(arch, model_cfg, parallel),
        params_dtype=model_cfg.params_dtype,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        iteration=iteration,
    )


def write_meta(ckpt_dir: str | os.PathLike, meta: CheckpointMeta) -> None:
    (Path(ckpt_dir) / META_NAME).write_text(json.dumps(asdict(meta), indent=2) + "\n")


def read_meta(ckpt_dir: str | os.PathLike) -> CheckpointMeta:
    """Metadata of a checkpoint, after checking the directory is complete (one-line errors)."""
    ckpt = Path(ckpt_dir)
    meta_file = ckpt / META_NAME
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: not found (not a megatron_lcr checkpoint, or an unfinished one)")
    try:
        meta = CheckpointMeta(**json.loads(meta_file.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{meta_file}: malformed ({err})") from None
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format_version {meta.format_version}, this reader knows {FORMAT_VERSION}")
    verify_dist_checkpoint(ckpt / MODEL_DIR)
    return meta


def verify_dist_checkpoint(model_dir: Path) -> None:
    """Check a torch_dist checkpoint's files hold every byte its metadata points to.

    Catches a missing or truncated shard file up front, with its name, instead of a pickle or
    storage error from deep inside torch.distributed.checkpoint on some rank.
    """
    from torch.distributed.checkpoint import FileSystemReader

    if not (model_dir / ".metadata").is_file():
        raise CheckpointError(f"{model_dir}: no .metadata file (missing or unfinished distributed checkpoint)")
    try:
        metadata = FileSystemReader(str(model_dir)).read_metadata()
    except Exception as err:  # a truncated .metadata fails inside pickle with various types
        raise CheckpointError(f"{model_dir / '.metadata'}: unreadable ({type(err).__name__})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = model_dir / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {model_dir / '.metadata'})")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file}: truncated ({file.stat().st_size} bytes, metadata needs {size})")


def save_model(chunks: list[torch.nn.Module], ckpt_dir: str | os.PathLike) -> None:
    """Collectively save every rank's model chunks into ``ckpt_dir/model`` (all ranks call this)."""
    from megatron.core import dist_checkpointing

    model_dir = Path(ckpt_dir) / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_model_state(chunks), str(model_dir))


def load_model(chunks: list[torch.nn.Module], ckpt_dir: str | os.PathLike) -> None:
    """Collectively load ``ckpt_dir/model`` into this rank's chunks (any TP/PP layout)."""
    from megatron.core import dist_checkpointing

    model_dir = Path(ckpt_dir) / MODEL_DIR
    verify_dist_checkpoint(model_dir)
    state = dist_checkpointing.load(sharded_model_state(chunks), str(model_dir))
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=True)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"], strict=True)


def sharded_model_state(chunks: list[torch.nn.Module]) -> dict:
    """Megatron's sharded state dict of the model chunks (one chunk: flat; several: model{i})."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
