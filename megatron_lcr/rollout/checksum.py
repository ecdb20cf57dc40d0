"""Per-tensor checksums that prove a rollout engine holds exactly the trainer's weights.

Both sides hash the same bytes: the tensor made contiguous on CPU in its stored dtype, plus its dtype
and shape (so a reshaped or recast tensor with equal bytes does not pass). The reference server
serves them at ``GET /lcr/weights_checksum``; the trainer computes them from the tensors it synced.
"""

from __future__ import annotations

import hashlib

import torch


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 hex digest of ``tensor``'s dtype, shape and raw bytes."""
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
