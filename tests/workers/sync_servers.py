"""torchrun worker for tests/rollout/test_weight_sync.py: sync a TP=2 Megatron trainer into servers.

Usage: ``sync_servers.py HF_DIR URLS_COMMA OUT_JSON MODE``, MODE a ``WeightSyncConfig.mode`` (``disk``
writes next to OUT_JSON). The servers were started with a *different* model; after ``WeightSyncer.sync``
their log-probs of a fixed sequence must equal the trainer's. Then one optimizer step, a second sync,
and the same comparison. Rank 0 writes the numbers.
"""

from __future__ import annotations

import json
import os
import sys


def trainer_logprobs(policy, ids):
    """log p(token_t | tokens_<t) for t >= 1 from the Megatron policy (temperature 1)."""
    import torch

    from megatron_lcr.models.forward import forward_logits

    logits = forward_logits([c.module for c in policy.chunks], ids[None], vocab_size=policy.arch.vocab_size)
    if logits is None:
        return None
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return logp[:-1].gather(-1, ids[1:, None])[:, 0].tolist()


def main(hf_dir: str, urls: str, out_path: str, mode: str) -> None:
    import torch

    from megatron_lcr.data.synthetic_lm import SyntheticLMConfig, arithmetic_sequences
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.rollout.client import ClientConfig, RolloutClient
    from megatron_lcr.rollout.weight_sync import WeightSyncConfig, WeightSyncer
    from megatron_lcr.train.lm_step import lm_train_step, micro_batches_from_sequences
    from megatron_lcr.train.model_setup import build_policy
    from megatron_lcr.train.optimizer import OptimizerConfig, build_optimizer

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_megatron(parallel)
    policy = build_policy(ModelConfig(hf_path=hf_dir, params_dtype="float32"), parallel)
    rank0 = torch.distributed.get_rank() == 0
    client = RolloutClient(ClientConfig(urls=urls.split(","))) if rank0 else None
    disk_dir = os.path.join(os.path.dirname(out_path), "sync-disk")
    cfg = WeightSyncConfig(mode=mode, checksum=True, bucket_bytes=2**18, disk_dir=disk_dir)
    syncer = WeightSyncer(cfg, client, gpu_engines=False)  # reference servers: CPU engines
    syncer.connect()
    ids = torch.tensor([5, 17, 3, 99, 250, 7, 7, 42, 8, 600, 11, 12])
    results = {}

    def compare(label: str, version: str) -> None:
        stats = syncer.sync(policy, version)
        mine = trainer_logprobs(policy, ids)
        if rank0:
            scored = syncer.run(client.score([ids.tolist()]))
            per_server = syncer.run(client.score([ids.tolist()] * 4))  # spread over both servers
            theirs = scored[0].input_logprobs[1:]
            results[label] = {
                "stats": stats,
                "max_diff": max(abs(a - b) for a, b in zip(mine, theirs)),
                "servers": sorted({r.engine_url for r in per_server}),
                "max_diff_any_server": max(abs(a - b) for r in per_server for a, b in zip(mine, r.input_logprobs[1:])),
                "versions": sorted({r.weight_version for r in per_server}),
                "trainer_logprobs": mine,
            }

    compare("first", "1")
    cfg = OptimizerConfig(lr=1e-2)
    optimizer, scheduler = build_optimizer(cfg, policy.chunks, params_dtype=torch.float32,
                                           use_distributed_optimizer=False, total_steps=1)
    tokens = arithmetic_sequences(SyntheticLMConfig(), 4, 17)
    lm_train_step(policy.chunks, optimizer, scheduler, micro_batches_from_sequences(tokens, 4),
                  vocab_size=policy.arch.vocab_size)
    compare("after_step", "2")
    if rank0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    syncer.close()
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:5])
