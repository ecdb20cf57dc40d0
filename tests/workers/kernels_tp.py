"""torchrun worker for tests/kernels/test_tensor_parallel.py: the fused ops at TP=2 against TP=1.

Usage: ``kernels_tp.py OUT_JSON IMPL [IMPL ...]`` on 2 processes (gloo). Every rank builds the same
full problem from one seed, keeps its vocabulary shard for three layouts (even split; uneven split
600 | 403; rank 1 holding only padding; Triton, under its interpreter, on the uneven one) and runs
logprob/entropy and the three KL kinds, from hidden states and from logits, with random upstream
gradients. It records, per check, the max abs difference
to the same op at TP=1 on the full weight (values, ``d_hidden``, this rank's rows of ``d_weight``).
Then, with Megatron's parallel state at TP=2, it compares ``logprob_entropy`` on the weight of a
Megatron ``ColumnParallelLinear`` output layer to that layer + ``vocab_parallel_cross_entropy``
(log-probs, input gradient, weight gradient), with ``reduce_grad_hidden=True`` on the raw input and
with ``False`` behind ``copy_to_tensor_model_parallel_region``; and, on a one-layer GPTModel (tied
and untied embeddings), the hidden-state path (``output_layer_returns_hidden`` + ``output_weight``)
against the logits path, every parameter's gradient. Rank 0 writes the max over ranks.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

T, H, H_TEACHER, VALID = 37, 24, 16, 1000
LAYOUTS = {"even": (504, 504), "uneven": (600, 403), "padding_rank": (1000, 16)}  # rows per rank
TEMPERATURE = 0.7


def problem(padded: int):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(padded, H, generator=gen) * (4.0 / H**0.5)
    h_t = torch.randn(T, H_TEACHER, generator=gen)
    w_t = torch.randn(padded, H_TEACHER, generator=gen) * (4.0 / H_TEACHER**0.5)
    labels = torch.randint(0, VALID, (T,), generator=gen)
    labels[:6] = torch.tensor([0, 503, 504, 599, 600, VALID - 1])  # both sides of every shard edge
    labels[7::5] = -100
    grads = torch.randn(3, T, generator=gen)
    return hidden, weight, h_t, w_t, labels, grads


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def run_logprob(hidden, weight, labels, grads, *, start, group, config, from_logits):
    """``(logp, entropy, d_input, d_weight)`` of one call; ``weight`` is the shard (or full) weight."""
    from megatron_lcr.kernels import logprob_entropy, logprob_entropy_from_logits

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if from_logits:
        logits = (h @ w.t()).detach().requires_grad_()
        logp, ent = logprob_entropy_from_logits(logits, labels, temperature=TEMPERATURE, vocab_start=start,
                                                valid_vocab_end=VALID, tp_group=group, config=config)  # fmt: skip
        (logp * grads[0] + ent * grads[1]).sum().backward()
        return logp, ent, logits.grad, logits.grad
    logp, ent = logprob_entropy(h, w, labels, temperature=TEMPERATURE, vocab_start=start, valid_vocab_end=VALID,
                                tp_group=group, config=config)  # fmt: skip
    (logp * grads[0] + ent * grads[1]).sum().backward()
    return logp, ent, h.grad, w.grad


def run_kl(tensors, grads, kind, *, start, group, config, from_logits):
    """``(kl, d_student_input, d_student_weight, d_teacher_input)`` of one call."""
    from megatron_lcr.kernels import kl_divergence, kl_divergence_from_logits

    h_s, w_s, h_t, w_t = (t.clone().requires_grad_() for t in tensors)
    mask = torch.arange(T) % 4 != 2
    kwargs = dict(kind=kind, beta=0.4, temperature=TEMPERATURE, mask=mask, vocab_start=start,
                  valid_vocab_end=VALID, tp_group=group, config=config)  # fmt: skip
    if from_logits:
        z_s, z_t = (h_s @ w_s.t()).detach().requires_grad_(), (h_t @ w_t.t()).detach().requires_grad_()
        kl = kl_divergence_from_logits(z_s, z_t, **kwargs)
        (kl * grads[2]).sum().backward()
        return kl, z_s.grad, z_s.grad, z_t.grad
    kl = kl_divergence(h_s, w_s, h_t, w_t, **kwargs)
    (kl * grads[2]).sum().backward()
    return kl, h_s.grad, w_s.grad, h_t.grad


def compare_layout(name: str, rows: tuple[int, int], impl: str, errors: dict) -> None:
    from megatron_lcr.kernels import KernelConfig

    rank = dist.get_rank()
    # Several tiles, chunks and splits per shard; large Triton tiles (the interpreter pays per tile).
    config = KernelConfig(impl=impl, token_chunk_size=16, vocab_chunk_size=256, block_tokens=64,
                          block_vocab=128, block_hidden=32, vocab_splits=2)  # fmt: skip
    hidden, weight, h_t, w_t, labels, grads = problem(sum(rows))
    start, stop = sum(rows[:rank]), sum(rows[: rank + 1])
    group = dist.group.WORLD
    for from_logits in (False, True):
        tag = f"{impl}/{name}/{'logits' if from_logits else 'hidden'}"
        full = run_logprob(hidden, weight, labels, grads, start=0, group=None, config=config, from_logits=from_logits)
        tp = run_logprob(
            hidden, weight[start:stop], labels, grads, start=start, group=group, config=config, from_logits=from_logits
        )
        errors[f"{tag}/logp"] = max_err(tp[0], full[0])
        errors[f"{tag}/entropy"] = max_err(tp[1], full[1])
        if from_logits:
            errors[f"{tag}/d_logits"] = max_err(tp[2], full[2][:, start:stop])
        else:
            errors[f"{tag}/d_hidden"] = max_err(tp[2], full[2])
            errors[f"{tag}/d_weight"] = max_err(tp[3], full[3][start:stop])
        for kind in ("forward", "reverse", "jsd"):
            full_kl = run_kl(
                (hidden, weight, h_t, w_t), grads, kind, start=0, group=None, config=config, from_logits=from_logits
            )
            shards = (hidden, weight[start:stop], h_t, w_t[start:stop])
            tp_kl = run_kl(shards, grads, kind, start=start, group=group, config=config, from_logits=from_logits)
            errors[f"{tag}/{kind}/kl"] = max_err(tp_kl[0], full_kl[0])
            if from_logits:
                errors[f"{tag}/{kind}/d_student_logits"] = max_err(tp_kl[1], full_kl[1][:, start:stop])
                errors[f"{tag}/{kind}/d_teacher_logits"] = max_err(tp_kl[3], full_kl[3][:, start:stop])
            else:
                errors[f"{tag}/{kind}/d_student_hidden"] = max_err(tp_kl[1], full_kl[1])
                errors[f"{tag}/{kind}/d_student_weight"] = max_err(tp_kl[2], full_kl[2][start:stop])
                errors[f"{tag}/{kind}/d_teacher_hidden"] = max_err(tp_kl[3], full_kl[3])


def compare_megatron_output_layer(errors: dict) -> None:
    """Our op on a Megatron ColumnParallelLinear's weight vs the layer + vocab_parallel_cross_entropy."""
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megatron_lcr.kernels import KernelConfig, logprob_entropy, megatron_vocab_shard

    padded = 1008
    layer = tensor_parallel.ColumnParallelLinear(
        H, padded, config=ModelParallelConfig(tensor_model_parallel_size=2), init_method=torch.nn.init.normal_,
        bias=False, gather_output=False,
    )  # fmt: skip
    hidden, _, _, _, labels, grads = problem(padded)
    labels = labels.clamp(min=0)  # Megatron's cross-entropy has no ignore_index
    start, group = megatron_vocab_shard(layer.weight)
    padding = torch.arange(start, start + layer.weight.shape[0]) >= VALID

    x = hidden.clone().requires_grad_()
    logits, _ = layer(x[:, None, :])  # [T, 1, V_local], Megatron's [s, b, h] layout
    logits = (logits.float() / TEMPERATURE).masked_fill(padding, float("-inf"))
    megatron_logp = -tensor_parallel.vocab_parallel_cross_entropy(logits, labels[:, None])[:, 0]
    (megatron_logp * grads[0]).sum().backward()
    megatron_dw = layer.weight.grad.clone()
    layer.weight.grad = None

    config = KernelConfig(impl="torch")
    for reduce_inside in (True, False):
        x2 = hidden.clone().requires_grad_()
        inp = x2 if reduce_inside else tensor_parallel.copy_to_tensor_model_parallel_region(x2)
        logp, _ = logprob_entropy(inp, layer.weight, labels, temperature=TEMPERATURE, vocab_start=start,
                                  valid_vocab_end=VALID, tp_group=group, reduce_grad_hidden=reduce_inside,
                                  config=config)  # fmt: skip
        (logp * grads[0]).sum().backward()
        tag = f"megatron/reduce_grad_hidden={reduce_inside}"
        errors[f"{tag}/logp"] = max_err(logp, megatron_logp)
        errors[f"{tag}/d_hidden"] = max_err(x2.grad, x.grad)
        errors[f"{tag}/d_weight"] = max_err(layer.weight.grad, megatron_dw)
        layer.weight.grad = None


def tiny_gpt(tied: bool):
    """A one-layer Megatron GPTModel at TP=2 (local spec, fp32, CPU init), vocabulary 1008 (1000 real)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=2, bias_activation_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, use_cpu_initialization=True,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=1008, max_sequence_length=64,
                    share_embeddings_and_output_weights=tied, position_embedding_type="rope")  # fmt: skip


def compare_gpt_hidden_path(errors: dict) -> None:
    """A GPTModel's logits path vs its hidden-state path (output layer bypassed): logp and every grad."""
    from megatron_lcr.kernels import (
        KernelConfig,
        logprob_entropy,
        logprob_entropy_from_logits,
        megatron_vocab_shard,
        output_layer_returns_hidden,
        output_weight,
    )
    from megatron_lcr.models.forward import causal_mask

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VALID, (2, 24), generator=gen)
    labels = torch.randint(0, VALID, (48,), generator=gen)
    labels[::7] = -100
    g_logp, g_ent = torch.randn(48, generator=gen), torch.randn(48, generator=gen)
    args = (ids, torch.arange(24).expand(2, 24), causal_mask(24, torch.device("cpu")))
    config = KernelConfig(impl="torch", token_chunk_size=16, vocab_chunk_size=128)
    for tied in (False, True):
        torch.manual_seed(3)
        model = tiny_gpt(tied)
        start, group = megatron_vocab_shard(output_weight(model))
        kw = dict(temperature=TEMPERATURE, vocab_start=start, valid_vocab_end=VALID, tp_group=group, config=config)
        results = []
        for use_hidden in (False, True):
            model.zero_grad()
            if use_hidden:
                with output_layer_returns_hidden(model):
                    hidden = model(*args)  # [b, s, h]
                logp, ent = logprob_entropy(hidden.reshape(48, -1), output_weight(model), labels, **kw)
            else:
                logits = model(*args)  # [b, s, V_local]
                logp, ent = logprob_entropy_from_logits(logits.reshape(48, -1), labels, **kw)
            (logp * g_logp + ent * g_ent).sum().backward()
            results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (lp_a, grads_a), (lp_b, grads_b) = results
        tag = f"gpt/tied={tied}"
        errors[f"{tag}/logp"] = max_err(lp_b, lp_a)
        errors[f"{tag}/d_params"] = max(max_err(grads_b[n], grads_a[n]) for n in grads_a)
        errors[f"{tag}/num_params"] = 0.0 if len(grads_a) >= 8 else 1.0


def main(out_path: str, impls: list[str]) -> None:
    if "triton" in impls:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron

    torch.set_num_threads(1)
    initialize_megatron(ParallelConfig(tensor_model_parallel_size=2))
    errors: dict[str, float] = {}
    t0 = time.perf_counter()
    compare_megatron_output_layer(errors)
    compare_gpt_hidden_path(errors)
    for impl in impls:
        t1 = time.perf_counter()
        for name, rows in LAYOUTS.items():
            if impl == "triton" and name != "uneven":
                continue  # interpreter time; the shard logic around the kernels is shared with torch
            compare_layout(name, rows, impl, errors)
        print(f"rank {dist.get_rank()}: {impl} layouts took {time.perf_counter() - t1:.1f}s", flush=True)
    print(f"rank {dist.get_rank()}: checks took {time.perf_counter() - t0:.1f}s", flush=True)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, errors)
    if dist.get_rank() == 0:
        worst = {key: max(e[key] for e in gathered) for key in errors}
        with open(out_path, "w") as f:
            json.dump(worst, f, indent=1)
    destroy_megatron()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
