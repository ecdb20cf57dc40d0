"""What our vLLM servers' workers add to vLLM: weight updates from the trainer and the weight version.

vLLM mixes :class:`LCRWorkerExtension` into each of its workers (``--worker-extension-cls
megatron_lcr.rollout.vllm_worker.LCRWorkerExtension``); the client reaches its ``lcr_*`` methods with
one ``POST /collective_rpc {"method", "kwargs"}`` per operation, which vLLM's development mode
(``VLLM_SERVER_DEV_MODE=1``) serves and runs on every worker (TP/PP rank) of the server. The request
side is :class:`megatron_lcr.rollout.vllm.VLLMServerAPI`.

This module runs in vLLM's own environment, which lacks our dependencies: it imports only the
standard library, torch, vllm and our torch-only modules (``update_group``, ``tensor_payload``).

**Why vLLM's layerwise reload, not ``model.load_weights``.** After start-up vLLM post-processes the
loaded weights (``process_weights_after_loading``): on its CPU build every linear layer's weight is
repacked into a oneDNN / sgl-kernel handle and the parameter itself shrinks to size 0
(``vllm/model_executor/layers/utils.py: dispatch_cpu_unquantized_gemm``); quantised GPU layers are
repacked likewise. A later ``model.load_weights`` writes into those stale parameters, so the layers
keep computing with the old packed weights while norms and embeddings change: a half-overwritten
model. vLLM's reload (``vllm/model_executor/model_loader/reload/layerwise.py``, used by
``GPUModelRunner.reload_weights`` and by vLLM's own NCCL weight-transfer engine) restores every
layer to its checkpoint layout on the meta device (``initialize_layerwise_reload``), buffers what
``load_weights`` delivers, and, once a layer has all its elements, materialises it, loads it, reruns
its post-processing and copies the result into the original tensors (``finalize_layerwise_reload``
finishes layers that never completed and puts back the untouched ones).

**One session per sync, not one reload per bucket.** A layer is processed when all of its elements
have arrived; a fused layer (``qkv_proj`` from q/k/v, ``gate_up_proj`` from gate/up) whose
checkpoint tensors fall into two buckets would, with a reload per bucket, be finalised half-loaded:
the missing rows are the uninitialised memory ``materialize_layer`` allocated. So buckets load inside
one session, as vLLM's NCCL engine does (``start_weight_update`` ... ``finish_weight_update``):
:meth:`~LCRWorkerExtension.lcr_begin_update`, any number of bucket loads, then
:meth:`~LCRWorkerExtension.lcr_end_update`. A session must deliver every tensor of a fused layer
(a full sync does); layers it does not touch keep their weights. While a session is open the
model's layers sit on the meta device: generation must be paused. A directory update is one whole
reload (``Worker.reload_weights(weights_path=...)``, vLLM's own path, which also moves the model path).

**Weight version.** The server's weight version lives here, in each worker, so it is what the
server holds now: it starts at ``"default"`` (what SGLang and vLLM report for launch weights; a
restarted server is back at its launch weights), a bucket update records the version it carries and
the session's end makes it current, a directory update sets it at once. :meth:`lcr_model_info` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

LAUNCH_VERSION = "default"
SESSION_OPEN = "a weight-update session is already open"
"""Error text of a second begin; the HTTP client recognises "already open" and closes the stale session."""


@dataclass(kw_only=True)
class _UpdateState:
    """One worker's update state (kept on the worker as ``_lcr_state``)."""

    weight_version: str = LAUNCH_VERSION
    """Version of the weights the worker holds."""
    pending_version: str | None = None
    """Version the open session's buckets carry; current once the session ends."""
    session_open: bool = False
    """Between lcr_begin_update and lcr_end_update (the model's layers are on the meta device)."""
    groups: dict[str, tuple[Any, str]] = field(default_factory=dict)
    """Weight-update groups joined, by name: (process group, backend)."""


def _torch_dtype(name: str) -> torch.dtype:
    """``'bfloat16'`` or ``'torch.bfloat16'`` -> ``torch.bfloat16``."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class LCRWorkerExtension:
    """Methods vLLM adds to its worker class; ``self`` is the worker (``model_runner``, ``vllm_config``,
    ``device``, ``rank``). Each is called on every worker of the server by ``/collective_rpc``."""

    def _lcr(self) -> _UpdateState:
        # vLLM never calls an extension's __init__: the state is made on first use.
        state = self.__dict__.get("_lcr_state")
        if state is None:
            state = self.__dict__["_lcr_state"] = _UpdateState()
        return state

    def _lcr_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def lcr_model_info(self) -> dict:
        """What this worker serves: model path (moves with a directory update), weight version, log-prob
        mode, and the Hugging Face ``model_type`` / ``architectures`` of the loaded config."""
        model_config = self.vllm_config.model_config
        hf_config = model_config.hf_config
        return {"model_path": str(model_config.model), "weight_version": self._lcr().weight_version,
                "logprobs_mode": str(model_config.logprobs_mode), "model_type": getattr(hf_config, "model_type", None),
                "architectures": list(getattr(hf_config, "architectures", None) or []) or None,
                "update_open": self._lcr().session_open}

    # ------------------------------------------------------------------ sessions

    def lcr_begin_update(self) -> None:
        """Open a session: every layer goes back to its checkpoint layout, on the meta device."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        state = self._lcr()
        if state.session_open:
            raise RuntimeError(f"{SESSION_OPEN} on worker {self.rank}: end it first (lcr_end_update)")
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._lcr_model())
        state.session_open, state.pending_version = True, None

    def lcr_end_update(self) -> dict:
        """Close the session: finish unfinished layers, restore untouched ones; its version becomes current."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        state = self._lcr()
        if not state.session_open:
            raise RuntimeError(f"no weight-update session is open on worker {self.rank} (lcr_begin_update first)")
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._lcr_model(), self.vllm_config.model_config)
        # vLLM's finish_weight_update drops LoRA state derived from the old weights; so do we.
        self.model_runner.reset_lora_state()
        state.session_open = False
        if state.pending_version is not None:
            state.weight_version, state.pending_version = state.pending_version, None
        return {"weight_version": state.weight_version}

    def _lcr_load(self, weights: list[tuple[str, torch.Tensor]], weight_version: str | None) -> None:
        from vllm.config import set_current_vllm_config

        state = self._lcr()
        if not state.session_open:
            raise RuntimeError(f"no weight-update session is open on worker {self.rank}: a bucket loads between "
                               "lcr_begin_update and lcr_end_update (see megatron_lcr/rollout/vllm_worker.py)")
        with set_current_vllm_config(self.vllm_config):
            self._lcr_model().load_weights(weights)
        if weight_version is not None:
            state.pending_version = str(weight_version)

    # ------------------------------------------------------------------ transports

    def lcr_init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                       group_name: str, backend: str) -> None:
        """Join the trainer's weight-update group as rank ``rank_offset + worker rank`` (rank 0 is the trainer)."""
        from megatron_lcr.rollout.update_group import join_update_group

        # A group of the same name is one a dead trainer formed: the new one replaces it.
        group = join_update_group(backend=backend, master_address=master_address, master_port=int(master_port),
                                  world_size=int(world_size), rank=int(rank_offset) + self.rank, group_name=group_name,
                                  timeout_s=1800)
        self._lcr().groups[group_name] = (group, backend)

    def lcr_destroy_group(self, group_name: str) -> None:
        self._lcr().groups.pop(group_name, None)

    def lcr_update_from_group(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                              weight_version: str | None = None) -> None:
        """Receive one bucket (one broadcast from rank 0 per tensor, in ``names`` order) and load it."""
        from megatron_lcr.rollout.update_group import broadcast_from_source

        if group_name not in self._lcr().groups:
            raise RuntimeError(f"worker {self.rank} is not in weight-update group {group_name!r} "
                               "(lcr_init_group first)")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) differ")
        group, backend = self._lcr().groups[group_name]
        # gloo (a CPU trainer or CPU workers) receives into host memory; load_weights copies to the device.
        device = torch.device("cpu") if backend == "gloo" else self.device
        weights = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty([int(s) for s in shape], dtype=_torch_dtype(dtype), device=device)
            weights.append((name, broadcast_from_source(group, tensor)))
        self._lcr_load(weights, weight_version)

    def lcr_update_from_tensors(self, payload: str, weight_version: str | None = None) -> None:
        """Load one bucket sent as our ``lcr_safetensors`` entry (base64 safetensors bytes, no pickle)."""
        from megatron_lcr.rollout.tensor_payload import decode_safetensors_payload

        weights = decode_safetensors_payload([payload])
        self._lcr_load([(name, tensor.to(self.device)) for name, tensor in weights], weight_version)

    def lcr_update_from_disk(self, model_path: str, weight_version: str | None = None) -> dict:
        """Reload every weight from a directory of safetensors files (vLLM's reload; the model path moves there)."""
        state = self._lcr()
        if state.session_open:
            raise RuntimeError(f"worker {self.rank} has a weight-update session open: end it before a directory update")
        self.reload_weights(weights_path=str(model_path), is_checkpoint_format=True)
        if weight_version is not None:
            state.weight_version = str(weight_version)
        return {"weight_version": state.weight_version}
