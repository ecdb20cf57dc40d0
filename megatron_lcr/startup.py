"""Start of ``lcr train`` / ``sft`` / ``pretrain``: known library noise off, one line on the backend.

Why: on import and model build, Megatron-Core and torch warn about things a user cannot act on (Apex
and Transformer Engine absent, so Megatron falls back to torch norms and optimizers; Megatron's own
deprecated defaults and internal imports). About eight such warnings came before a run's first line
and buried anything that matters. ``quiet_known_warnings`` ignores exactly those, each matched by
message, category and the module that issues it, so any other warning still shows;
``announce_backend`` states the fallback once instead, on global rank 0.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the module loads before anything heavy: its filters must come first
    from megatron_lcr.models.builder import ModelConfig

KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # (message start, category, issuing module): regexes as for warnings.filterwarnings.
    # Apex / TE absent: megatron.core.{models.backends, models.gpt.gpt_layer_specs, optimizer, ...}
    # and megatron_fsdp's mixed_precision; announce_backend says what is used instead.
    (r"(Transformer Engine and )?Apex (is|are) not installed\. Falling back to", UserWarning,
     r"megatron(\.core|_fsdp)\."),
    # TransformerConfig's default cuda_graph_scope "full" (graphs are off unless configured).
    (r"full scope is deprecated\. Use empty cuda_graph_scope", UserWarning,
     r"megatron\.core\.transformer\.transformer_config\Z"),
    # Megatron's own imports and layer specs, not calls of ours.
    (r"The following imports from `dynamic_context\.py` will be removed", DeprecationWarning,
     r"megatron\.core\.inference\.contexts\Z"),
    (re.escape("The 'megatron.core.transformer.custom_layers.transformer_engine'"), DeprecationWarning,
     r"megatron\.core\.transformer\.multi_latent_attention\Z"),
    (r"MLP requires ffn_hidden_size, but it was not provided", DeprecationWarning,
     r"megatron\.core\.transformer\.spec_utils\Z"),
    (r"Warning: tp_group is None, using default tp group", DeprecationWarning, r"megatron\.core\."),
    # torch's own deprecation of torch.jit.script_method, used by libraries at import.
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning, r"torch\.jit\._script\Z"),
)


def quiet_known_warnings() -> None:
    """Ignore the ``KNOWN_WARNINGS`` in this process (ahead of -W / PYTHONWARNINGS filters)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def is_global_rank_zero() -> bool:
    """Global rank 0 of torchrun (RANK) or srun (SLURM_PROCID), or a single process (neither set)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def backend_summary(model: ModelConfig) -> str:
    """One line: the device and the layers, norms and optimizer Megatron uses (its own choice, read back)."""
    import torch
    from megatron.core import optimizer as megatron_optimizer  # Adam: TE's or Apex's fused, else torch's AdamW
    from megatron.core.models import backends  # HAVE_APEX: Apex's fused norms, else torch's

    from megatron_lcr.models.builder import use_transformer_engine

    have_te = importlib.util.find_spec("transformer_engine") is not None
    device = f"CUDA ({torch.cuda.device_count()} GPUs visible)" if torch.cuda.is_available() else "CPU"
    if use_transformer_engine(model):
        layers = "Transformer Engine layers and norms"
    else:
        layers = f"Megatron local layers, {'Apex' if backends.HAVE_APEX else 'torch'} norms"
    optimizer = {"transformer_engine": "Transformer Engine", "apex": "Apex"}.get(
        megatron_optimizer.Adam.__module__.split(".")[0], "torch")
    missing = [name for name, present in (("Apex", backends.HAVE_APEX), ("Transformer Engine", have_te)) if not present]
    absent = f" (no {', no '.join(missing)})" if missing else ""
    return f"lcr: {device}: {layers}, {optimizer} optimizer{absent}"


def announce_backend(model: ModelConfig) -> None:
    """Print ``backend_summary`` to stderr on global rank 0 (stdout carries the results JSON)."""
    if is_global_rank_zero():
        print(backend_summary(model), file=sys.stderr, flush=True)
