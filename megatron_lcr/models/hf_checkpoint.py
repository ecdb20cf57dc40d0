"""Reading and writing Hugging Face checkpoints tensor by tensor.

Reading goes through ``safetensors.safe_open`` (memory-mapped), so a converter touches one tensor at a
time and a 70B checkpoint never has to fit in one process's memory. Writing buffers tensors into
shards of at most ``max_shard_bytes`` and writes ``model.safetensors.index.json`` like
``transformers``' ``save_pretrained`` does. Every problem with the input is a
:class:`HFCheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
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
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._files = self._index()
        self._handles: dict[str, object] = {}

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
        handle = self._handles.get(str(file))
        if handle is None:
            handle = self._handles[str(file)] = self._open(file).__enter__()
        try:
            return handle.get_tensor(name)
        except Exception as err:
            raise HFCheckpointError(f"{file}: cannot read tensor '{name}' ({err})") from None


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


def finalize_shards(out_dir: str | os.PathLike, parts: list[str]) -> None:
    """Rename the parts of every writer (in ``parts`` order) to final shard names; write the index."""
    out_dir = Path(out_dir)
    files = []
    for part in parts:
        manifest = out_dir / f"part-{part}.manifest.json"
        files += json.loads(manifest.read_text())
        manifest.unlink()
    if len(files) == 1:
        os.chmod(out_dir / files[0]["file"], 0o644)  # safetensors writes 0600
        os.replace(out_dir / files[0]["file"], out_dir / SINGLE_NAME)
        return
    weight_map = {}
    for i, entry in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.chmod(out_dir / entry["file"], 0o644)  # safetensors writes 0600
        os.replace(out_dir / entry["file"], out_dir / final)
        weight_map.update({name: final for name in entry["names"]})
    index = {"metadata": {"total_size": sum(e["bytes"] for e in files)}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


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
