"""`lcr convert` in both directions, through the real CLI.

The references are the original Hugging Face files (bit-identical tensors) and the Hugging Face
model's own logits. Bad inputs must fail with one line, exit 1, and leave no output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lcr.models.hf_checkpoint import SafetensorsReader
from tests.tiny_hf import hf_logits, make_tiny_hf

REPO = Path(__file__).resolve().parents[2]


def lcr(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "megatron_lcr.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lcr: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = SafetensorsReader(a_dir), SafetensorsReader(b_dir)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.dist
def test_hf_to_megatron_tp2_pp2_and_back_is_bit_identical(tmp_path):
    # Qwen2 with tied embeddings and QKV bias: the last pipeline stage holds a copy of the embedding
    # that must not be exported a second time.
    hf = make_tiny_hf("qwen2", tmp_path / "hf")
    assert_ok(lcr("convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "2"))
    meta = json.loads((tmp_path / "ckpt" / "lcr_checkpoint.json").read_text())
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (2, 2)
    assert meta["padded_vocab_size"] == 1024  # 1000 padded to a multiple of 128 * TP
    assert_ok(lcr("convert", "megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")))

    assert_same_tensors(hf, tmp_path / "back")
    # Under the default 5 GiB shard size the model is one file, as save_pretrained writes it.
    assert (tmp_path / "back" / "model.safetensors").is_file()
    assert not (tmp_path / "back" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(hf, ids), hf_logits(tmp_path / "back", ids))
    # The tokenizer travelled with the weights.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "back").get_vocab() == AutoTokenizer.from_pretrained(hf).get_vocab()


@pytest.mark.dist
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_checkpoint_written_at_tp2_converts_back_into_small_shards(tmp_path, family):
    hf = make_tiny_hf(family, tmp_path / "hf")
    assert_ok(lcr("convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "ckpt"), "--tp", "2"))
    assert_ok(lcr("convert", "megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"),
                  "--max-shard-gb", "0.0005"))
    assert_same_tensors(hf, tmp_path / "back")
    # ~0.5 MB shards: the writer must split them, and the index must name every tensor in its file
    # with the byte total of the tensors.
    shards = sorted((tmp_path / "back").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    original = SafetensorsReader(hf)
    assert set(index["weight_map"]) == set(original.keys())
    for shard in shards:
        assert set(load_file(shard)) == {n for n, f in index["weight_map"].items() if f == shard.name}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in map(original.get, original.keys()))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_hf("llama", tmp_path_factory.mktemp("llama") / "hf")


def test_unknown_architecture_is_rejected(tmp_path, llama_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (bad / "config.json").write_text(json.dumps(config))
    proc = lcr("convert", "hf-to-megatron", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "unsupported architecture", "GPTNeoXForCausalLM")
    assert not (tmp_path / "out").exists()


def test_tp_that_does_not_divide_heads_is_rejected(tmp_path, llama_dir):
    proc = lcr("convert", "hf-to-megatron", "--hf", str(llama_dir), "--out", str(tmp_path / "out"), "--tp", "3")
    assert_one_line_error(proc, "num_attention_heads 8 is not divisible by tp(3)")
    assert not (tmp_path / "out").exists()


def test_missing_safetensors_shard_is_rejected(tmp_path, llama_dir):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    tensors = load_file(llama_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, sharded / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    (sharded / "model-00002-of-00002.safetensors").unlink()
    proc = lcr("convert", "hf-to-megatron", "--hf", str(sharded), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "model-00002-of-00002.safetensors", "missing")
    assert not (tmp_path / "out").exists()


def test_corrupt_config_json_is_rejected(tmp_path, llama_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    (bad / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes())
    proc = lcr("convert", "hf-to-megatron", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "config.json", "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_rejected(tmp_path, llama_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    proc = lcr("convert", "hf-to-megatron", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "model.layers.2.mlp.up_proj.weight")
    assert not (tmp_path / "out").exists()


def test_misshapen_tensor_is_rejected_before_anything_is_written(tmp_path, llama_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:8]
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    proc = lcr("convert", "hf-to-megatron", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "model.layers.1.self_attn.k_proj.weight", "[8, 64]", "[16, 64]")
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_match_its_config_is_rejected(tmp_path, llama_dir):
    assert_ok(lcr("convert", "hf-to-megatron", "--hf", str(llama_dir), "--out", str(tmp_path / "ckpt")))
    config_file = tmp_path / "ckpt" / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 96  # the checkpoint's MLP is 128 wide
    config_file.write_text(json.dumps(config))
    proc = lcr("convert", "megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "decoder.layers.mlp.linear_fc1.weight", "[4, 256, 64]", "[4, 192, 64]")
    assert not (tmp_path / "out").exists()


def test_truncated_and_missing_checkpoints_are_rejected(tmp_path, llama_dir):
    assert_ok(lcr("convert", "hf-to-megatron", "--hf", str(llama_dir), "--out", str(tmp_path / "ckpt")))
    shard = sorted((tmp_path / "ckpt" / "model").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = lcr("convert", "megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, shard.name, "truncated")
    assert not (tmp_path / "out").exists()

    proc = lcr("convert", "megatron-to-hf", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "nowhere", "not found")

    (tmp_path / "ckpt" / "lcr_checkpoint.json").unlink()
    proc = lcr("convert", "megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "lcr_checkpoint.json")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path, llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = lcr("convert", "hf-to-megatron", "--hf", str(llama_dir), "--out", str(out))
    assert_one_line_error(proc, "already exists")
    assert (out / "keep.txt").read_text() == "mine"
