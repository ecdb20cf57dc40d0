"""Block expansion (LLaMA Pro, Wu et al. 2024): a deeper model that computes the same function.

A decoder layer adds two residual branches to its input, ``x + attn(norm(x))`` then
``h + mlp(norm(h))``; each branch ends in one linear map (``self_attn.o_proj``, ``mlp.down_proj``).
A copy of a layer whose two output maps are zero adds nothing, so inserting such copies leaves the
logits unchanged, while the copy's other weights (norms, q/k/v, gate/up) start from trained values
and its output maps receive gradients from the first step (their input, the branch activations, is
not zero). That makes an expanded small model a cheap initialisation for a larger one with the same
tokenizer (the tiny teacher in ``examples/tiny/teacher``).

Placement follows the paper: the ``N`` layers are cut into equal groups and a copy of each group's
last layer goes after it. Deviation: the paper only adds ``P`` copies with ``P`` dividing ``N``; here
``P`` may also be a multiple of ``N`` (``P / N`` copies after every layer). Other counts are refused
rather than spread unevenly. Works for any checkpoint whose decoder layers are ``model.layers.{i}.``
with those two output maps (Llama, Qwen2, Qwen3); biases of the output maps are zeroed too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lcr.atomic import atomic_dir
from megatron_lcr.models.hf_checkpoint import (
    HFCheckpointError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    copy_hf_metadata,
    finalize_shards,
)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# The last linear map of each residual branch: zero in a copy, the copy is the identity.
_BRANCH_OUTPUTS = ("self_attn.o_proj.", "mlp.down_proj.")


class ExpandError(ValueError):
    """A block expansion that cannot be done as asked (layer counts, checkpoint layout)."""


@dataclass(frozen=True)
class NewLayer:
    """One decoder layer of the expanded model."""

    source: int
    """Index of the original layer whose weights it starts from."""
    identity: bool
    """True for an inserted copy (output maps zeroed); False for the original layer itself."""


def expansion_plan(num_layers: int, new_layers: int) -> list[NewLayer]:
    """The ``new_layers`` layers of a ``num_layers``-layer model expanded per the module docstring.

    E.g. ``(4, 6)``: layers 0, 1, copy of 1, 2, 3, copy of 3.
    """
    added = new_layers - num_layers
    if num_layers < 1 or added < 1:
        raise ExpandError(f"new layer count ({new_layers}) must exceed the current one ({num_layers})")
    if num_layers % added and added % num_layers:
        raise ExpandError(f"cannot spread {added} new layers evenly over {num_layers}: the added count "
                          f"({added}) must divide {num_layers} or be a multiple of it")
    group = max(num_layers // added, 1)  # original layers per group; a copy follows each group's last
    copies = max(added // num_layers, 1)  # copies after each group
    plan = []
    for layer in range(num_layers):
        plan.append(NewLayer(source=layer, identity=False))
        if (layer + 1) % group == 0:
            plan += [NewLayer(source=layer, identity=True)] * copies
    return plan


def expanded_tensor_names(names: list[str], plan: list[NewLayer]) -> list[tuple[str, str, bool]]:
    """``(new name, source name, zero)`` for every tensor of the expanded checkpoint, in layer order.

    ``names`` are the original checkpoint's tensor names; tensors outside ``model.layers`` pass
    through. ``zero``: the tensor is a copy's branch output, written as zeros of the source's shape.
    """
    per_layer: dict[int, list[str]] = {}
    others = []
    for name in names:
        match = _LAYER.match(name)
        if match:
            per_layer.setdefault(int(match.group(1)), []).append(match.group(2))
        else:
            others.append((name, name, False))
    num_layers = 1 + max((n.source for n in plan), default=-1)
    if sorted(per_layer) != list(range(num_layers)):
        raise ExpandError(f"checkpoint has decoder layers {sorted(per_layer)}, expected 0..{num_layers - 1}")
    out = []
    for index, layer in enumerate(plan):
        suffixes = per_layer[layer.source]
        if layer.identity and not all(any(s.startswith(p) for s in suffixes) for p in _BRANCH_OUTPUTS):
            raise ExpandError(f"layer {layer.source} has no {' / '.join(_BRANCH_OUTPUTS)} weights to zero "
                              "(not a Llama/Qwen decoder layer)")
        for suffix in suffixes:
            zero = layer.identity and suffix.startswith(_BRANCH_OUTPUTS)
            out.append((f"model.layers.{index}.{suffix}", f"model.layers.{layer.source}.{suffix}", zero))
    return out + others


def expanded_config(config: dict, plan: list[NewLayer]) -> dict:
    """``config.json`` of the expanded model: the new layer count; per-layer lists follow the plan."""
    if config.get("num_hidden_layers") != 1 + max(n.source for n in plan):
        raise ExpandError(f"config num_hidden_layers ({config.get('num_hidden_layers')}) does not match the "
                          f"plan's {1 + max(n.source for n in plan)} source layers")
    out = dict(config, num_hidden_layers=len(plan))
    if isinstance(config.get("layer_types"), list):  # e.g. Qwen2/3 sliding vs full attention per layer
        out["layer_types"] = [config["layer_types"][n.source] for n in plan]
    return out


def expand_checkpoint(src: str | os.PathLike, out: str | os.PathLike, new_layers: int, *,
                      overwrite: bool = False) -> dict:
    """Write the ``new_layers``-layer expansion of Hugging Face directory ``src`` to ``out``
    (config, safetensors, tokenizer files), atomically. Returns the new config."""
    src = Path(src)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(f"{config_file}: not found (is {src} a Hugging Face model directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config.get("num_hidden_layers"), int):
        raise HFCheckpointError(f"{config_file}: no integer 'num_hidden_layers'")
    plan = expansion_plan(config["num_hidden_layers"], new_layers)
    new_config = expanded_config(config, plan)
    reader = SafetensorsReader(src)
    names = expanded_tensor_names(reader.keys(), plan)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        copy_hf_metadata(src, tmp)  # tokenizer files byte for byte; config.json is replaced below
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        writer = ShardedSafetensorsWriter(tmp)
        for new, source, zero in names:
            tensor = reader.get(source)  # may view the memory-mapped file, shared by every read of a name
            writer.add(new, torch.zeros_like(tensor) if zero else tensor.clone())
        writer.close()
        finalize_shards(tmp, ["0"])
    return new_config
