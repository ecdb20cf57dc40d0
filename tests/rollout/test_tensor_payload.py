"""The ``/update_weights_from_tensor`` payloads: our pickle-free safetensors form, and SGLang's pickled one.

The safetensors form is checked here byte for byte. SGLang's form needs CUDA tensors and the sglang
package (GPU only): those tests are marked ``gpu`` and skip without CUDA or sglang; on CPU only its
refusal of non-CUDA tensors runs.
"""

from __future__ import annotations

import base64
import importlib.util
import pickle

import subprocess
import sys

import pytest
import torch

from megatron_lcr.rollout.tensor_payload import (
    LCR_SAFETENSORS,
    decode_safetensors_payload,
    encode_safetensors,
    serialize_bucket,
)

HAS_SGLANG = importlib.util.find_spec("sglang") is not None


def _bucket() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=gen)
    return [
        ("model.layers.0.self_attn.q_proj.weight", weight.t()),  # non-contiguous: sent as its values
        ("model.norm.weight", torch.randn(4, generator=gen).to(torch.bfloat16)),
        ("model.embed_tokens.weight", torch.randn(3, 4, generator=gen, dtype=torch.float64).half()),
        ("step", torch.tensor([7], dtype=torch.int64)),
    ]


def test_safetensors_payload_round_trip_is_exact():
    bucket = _bucket()
    entries, load_format = serialize_bucket(bucket, "safetensors", tp_size=2)
    assert load_format == LCR_SAFETENSORS
    assert len(entries) == 2 and entries[0] == entries[1]  # one entry per engine TP rank
    assert all(isinstance(e, str) for e in entries)  # JSON-safe
    got = dict(decode_safetensors_payload(entries, tp_size=2))
    assert list(got) != [] and set(got) == {name for name, _ in bucket}
    for name, tensor in bucket:
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_safetensors_payload_errors_are_one_line():
    entry = encode_safetensors(_bucket())
    with pytest.raises(ValueError, match="must be a list of base64 strings"):
        decode_safetensors_payload(entry)  # a bare string, not a list
    with pytest.raises(ValueError, match="has 1 entries; the engine has 2 TP ranks"):
        decode_safetensors_payload([entry], tp_size=2)
    with pytest.raises(ValueError, match=r"serialized_named_tensors\[0\] is not base64"):
        decode_safetensors_payload(["not base64!"])
    with pytest.raises(ValueError, match=r"serialized_named_tensors\[0\] is not safetensors data"):
        decode_safetensors_payload([base64.b64encode(b"\x10" + bytes(7) + b"no json header").decode()])


def test_a_pickle_is_never_unpickled(tmp_path):
    # A pickle whose loading would create a file: decoding it as safetensors must fail without loading it.
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    entry = base64.b64encode(pickle.dumps(Payload())).decode()
    with pytest.raises(ValueError, match="not safetensors data"):
        decode_safetensors_payload([entry])
    assert not marker.exists()


def test_unknown_format_and_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="tensor_format 'pickle' is not one of sglang, safetensors"):
        serialize_bucket(_bucket(), "pickle", tp_size=1)
    with pytest.raises(ValueError, match="names one tensor twice"):
        encode_safetensors([("a", torch.zeros(2)), ("a", torch.ones(2))])


def test_sglang_format_sends_cpu_tensors_by_shared_memory_file_name(tmp_path):
    # What SGLang on a CPU does with an entry (MultiprocessingSerializer.deserialize): unpickle it in
    # another process. The default fd-passing strategy could not cross HTTP; file names can.
    bucket = _bucket()
    entries, load_format = serialize_bucket(bucket, "sglang", tp_size=2)
    assert load_format is None and len(entries) == 2 and entries[0] == entries[1]
    assert torch.multiprocessing.get_sharing_strategy() == "file_system"
    script = ("import base64, io, sys, torch\n"
              "import torch.multiprocessing\nfrom multiprocessing.reduction import ForkingPickler\n"
              "got = ForkingPickler.loads(base64.b64decode(sys.stdin.read()))\n"
              "torch.save(dict(got), sys.argv[1])\n")
    out = tmp_path / "got.pt"
    subprocess.run([sys.executable, "-c", script, str(out)], input=entries[0], text=True, check=True, timeout=60)
    got = torch.load(out)
    assert list(got) == [name for name, _ in bucket]
    for name, tensor in bucket:
        assert torch.equal(got[name], tensor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or HAS_SGLANG, reason="needs CUDA and no sglang installed")
def test_sglang_format_without_sglang_says_so():
    with pytest.raises(RuntimeError, match="needs the sglang package"):
        serialize_bucket([("w", torch.zeros(2, device="cuda"))], "sglang", tp_size=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_SGLANG, reason="needs CUDA and sglang")
def test_sglang_format_is_what_sglang_deserializes():
    from sglang.srt.utils import MultiprocessingSerializer

    bucket = [(name, t.cuda()) for name, t in _bucket()]
    entries, load_format = serialize_bucket(bucket, "sglang", tp_size=2)
    assert load_format is None and len(entries) == 2 and entries[0] == entries[1]
    # What an engine's TP rank does with its entry (tp_worker.update_weights_from_tensor).
    got = MultiprocessingSerializer.deserialize(entries[1])
    assert [name for name, _ in got] == [name for name, _ in bucket]
    for (_, mine), (_, theirs) in zip(bucket, got):
        assert torch.equal(mine, theirs)
