"""Checkpoint conversion between Hugging Face and Megatron (``lcr convert``), streamed in one process.

Neither direction builds a model. hf-to-megatron finds every input problem (config, architecture,
layout, missing shards, missing or misshapen tensors) from the config and the safetensors headers
before it writes anything; then, parameter by parameter in layer order, it reads the Hugging Face
tensors (memory-mapped, released after use), fuses them into the full Megatron tensor and writes that
tensor's TP chunks into Megatron's torch_dist format (``dist_format``), the layout Megatron's own save
gives at that TP size, so ``dist_checkpointing`` loads it at any TP/PP. megatron-to-hf reads one
parameter's region of the checkpoint at a time (any layout it was saved at), un-fuses it into Hugging
Face tensors and streams them into safetensors shards whose headers were planned up front.

Memory therefore holds about one parameter, not one TP x PP shard of the model: a few hundred MB for a
70B model's largest tensors (embedding, ``linear_fc1``) instead of its whole size. Measured peaks are
in benchmarks/results/convert_cpu.md. Both directions write into a temporary directory that is renamed
into place only when complete.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_lcr.atomic import atomic_dir
from megatron_lcr.models.builder import DTYPES, ModelConfig
from megatron_lcr.models.dist_format import DistCheckpointReader, StoredTensor, stored_tensors, write_model
from megatron_lcr.models.families import hf_arch, model_dims
from megatron_lcr.models.hf_checkpoint import (
    HFCheckpointError,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    copy_hf_metadata,
    load_hf_config,
)
from megatron_lcr.models.megatron_checkpoint import (
    HF_DIR,
    MODEL_DIR,
    CheckpointMeta,
    checkpoint_meta,
    read_meta,
    write_meta,
)
from megatron_lcr.models.weight_map import hf_shapes
from megatron_lcr.parallel.layout import ParallelConfig, validate_layout


def _hf_dtype(hf_config, dtype: str) -> str:
    """Resolve ``--dtype auto`` to the checkpoint's own dtype (bfloat16 when it does not say)."""
    if dtype != "auto":
        return dtype
    name = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "bfloat16")
    name = name.removeprefix("torch.")
    return name if name in DTYPES else "bfloat16"


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr)


def check_hf_tensors(reader: SafetensorsReader, expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the model needs is in the checkpoint with the shape its config implies (headers only)."""
    missing = [name for name in expected if name not in reader]
    if missing:
        raise HFCheckpointError(f"{reader.path}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    found = reader.shapes()
    for name, shape in expected.items():
        if found[name] != shape:
            raise HFCheckpointError(f"{reader.path}: tensor '{name}' has shape {list(found[name])}, "
                                    f"config.json implies {list(shape)}")


# ---- Hugging Face -> Megatron ------------------------------------------------------------------


def hf_to_megatron(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
    dtype: str = "auto", overwrite: bool = False,
) -> CheckpointMeta:
    """Convert a Hugging Face model directory into a megatron_lcr checkpoint chunked for TP x PP.

    The checkpoint loads at any layout; ``tp`` fixes the padded vocabulary and the chunks (those a
    TP=``tp`` rank reads whole), ``pp`` which ``.distcp`` file each layer goes to.
    """
    hf_dir = Path(hf_dir)
    hf_config = load_hf_config(hf_dir)
    arch = hf_arch(hf_config)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    validate_layout(parallel, world_size=tp * pp, dims=model_dims(arch))
    reader = SafetensorsReader(hf_dir)
    check_hf_tensors(reader, hf_shapes(arch))
    model_cfg = ModelConfig(params_dtype=_hf_dtype(hf_config, dtype), transformer_impl="local")
    meta = checkpoint_meta(arch, model_cfg, parallel)
    stored = stored_tensors(arch, padded_vocab=meta.padded_vocab_size)

    def full_tensor(st: StoredTensor):
        return st.map.fuse([reader.get(name) for name in st.map.hf])

    with atomic_dir(out_dir, overwrite=overwrite) as tmp, _progress(len(stored), "hf-to-megatron") as bar:
        write_model(tmp / MODEL_DIR, stored, full_tensor, tp=tp, pp=pp, dtype=DTYPES[meta.params_dtype],
                    on_tensor=lambda _: bar.update())
        copy_hf_metadata(hf_dir, tmp / HF_DIR)
        write_meta(tmp, meta)
    return meta


# ---- Megatron -> Hugging Face ------------------------------------------------------------------


def megatron_to_hf(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> CheckpointMeta:
    """Convert a megatron_lcr checkpoint (saved at any TP/PP) into a Hugging Face directory
    (safetensors shards of at most ``max_shard_bytes`` + index, config.json, tokenizer files)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    arch = hf_arch(load_hf_config(ckpt_dir / HF_DIR))
    stored = stored_tensors(arch, padded_vocab=meta.padded_vocab_size)
    reader = DistCheckpointReader(ckpt_dir / MODEL_DIR)
    reader.check(stored)
    shapes = hf_shapes(arch)
    entries = [(name, reader.dtype(st.key), shapes[name]) for st in stored for name in st.map.hf]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, _progress(len(stored), "megatron-to-hf") as bar:
        writer = StreamingSafetensorsWriter(tmp, entries, max_shard_bytes=max_shard_bytes)
        for st in stored:
            for name, tensor in zip(st.map.hf, st.map.split(reader.read(st))):
                writer.add(name, tensor)
            bar.update()
        writer.close()
        copy_hf_metadata(ckpt_dir / HF_DIR, tmp)
    return meta
