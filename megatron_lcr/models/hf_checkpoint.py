"""Reading and writing Hugging Face checkpoints tensor by tensor.

Reading goes through ``safetensors.safe_open`` (memory-mapped), so a converter touches one tensor at a
time and a 70B checkpoint never has to fit in one process's memory. Two writers: one buffers tensors
into shards of at most ``max_shard_bytes`` (for callers that hold the tensors anyway), one streams
tensors whose names, dtypes and shapes are known up front, holding none of them. Both write
``model.safetensors.index.json`` like ``transformers``' ``save_pretrained`` does. Every problem with
the input is a :class:`HFCheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that travel with the weights so that the converted directory loads with AutoTokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint directory is missing a file or holds a malformed one."""


def load_hf_config(path: str | os.PathLike):
    """The ``transformers`` config of a model directory, with one-line errors for bad input."""
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(f"{config_file}: not found (is {path} a Hugging Face model directory?)")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise HFCheckpointError(f"{config_file}: no 'model_type' key (not a transformers config)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, TypeError) as err:
        raise HFCheckpointError(f"{config_file}: {str(err).splitlines()[0]}") from None


class SafetensorsReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint.

    ``safe_open`` hands out tensors that are views of its memory map, and every page a reader has
    touched stays in the process's resident set for as long as the file is open. So each ``get``
    opens the file for that one tensor: the pages are released with the tensor, and reading a whole
    checkpoint does not grow the process by the checkpoint's size (a cached handle did).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._files = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise HFCheckpointError(f"{index}: malformed index ({err})") from None
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise HFCheckpointError(f"{shard}: shard listed in {index} is missing")
            return files
        single = self.path / SINGLE_NAME
        if not single.is_file():
            raise HFCheckpointError(f"{self.path}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        with self._open(single) as f:
            return {name: single for name in f.keys()}

    def _open(self, file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise HFCheckpointError(f"{file}: cannot read safetensors ({err})") from None

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk (only this tensor's bytes)."""
        if name not in self._files:
            raise HFCheckpointError(f"{self.path}: tensor '{name}' not found in the checkpoint")
        file = self._files[name]
        with self._open(file) as handle:
            try:
                return handle.get_tensor(name)
            except Exception as err:
                raise HFCheckpointError(f"{file}: cannot read tensor '{name}' ({err})") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (no tensor data is read)."""
        shapes = {}
        for file in sorted(set(self._files.values())):
            with self._open(file) as handle:
                for name in handle.keys():
                    if self._files.get(name) == file:
                        shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes


class ShardedSafetensorsWriter:
    """Streams tensors into temporary safetensors parts of at most ``max_shard_bytes`` each.

    Several writers (one per pipeline stage, in different processes) may share ``out_dir`` under
    different ``part`` names; :func:`finalize_shards` then gives all parts their final
    ``model-0000i-of-0000N.safetensors`` names in part order and writes the index.
    """

    def __init__(self, out_dir: str | os.PathLike, *, part: str = "0", max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        self.part = part
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[dict] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        file = f"part-{self.part}-{len(self._files):05d}.tmp"
        save_file(self._pending, str(self.out_dir / file), metadata={"format": "pt"})
        self._files.append({"file": file, "names": list(self._pending), "bytes": self._pending_bytes})
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last part and a manifest of this writer's parts."""
        if self._pending:
            self._flush()
        (self.out_dir / f"part-{self.part}.manifest.json").write_text(json.dumps(self._files))


def shard_names(count: int) -> list[str]:
    """The file names ``save_pretrained`` gives ``count`` shards (one: ``model.safetensors``)."""
    return [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json``: which shard holds each tensor, and the tensors' bytes in all."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def finalize_shards(out_dir: str | os.PathLike, parts: list[str]) -> None:
    """Rename the parts of every writer (in ``parts`` order) to final shard names; write the index."""
    out_dir = Path(out_dir)
    files = []
    for part in parts:
        manifest = out_dir / f"part-{part}.manifest.json"
        files += json.loads(manifest.read_text())
        manifest.unlink()
    weight_map = {}
    for entry, final in zip(files, shard_names(len(files))):
        os.chmod(out_dir / entry["file"], 0o644)  # safetensors writes 0600
        os.replace(out_dir / entry["file"], out_dir / final)
        weight_map.update({name: final for name in entry["names"]})
    if len(files) > 1:
        write_index(out_dir, weight_map, sum(e["bytes"] for e in files))


# safetensors dtype codes (https://github.com/huggingface/safetensors#format) of the dtypes models hold.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}

TensorEntry = tuple[str, torch.dtype, tuple[int, ...]]
"""``(name, dtype, shape)`` of a tensor a streaming writer will receive."""


def _nbytes(entry: TensorEntry) -> int:
    _, dtype, shape = entry
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Split ``entries`` in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorEntry]] = []
    size = 0
    for entry in entries:
        if not shards or (shards[-1] and size + _nbytes(entry) > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += _nbytes(entry)
    return shards


def _safetensors_header(entries: list[TensorEntry]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``entries`` in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        name, dtype, shape = entry
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + _nbytes(entry)]}
        offset += _nbytes(entry)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data that follows starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


class StreamingSafetensorsWriter:
    """Writes tensors straight to disk as they arrive, into shards planned from their names, dtypes and
    shapes, so that memory never holds more than the tensor being written.

    A safetensors header lists every tensor of its file with its byte range, so it can be written
    before the data once the tensors' shapes are known; the tensors must then arrive in ``entries``
    order. Files get their final ``model-0000i-of-0000N.safetensors`` (or ``model.safetensors``)
    names; ``close`` checks that every planned tensor came and writes the index.
    """

    def __init__(self, out_dir: str | os.PathLike, entries: list[TensorEntry], *, max_shard_bytes: int = 5 * 2**30):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this writer copies native bytes")
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self._queue = [(i, entry) for i, shard in enumerate(self.shards) for entry in shard]
        self._next = 0
        self._stream = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor '{name}' was not planned (all {len(self._queue)} planned tensors are written)")
        shard, (want, dtype, shape) = self._queue[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want, dtype, shape):
            raise ValueError(f"expected tensor '{want}' {dtype} {list(shape)}, got '{name}' "
                             f"{tensor.dtype} {list(tensor.shape)}")
        if self._next == 0 or self._queue[self._next - 1][0] != shard:
            self._open(shard)
        self._stream.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = open(self.out_dir / self.files[shard], "wb")
        self._stream.write(_safetensors_header(self.shards[shard]))

    def close(self) -> None:
        """Close the last file and write the index (several shards); every planned tensor must have come."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._next != len(self._queue):
            raise ValueError(f"tensor '{self._queue[self._next][1][0]}' was planned but never written")
        if len(self.files) > 1:
            weight_map = {name: file for file, shard in zip(self.files, self.shards) for name, _, _ in shard}
            write_index(self.out_dir, weight_map, sum(_nbytes(entry) for shard in self.shards for entry in shard))


def copy_hf_metadata(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy ``config.json`` (required) and whichever tokenizer/generation files exist from ``src`` to
    ``dst`` (created if needed); returns the names copied. Everything but the weights."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(src) / "config.json", Path(dst) / "config.json")
    copied = ["config.json"]
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
