"""torchrun worker for tests/train/test_token_logprobs.py: the policy's log-probs of an engine teacher's
top-k ids (``ScoringSpec.teacher_topk``) at TP=2 (gloo), from logits columns and from hidden states.

Usage: ``topk_outputs.py OUT_DIR`` on 2 processes. Every rank builds the same packed row, full hidden
states, output weight ``[PADDED_VOCAB, H]``, top-k ids (masked slots included) and loss weights, keeps its
half of the vocabulary rows, runs ``response_outputs`` at sampling temperature 0.7 with distillation
temperature 1, and back-propagates ``sum(weights * topk_logp)``. It writes ``OUT_DIR/rank{r}.pt``: per head
kind the ``[n, R, k]`` values and the gradient on the hidden states (the logits path: on its logit columns).
"""

from __future__ import annotations

import sys
from pathlib import Path

SAMPLING_T, DISTILL_T = 0.7, 1.0
VOCAB, PADDED_VOCAB, HIDDEN, K = 37, 40, 16, 4


def inputs():
    import torch

    from megatron_lcr.train.micro_batches import TokenSequence, pack_micro_batch

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, VOCAB, (n, K), generator=g).tolist()  # noqa: E731
    seqs = [TokenSequence([3, 4, 5], [6, 7], teacher_topk_ids=ids(2), teacher_topk_logp=[[0.0] * K] * 2),
            TokenSequence([8] * 3, [9, 10, 11, 12, 36], teacher_topk_ids=[[0, 19, 20, 36], *ids(4)],
                          teacher_topk_logp=[[0.0] * K] * 5)]  # 19 | 20: the two ranks' shards meet there
    batch = pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=16)
    hidden = torch.randn(1, batch.input_ids.shape[1], HIDDEN, generator=g, dtype=torch.float64)
    out_weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5 * 3
    weights = torch.randn(*batch.teacher_topk_ids.shape, generator=g, dtype=torch.float64)
    return batch, hidden, out_weight, weights


def main(out_dir: str) -> None:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.train.token_logprobs import Head, ScoringSpec, response_outputs

    initialize_megatron(ParallelConfig(tensor_model_parallel_size=2), seed=1)
    batch, hidden, out_weight, weights = inputs()
    rows = PADDED_VOCAB // 2
    shard = out_weight[ps.get_tensor_model_parallel_rank() * rows:][:rows].float()
    spec = ScoringSpec(vocab_size=VOCAB, temperature=SAMPLING_T, distill_temperature=DISTILL_T, teacher_topk=True)
    result = {}
    for kind in ("logits", "hidden"):
        h = hidden.float().requires_grad_(True)
        logits = (h @ shard.T).detach().requires_grad_(True)
        head = Head(logits) if kind == "logits" else Head(h, shard)
        out = response_outputs(head, batch, spec)
        (out["topk_logp"] * weights.float()).sum().backward()
        result[kind] = {"topk_logp": out["topk_logp"].detach(), "grad": logits.grad if kind == "logits" else h.grad}
    torch.save(result, Path(out_dir) / f"rank{torch.distributed.get_rank()}.pt")
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:])
