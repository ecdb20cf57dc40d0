"""The body of SGLang's ``POST /update_weights_from_tensor``: SGLang's pickled form and our pickle-free one.

What SGLang expects, verified in its sources (``python/sglang/srt/managers/io_struct.py``,
``entrypoints/http_server.py``, ``managers/tokenizer_manager.py``, ``managers/tp_worker.py``,
``model_executor/model_runner.py``, ``utils/patch_torch.py``, ``utils/common.py``) and in its callers
(SGLang's own ``Engine.update_weights_from_tensor``; slime's
``slime/backends/megatron_utils/update_weight/update_weight_from_tensor.py``):

- ``UpdateWeightsFromTensorReqInput``: ``serialized_named_tensors`` (a list, one entry per engine TP
  rank), ``load_format`` (None: the model's ``load_weights``; ``"direct"``; ``"flattened_bucket"``; or a
  ``--custom-weight-loader``), ``flush_cache`` (default True), ``abort_all_requests`` (default False),
  ``weight_version`` (optional string). The HTTP handler answers ``{success, message}``, 200 or 400.
- JSON has no bytes, so over HTTP each entry is a base64 string: ``MultiprocessingSerializer.serialize(
  obj, output_str=True)`` is ``base64(ForkingPickler.dumps(obj))``. TP rank r of the engine unpickles
  entry r, moves the tensors to its GPU and loads them. CUDA tensors travel as CUDA IPC handles (the
  memory stays the sender's, so it must outlive the request); ``monkey_patch_torch_reductions`` names
  the device by UUID so the receiver maps it to its own device index.
- SGLang's Engine sends the same serialized ``[(name, tensor), ...]`` list once per TP rank; slime
  instead gathers each colocated GPU's own copy (entry r points at GPU r's memory) and sends
  ``load_format="flattened_bucket"`` (one flat tensor plus metadata per dtype).

Ours, per bucket (:func:`serialize_bucket`), chosen by ``WeightSyncConfig.tensor_format``:

``sglang``       SGLang's Engine form: the pickled list of tensors, the same entry for every TP rank,
                 ``load_format`` None. The trainer's source (global rank 0) holds the bucket, so every
                 engine rank opens IPC handles into rank 0's GPU: engines on rank 0's node only (CUDA
                 IPC is node-local); needs ``sglang`` importable for its CUDA reductions. CPU tensors
                 (SGLang on a CPU machine) travel as shared-memory file names (torch's
                 ``file_system`` sharing strategy, set here) to a server on the same host.
``safetensors``  pickle-free, for the CPU reference server (and the in-process vLLM engine): each entry
                 is ``base64(safetensors.torch.save(bucket))`` and ``load_format`` is
                 ``"lcr_safetensors"``, a value of ours that SGLang does not know (it refuses it). The
                 bytes cross the socket: fine for tests and small models, not for 70B.
"""

from __future__ import annotations

import base64
import binascii
import io
from multiprocessing.reduction import ForkingPickler
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.multiprocessing  # noqa: F401 - registers torch's tensor reductions with ForkingPickler

LCR_SAFETENSORS = "lcr_safetensors"

NamedTensors = Sequence[tuple[str, torch.Tensor]]


def encode_safetensors(named: NamedTensors) -> str:
    """``base64(safetensors bytes)`` of ``(name, tensor)`` pairs (copied to CPU; names must be unique)."""
    from safetensors.torch import save

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in named}
    if len(tensors) != len(named):
        raise ValueError("a bucket names one tensor twice")
    return base64.b64encode(save(tensors)).decode("ascii")


def decode_safetensors_payload(entries: object, *, tp_size: int = 1) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs (on CPU) of an ``lcr_safetensors`` ``serialized_named_tensors`` list.

    Every entry holds the whole bucket, so the first serves every rank (an engine's ``load_weights``
    shards full tensors itself). Raises ValueError for anything but a list of at least ``tp_size``
    base64 strings of safetensors bytes. Pickle-free: safe on data from the network.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ValueError("serialized_named_tensors must be a list of base64 strings, one per TP rank")
    if len(entries) < tp_size:
        raise ValueError(f"serialized_named_tensors has {len(entries)} entries; the engine has {tp_size} TP ranks")
    try:  # strict a2b_base64 rejects non-alphabet bytes like b64decode(validate=True), about twice as fast
        raw = binascii.a2b_base64(entries[0], strict_mode=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"serialized_named_tensors[0] is not base64: {err}") from None
    try:
        return list(load(raw).items())
    except SafetensorError as err:
        raise ValueError(f"serialized_named_tensors[0] is not safetensors data: {err}") from None


def _sglang_entry(named: NamedTensors) -> str:
    """SGLang's ``MultiprocessingSerializer`` string of the ``(name, tensor)`` list: ``base64(ForkingPickler
    pickle)``. CUDA tensors go as IPC handles named by device UUID (SGLang's own reductions, so sglang
    must be importable); CPU tensors (SGLang on a CPU machine, same host) as shared-memory files."""
    devices = {tensor.device.type for _, tensor in named}
    if devices - {"cpu", "cuda"}:
        raise ValueError(f"tensor_format 'sglang' sends CPU or CUDA tensors, got devices {sorted(devices)}")
    if "cuda" in devices:
        try:  # newer SGLang patches inside serialize(); older ones leave it to the caller
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError:
            try:
                from sglang.srt.patch_torch import monkey_patch_torch_reductions
            except ImportError as err:
                raise RuntimeError(f"tensor_format 'sglang' with CUDA tensors needs the sglang package: {err}; "
                                   "install it or use tensor_format 'safetensors'") from None
        monkey_patch_torch_reductions()
    else:
        # The default strategy shares CPU storage by file descriptor, which cannot cross HTTP; by file
        # name it can (SGLang on CPU reads the same /dev/shm). Process-wide, as torch offers it.
        torch.multiprocessing.set_sharing_strategy("file_system")
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([(name, tensor.detach()) for name, tensor in named])
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class TensorFormat:
    """One serialisation of ``/update_weights_from_tensor``: how a bucket becomes an entry, and its load_format."""

    encode: Callable[[NamedTensors], str]
    """Bucket -> one ``serialized_named_tensors`` entry (a string: the body is JSON)."""
    load_format: str | None
    """The request's ``load_format`` (None: SGLang's default, the model's ``load_weights``)."""


TENSOR_FORMATS = {
    "sglang": TensorFormat(_sglang_entry, None),
    "safetensors": TensorFormat(encode_safetensors, LCR_SAFETENSORS),
}


def serialize_bucket(named: NamedTensors, tensor_format: str, *, tp_size: int) -> tuple[list[str], str | None]:
    """``(serialized_named_tensors, load_format)`` of one bucket for an engine with ``tp_size`` TP ranks."""
    fmt = TENSOR_FORMATS.get(tensor_format)
    if fmt is None:
        raise ValueError(f"tensor_format {tensor_format!r} is not one of {', '.join(TENSOR_FORMATS)}")
    entry = fmt.encode(named)
    return [entry] * tp_size, fmt.load_format
