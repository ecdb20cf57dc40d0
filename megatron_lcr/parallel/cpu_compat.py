"""Run Megatron-Core 0.16 on machines without CUDA (CPU tensors, gloo process groups).

Megatron-Core assumes a CUDA device in many places that have nothing to do with the maths: it
allocates buffers with ``device=torch.cuda.current_device()``, calls ``.cuda()``, keeps a CUDA RNG
tracker for tensor-parallel dropout, checks ``tensor.type() == 'torch.cuda.FloatTensor'`` in its
optimizers and synchronises streams. This module makes those sites work on CPU so that the *same*
model, optimizer, pipeline schedule and checkpoint code runs in CI and on laptops.

It is installed only by :func:`install`, which does nothing when CUDA is available: the GPU path
never sees any of it. Each patch below names the Megatron code it covers. Patches are global for
the process (Megatron keeps no handle we could scope them to) and idempotent.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def needed() -> bool:
    """True when Megatron must run without CUDA (the only case the patches are for)."""
    return not torch.cuda.is_available()


def _to_cpu_device(device):
    """Map any CUDA device spelling (``"cuda"``, ``"cuda:1"``, ``1``, ``torch.device("cuda")``) to CPU."""
    if isinstance(device, bool):  # bool is an int subclass; never a device
        return device
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call.

    Covers the ~80 ``device=torch.cuda.current_device()`` / ``device="cuda"`` factory calls and
    ``tensor.to("cuda")`` in Megatron-Core (embeddings, RoPE ``inv_freq``, p2p shape tensors in
    ``pipeline_parallel/p2p_communication.py``, DDP grad buffers, optimizer scalars), plus
    ``Tensor.cuda()`` (returns the tensor) and the ``Tensor.type()`` checks in
    ``optimizer/optimizer.py`` and ``optimizer/distrib_optimizer.py`` that only accept
    ``torch.cuda.*Tensor`` names.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _patch_rng_tracker() -> None:
    """Keep Megatron's model-parallel RNG tracker on the CPU generator.

    Covers ``megatron.core.tensor_parallel.random``: ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state`` (used by ``CudaRNGStatesTracker.fork`` and activation checkpointing) and
    ``CudaRNGStatesTracker.add``, which seeds a CUDA generator to create each named state.
    """
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    def add(self, name, seed):
        # Same checks as Megatron's add(); the state comes from a private CPU generator so that
        # the process-wide CPU stream (used for CPU weight initialisation) is left untouched.
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mrandom.CudaRNGStatesTracker.add = add


def _patch_torch_cuda() -> None:
    """Make the ``torch.cuda`` calls Megatron makes outside tensor factories harmless on CPU.

    ``current_device`` (everywhere; 0 is mapped to CPU by the mode above), ``synchronize`` /
    ``empty_cache`` (timers, checkpointing, optimizer), ``current_stream`` / ``stream`` /
    ``default_stream`` (DDP overlap and p2p), and ``manual_seed`` in
    ``model_parallel_cuda_manual_seed`` (there is no CUDA generator to seed).
    """
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.current_stream = lambda *args, **kwargs: _NullStream()
    cuda.default_stream = lambda *args, **kwargs: _NullStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


class _NullStream:
    """Stands in for a CUDA stream: CPU work is already ordered."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


@functools.cache
def _mode() -> _CudaToCpuMode:
    return _CudaToCpuMode()


def install() -> bool:
    """Install the CPU patches if CUDA is absent; returns whether they are active.

    Call before building any Megatron object. Safe to call more than once.
    """
    global _INSTALLED
    if not needed():
        return False
    if not _INSTALLED:
        _patch_torch_cuda()
        _patch_rng_tracker()
        # Entered for the rest of the process: Megatron allocates on "cuda" from many call sites
        # (forward, backward hooks, optimizer step, checkpoint load), not from one we could wrap.
        _mode().__enter__()
        _INSTALLED = True
    return True
