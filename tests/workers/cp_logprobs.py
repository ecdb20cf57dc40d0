"""torchrun worker for tests/train/test_token_logprobs.py: the trainer's per-token values under CP=2.

Usage: ``cp_logprobs.py OUT_DIR`` on 2 processes. Megatron is initialised with context_parallel_size
2 (gloo). Every rank builds the same packed row (segments padded to 2 * cp), the same full hidden
states ``[1, L, H]``, output weight ``[V, H]`` and loss weights. For each head kind (logits =
hidden @ weight.T, or hidden + weight for the fused kernels) it takes its zigzag part of the row,
runs ``cp_response_outputs`` (local log-prob/entropy, differentiable gather over the CP group) and
back-propagates ``sum(w_logp * logp) + sum(w_ent * entropy)``. It writes ``OUT_DIR/rank{r}.pt``:
per kind the ``[n, R]`` values and its share of the gradient on the full hidden states; the test
compares them, and the sum of the shares, with float64 PyTorch on the whole row.
"""

from __future__ import annotations

import sys
from pathlib import Path

TEMPERATURE = 0.7
VOCAB = 37  # the model's vocabulary; logits carry 3 padded columns beyond it
PADDED_VOCAB = 40
HIDDEN = 16


def inputs():
    import torch

    from megatron_lcr.train.micro_batches import PackLayout, TokenSequence, pack_micro_batch

    g = torch.Generator().manual_seed(0)
    seqs = [TokenSequence([3, 4, 5], [6, 7]), TokenSequence([8] * 3, [9, 10, 11, 12, 13, 14, 15, 16, 17]), TokenSequence([1, 2], [30])]
    batch = pack_micro_batch(seqs, [0, 1, 2], pad_id=0, pad_to=24, layout=PackLayout.for_layout(tp=1, cp=2, sequence_parallel=False))
    hidden = torch.randn(1, batch.input_ids.shape[1], HIDDEN, generator=g, dtype=torch.float64)
    out_weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    weights = torch.randn(2, *batch.response_index.shape, generator=g, dtype=torch.float64)
    return batch, hidden, out_weight, weights


def main(out_dir: str) -> None:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_lcr.data.packing import cu_seqlens
    from megatron_lcr.parallel.context import zigzag_split_packed
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.train.token_logprobs import Head, ScoringSpec, response_outputs

    initialize_megatron(ParallelConfig(context_parallel_size=2), seed=1)
    batch, hidden, out_weight, weights = inputs()
    spec = ScoringSpec(vocab_size=VOCAB, temperature=TEMPERATURE, entropy=True)
    result = {}
    for kind in ("logits", "hidden"):
        full = hidden.float().requires_grad_(True)
        local = zigzag_split_packed(full, cu_seqlens(batch.lengths), 2, ps.get_context_parallel_rank())
        head = Head(local @ out_weight.float().T) if kind == "logits" else Head(local, out_weight.float())
        out = response_outputs(head, batch, spec)
        ((out["logp"] * weights[0].float()).sum() + (out["entropy"] * weights[1].float()).sum()).backward()
        result[kind] = {"logp": out["logp"].detach(), "entropy": out["entropy"].detach(), "grad": full.grad,
                        "local_tokens": local.shape[1]}
    torch.save(result, Path(out_dir) / f"rank{torch.distributed.get_rank()}.pt")
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:])
