"""Configuration of the fused log-prob / entropy / KL kernels, and which implementation runs.

Two implementations share one interface: Triton kernels for CUDA tensors, and a chunked PyTorch path
that is the CPU implementation and the reference. ``impl="auto"`` picks Triton when the tensors are on
a CUDA device and Triton imports, else PyTorch. ``impl="triton"`` on CPU tensors needs Triton's
interpreter (``TRITON_INTERPRET=1`` set before the first kernel import), which is how the Triton
kernels are tested on machines without a GPU.

Triton tiles: on a GPU with ``autotune`` on, each kernel times a small space of tiles on its first
call per (hidden size, local vocabulary, dtype) and keeps the fastest (``triton_impl.TUNING_SPACE``);
with ``autotune`` off, and always under the interpreter (where timings mean nothing), it runs the one
tile given by ``block_*``, ``num_warps`` and ``num_stages``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

IMPLS = ("auto", "triton", "torch")


@dataclass(kw_only=True, frozen=True)
class KernelConfig:
    """How the vocabulary-sized computations are tiled, and by which implementation."""

    impl: str = "auto"
    """"auto" (Triton on CUDA when installed, else torch), "triton" or "torch"."""
    token_chunk_size: int = 512
    """torch path: tokens (rows) per logits tile."""
    vocab_chunk_size: int = 8192
    """Vocabulary columns per tile (torch path) and per backward chunk of the Triton path (columns)."""
    autotune: bool = True
    """Triton on GPUs: time a small tile space per (H, V_local, dtype) on first use; False: the fixed tile."""
    block_tokens: int = 64
    """Triton: tokens per fixed tile and per block of the vocabulary-split heuristic (power of two >= 16)."""
    block_vocab: int = 128
    """Triton: vocabulary columns per program tile (a power of two >= 16) of the fixed tile."""
    block_hidden: int = 64
    """Triton: hidden units per step of the fixed tile's matmul inner loop (a power of two >= 16)."""
    num_warps: int = 8
    """Triton: warps per program of the fixed tile (GPU only; ignored by the interpreter)."""
    num_stages: int = 3
    """Triton: software-pipelining stages of the fixed tile's matmul loop (GPU only)."""
    programs_per_sm: int = 4
    """Triton forward: the vocabulary is split over programs until there are this many per SM (count)."""
    vocab_splits: int = 0
    """Triton forward: programs along the vocabulary per token block; 0 picks it from programs_per_sm."""

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        for name in ("token_chunk_size", "vocab_chunk_size", "num_warps", "num_stages", "programs_per_sm"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("block_tokens", "block_vocab", "block_hidden"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):  # tl.arange needs powers of two
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        if self.vocab_splits < 0:
            raise ValueError(f"vocab_splits must be >= 0 (0 = automatic), got {self.vocab_splits}")
        if self.vocab_chunk_size % self.block_vocab:
            raise ValueError(
                f"vocab_chunk_size ({self.vocab_chunk_size}) must be a multiple of block_vocab ({self.block_vocab})"
            )


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_impl(config: KernelConfig, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` under ``config.impl``.

    Raises ValueError when ``impl="triton"`` cannot run: Triton missing, or CPU tensors without the
    interpreter.
    """
    if config.impl == "torch":
        return "torch"
    usable = triton_available() and (device.type == "cuda" or triton_interpreting())
    if config.impl == "auto":
        return "triton" if usable and device.type == "cuda" else "torch"
    if not triton_available():
        raise ValueError("impl='triton' but the triton package is not installed (pip install triton)")
    if not usable:
        raise ValueError(
            f"impl='triton' with tensors on {device}: Triton runs on CUDA devices, or on CPU only under "
            "its interpreter (set TRITON_INTERPRET=1 before the kernels are imported)"
        )
    return "triton"
