"""torchrun worker for tests/kernels/test_topk.py: ``token_logits`` at TP=2 (uneven rows 30 | 20) against
float64 on the full weight. Usage: ``topk_tp.py OUT_JSON`` on 2 processes (gloo); rank 0 writes the max
abs error over ranks per check."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from megatron_lcr.kernels.topk import token_logits, token_logits_from_logits

T, H, V, K, TEMP, SPLIT = 13, 24, 50, 4, 0.7, 30


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    ids = torch.randint(0, V, (T, K), generator=gen)
    ids[0] = torch.tensor([SPLIT - 1, SPLIT, 0, V - 1])  # both sides of the shard edge
    grad = torch.randn(T, K, generator=gen)
    start, stop = (0, SPLIT) if rank == 0 else (SPLIT, V)

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = (h64 @ w64.t() / TEMP).gather(1, ids)
    (ref * grad.double()).sum().backward()

    h, w = hidden.clone().requires_grad_(), weight[start:stop].clone().requires_grad_()
    out = token_logits(h, w, ids, temperature=TEMP, vocab_start=start, valid_vocab_end=V, tp_group=dist.group.WORLD)
    (out * grad).sum().backward()
    logits = (hidden @ weight[start:stop].t()).requires_grad_()
    from_logits = token_logits_from_logits(logits, ids, temperature=TEMP, vocab_start=start, valid_vocab_end=V,
                                           tp_group=dist.group.WORLD)
    (from_logits * grad).sum().backward()
    d_logits = torch.zeros(T, V, dtype=torch.float64).scatter_add_(1, ids, grad.double() / TEMP)[:, start:stop]

    def err(a, b) -> float:
        return float((a.detach().double() - b.detach().double()).abs().max())

    errors = torch.tensor([err(out, ref), err(h.grad, h64.grad), err(w.grad, w64.grad[start:stop]),
                           err(from_logits, ref), err(logits.grad, d_logits)], dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    if rank == 0:
        names = ["hidden/value", "hidden/d_hidden", "hidden/d_weight", "logits/value", "logits/d_logits"]
        with open(out_path, "w") as f:
            json.dump(dict(zip(names, errors.tolist())), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
