"""The streaming converter writes what Megatron's own save writes and reads what Megatron writes.

The reference is Megatron-Core itself: tests/workers/convert_reference.py builds each family's model
at TP=2 x PP=2 on gloo, fills it from the Hugging Face tensors and saves it with ``dist_checkpointing``
(as ``lcr train`` checkpoints are saved); Megatron's ``load_model`` then reads what the converter
streamed. Families: Llama (untied, rope scaling), Qwen2 (tied embeddings, QKV bias), Qwen3 (q/k norms,
head_dim != hidden/heads), all float32, and a bfloat16 Llama (the converter stores every tensor, norms
included, in the checkpoint's dtype; Megatron's local spec holds norms in float32 and loads them from
bfloat16 chunks exactly). The pure pieces (TP chunk boxes, the safetensors stream, the HF shapes) are
checked against hand-computed values, the ``safetensors`` library and ``transformers``' own models.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader

from megatron_lcr.models.convert import hf_to_megatron, megatron_to_hf
from megatron_lcr.models.dist_format import tp_chunks
from megatron_lcr.models.families import hf_arch
from megatron_lcr.models.hf_checkpoint import (
    SafetensorsReader,
    StreamingSafetensorsWriter,
    copy_hf_metadata,
    load_hf_config,
)
from megatron_lcr.models.weight_map import hf_shapes
from tests.distributed import WORKERS, run_torchrun
from tests.tiny_hf import FAMILIES, make_tiny_hf

# ---- pure pieces ----------------------------------------------------------------------------------


def test_tp_chunks_are_megatrons_shard_boxes():
    assert tp_chunks((8, 6), "replicated", 2) == [((0, 0), (8, 6))]
    assert tp_chunks((8, 6), "row", 2) == [((0, 0), (4, 6)), ((4, 0), (4, 6))]
    assert tp_chunks((8, 6), "col", 2) == [((0, 0), (8, 3)), ((0, 3), (8, 3))]
    # linear_fc1 [gate; up] with F = 4: rank 0 holds gate rows 0-1 and up rows 4-5, rank 1 gate 2-3 and up 6-7.
    assert tp_chunks((8, 6), "glu", 2) == [((0, 0), (2, 6)), ((2, 0), (2, 6)), ((4, 0), (2, 6)), ((6, 0), (2, 6))]
    assert tp_chunks((8, 6), "glu", 1) == [((0, 0), (4, 6)), ((4, 0), (4, 6))]  # gate and up apart even at TP=1
    with pytest.raises(ValueError, match="does not split into 4"):
        tp_chunks((6, 6), "glu", 2)


def test_streamed_safetensors_load_with_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g),
               "c": torch.randn(2, 2, generator=g).half(), "d": torch.randn(4, 3, generator=g).double()}
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    # 40-byte shards: a (30 B) alone, b (28 B) with c (8 B), d (96 B, over the limit) in a shard of its own.
    writer = StreamingSafetensorsWriter(tmp_path, entries, max_shard_bytes=40)
    for name, t in tensors.items():
        writer.add(name, t.t().contiguous().t() if t.dim() == 2 else t)  # a non-contiguous input is fine
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "b": "model-00002-of-00003.safetensors",
                                   "c": "model-00002-of-00003.safetensors", "d": "model-00003-of-00003.safetensors"}
    assert index["metadata"]["total_size"] == 30 + 28 + 8 + 96
    loaded = {}
    for file in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(tmp_path / file))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


def test_streamed_safetensors_refuse_tensors_out_of_plan(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    writer = StreamingSafetensorsWriter(tmp_path / "1", entries)
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        writer.add("b", torch.zeros(3))
    (tmp_path / "2").mkdir()
    writer = StreamingSafetensorsWriter(tmp_path / "2", entries)
    with pytest.raises(ValueError, match=r"expected tensor 'a' torch.float32 \[2\], got 'a' torch.float32 \[4\]"):
        writer.add("a", torch.zeros(4))
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'b' was planned but never written"):
        writer.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_shapes_are_the_transformers_models(tmp_path, family):
    hf = make_tiny_hf(family, tmp_path / "hf")
    saved = SafetensorsReader(hf).shapes()
    assert hf_shapes(hf_arch(load_hf_config(hf))) == saved


# ---- against Megatron's own save and load -----------------------------------------------------------


def bf16_copy(hf: Path, out: Path) -> Path:
    """The model in ``hf`` with its tensors rounded to bfloat16 (config and tokenizer unchanged)."""
    copy_hf_metadata(hf, out)
    save_file({name: t.to(torch.bfloat16) for name, t in load_file(hf / "model.safetensors").items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Per case: the HF model, the converter's checkpoints at TP2 PP2 and TP1 PP1, Megatron's own save."""
    root = tmp_path_factory.mktemp("stream")
    sources = {family: (make_tiny_hf(family, root / family / "hf"), "float32") for family in FAMILIES}
    sources["llama-bf16"] = (bf16_copy(sources["llama"][0], root / "llama-bf16" / "hf"), "bfloat16")
    cases = []
    for name, (hf, dtype) in sources.items():
        hf_to_megatron(hf, root / name / "streamed-tp2pp2", tp=2, pp=2, dtype=dtype)
        hf_to_megatron(hf, root / name / "streamed-tp1pp1", tp=1, pp=1, dtype=dtype)
        cases.append({"name": name, "hf": str(hf), "reference": str(root / name / "megatron"),
                      "streamed": str(root / name / "streamed-tp1pp1"), "dtype": dtype})
    (root / "spec.json").write_text(json.dumps({"cases": cases}))
    run_torchrun(WORKERS / "convert_reference.py", 4, [str(root / "spec.json")])
    return root


def dcp_layout(model_dir: Path) -> dict:
    """Key -> ('tensor', global shape, properties, sorted chunk boxes) or 'bytes', from the .metadata."""
    layout = {}
    for key, md in FileSystemReader(str(model_dir)).read_metadata().state_dict_metadata.items():
        if hasattr(md, "chunks"):
            boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
            layout[key] = ("tensor", tuple(md.size), md.properties, boxes)
        else:
            layout[key] = "bytes"
    return layout


def dcp_items(model_dir: Path) -> dict:
    """(key, chunk offsets) -> the stored chunk (a tensor, or the raw bytes of a ShardedObject), read
    straight from the files at the byte ranges the .metadata gives."""
    items = {}
    for index, info in FileSystemReader(str(model_dir)).read_metadata().storage_data.items():
        with open(model_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        offset = None if index.offset is None else tuple(index.offset)
        items[(index.fqn, offset)] = blob if offset is None else torch.load(io.BytesIO(blob), weights_only=True)
    return items


@pytest.mark.dist
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_checkpoint_is_what_megatron_saves(checkpoints, family):
    ours, megatron = checkpoints / family / "streamed-tp2pp2" / "model", checkpoints / family / "megatron" / "model"
    assert dcp_layout(ours) == dcp_layout(megatron)
    ours_items, megatron_items = dcp_items(ours), dcp_items(megatron)
    assert ours_items.keys() == megatron_items.keys()
    for key, expected in megatron_items.items():
        got = ours_items[key]
        same = got == expected if isinstance(expected, bytes) else got.dtype == expected.dtype and torch.equal(got, expected)
        assert same, key
    for name in ("metadata.json", "common.pt"):
        assert (ours / name).read_bytes() == (megatron / name).read_bytes(), name


@pytest.mark.dist
@pytest.mark.parametrize("family", [*FAMILIES, "llama-bf16"])
def test_megatron_loads_a_streamed_checkpoint_at_another_layout(checkpoints, family):
    # Written at TP=1 PP=1, loaded by Megatron's load_model into TP=2 x PP=2 chunks, bit for bit the
    # chunks Megatron fills from the HF tensors itself.
    reports = [json.loads((checkpoints / family / f"megatron.rank{rank}.json").read_text()) for rank in range(4)]
    assert all(report["compared"] > 0 for report in reports)
    assert [report["differ"] for report in reports] == [[], [], [], []]


@pytest.mark.dist
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_to_hf_reads_megatrons_own_checkpoint(checkpoints, family, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints / family / "megatron", ckpt)
    streamed = checkpoints / family / "streamed-tp2pp2"
    shutil.copytree(streamed / "hf", ckpt / "hf")
    shutil.copy(streamed / "lcr_checkpoint.json", ckpt / "lcr_checkpoint.json")
    megatron_to_hf(ckpt, tmp_path / "back")
    original, back = SafetensorsReader(checkpoints / family / "hf"), SafetensorsReader(tmp_path / "back")
    assert sorted(original.keys()) == sorted(back.keys())
    for name in original.keys():
        x, y = original.get(name), back.get(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
