"""torchrun worker for tests/train/test_checkpoint_reshard.py: train and save at one TP, reload at another.

Usage: ``reshard_checkpoint.py save|load TP SPEC_JSON OUT_DIR``. SPEC_JSON holds ``ids`` (a ``[B, S]``
int64 tensor file), ``steps``, ``lr`` and ``cases``: ``{"name", "model"}`` with ``model`` a Hugging
Face directory. All cases share one process group (TP ranks, DP = 1), so Megatron's start-up is paid
once per mode.

``save``: build the fp32 policy from the HF weights, record its logits of ``ids`` (``step0``), take
``steps`` optimizer steps on a fixed batch, record the logits again (``trained``) and save the policy
with ``save_checkpoint`` under ``OUT_DIR/NAME``. ``load``: build the policy from that checkpoint
(``build_policy(load=...)``) and record its logits (``loaded``). Logits come from ``forward_logits`` on
the unwrapped chunks. Rank 0 writes ``OUT_DIR/NAME.MODE.pt`` (a dict of logits) and
``OUT_DIR/MODE.json`` (per case: checkpoint path, padded vocabulary, this rank's embedding shape).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def save_case(case: dict, spec: dict, parallel, out_dir: Path) -> tuple[dict, dict]:
    from megatron_lcr.data.synthetic_lm import SyntheticLMConfig, arithmetic_sequences
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.train.checkpoint import save_checkpoint
    from megatron_lcr.train.lm_step import lm_train_step, micro_batches_from_sequences
    from megatron_lcr.train.model_setup import build_policy
    from megatron_lcr.train.optimizer import OptimizerConfig, build_optimizer

    model_cfg = ModelConfig(hf_path=case["model"], params_dtype="float32", transformer_impl="local")
    policy = build_policy(model_cfg, parallel)
    ids = torch.load(spec["ids"])
    logits = {"step0": logits_of(policy, ids)}
    optimizer, scheduler = build_optimizer(
        OptimizerConfig(lr=spec["lr"]), policy.chunks, params_dtype=torch.float32,
        use_distributed_optimizer=False, total_steps=spec["steps"],
    )  # fmt: skip
    batch = micro_batches_from_sequences(arithmetic_sequences(SyntheticLMConfig(), 2, 17), 2)
    losses = [lm_train_step(policy.chunks, optimizer, scheduler, batch, vocab_size=policy.arch.vocab_size)["loss"] for _ in range(spec["steps"])]
    logits["trained"] = logits_of(policy, ids)
    ckpt = save_checkpoint(policy, parallel, out_dir / case["name"], step=spec["steps"], keep_last=1)
    return logits, {"checkpoint": str(ckpt), "losses": losses, **shapes(policy)}


def load_case(case: dict, spec: dict, parallel, out_dir: Path) -> tuple[dict, dict]:
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.train.model_setup import build_policy

    with open(out_dir / "save.json") as f:
        ckpt = json.load(f)[case["name"]]["checkpoint"]
    policy = build_policy(ModelConfig(params_dtype="float32", transformer_impl="local"), parallel, load=ckpt)
    return {"loaded": logits_of(policy, torch.load(spec["ids"]))}, {"checkpoint": ckpt, **shapes(policy)}


def logits_of(policy, ids: torch.Tensor) -> torch.Tensor:
    from megatron_lcr.models.forward import forward_logits

    return forward_logits([c.module for c in policy.chunks], ids, vocab_size=policy.arch.vocab_size)


def shapes(policy) -> dict:
    embedding = policy.chunks[0].module.embedding.word_embeddings.weight
    return {"padded_vocab_size": policy.model_cfg.padded_vocab_size, "embedding_shape": list(embedding.shape)}


def main(mode: str, tp: int, spec_path: str, out_dir: str) -> None:
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron

    with open(spec_path) as f:
        spec = json.load(f)
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    initialize_megatron(parallel)
    run_case = {"save": save_case, "load": load_case}[mode]
    report = {}
    for case in spec["cases"]:
        logits, report[case["name"]] = run_case(case, spec, parallel, Path(out_dir))
        if torch.distributed.get_rank() == 0:
            torch.save(logits, Path(out_dir) / f"{case['name']}.{mode}.pt")
    if torch.distributed.get_rank() == 0:
        (Path(out_dir) / f"{mode}.json").write_text(json.dumps(report, indent=2))
    destroy_megatron()


if __name__ == "__main__":  # Megatron's dist_checkpointing starts a multiprocessing Manager
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
