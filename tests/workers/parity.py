"""torchrun worker for tests/models/test_parity.py: Megatron logits of Hugging Face checkpoints.

Usage: ``parity.py SPEC_JSON TP PP OUT_JSON [IMPL DTYPE]`` (defaults ``local float32``; the GPU
test passes ``auto bfloat16`` to get Transformer Engine layers where TE is installed). SPEC_JSON lists cases
``{"name", "model", "ids", "refs": {label: logits.pt}}``. For each case every rank builds its
Megatron chunk for the layout, loads the checkpoint through ``megatron_lcr.models.transfer``, runs
``forward_logits`` on ``ids`` ([B, S] int64) and, on the last pipeline stage's TP rank 0, records the
max abs difference to each reference. All cases share one process group, so Megatron's import and
the rendezvous are paid once per layout.
"""

from __future__ import annotations

import json
import sys

import torch


def megatron_logits(
    model_dir: str, input_ids: torch.Tensor, parallel, impl: str = "local", dtype: str = "float32"
) -> torch.Tensor | None:
    """Full logits on the last pipeline stage (None elsewhere) of the checkpoint in ``model_dir``."""
    from megatron.core import parallel_state as ps

    from megatron_lcr.models.builder import ModelConfig, build_gpt_model, resolved_vocab_size, use_transformer_engine
    from megatron_lcr.models.families import hf_arch
    from megatron_lcr.models.forward import forward_logits
    from megatron_lcr.models.hf_checkpoint import SafetensorsReader, load_hf_config
    from megatron_lcr.models.transfer import load_hf_into_chunk, maps_for_rank

    arch = hf_arch(load_hf_config(model_dir))
    cfg = ModelConfig(hf_path=model_dir, params_dtype=dtype, transformer_impl=impl)
    model = build_gpt_model(
        arch,
        cfg,
        parallel,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    te = use_transformer_engine(cfg)
    maps = maps_for_rank(arch, te=te, padded_vocab=resolved_vocab_size(arch, cfg, parallel))
    load_hf_into_chunk(
        model,
        maps,
        SafetensorsReader(model_dir).get,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
    )
    return forward_logits([model], input_ids, vocab_size=arch.vocab_size)


def main(spec_path: str, tp: int, pp: int, out_path: str, impl: str = "local", dtype: str = "float32") -> None:
    from megatron.core import parallel_state as ps

    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize_megatron(parallel)
    with open(spec_path) as f:
        cases = json.load(f)
    results: dict[str, dict[str, float]] = {}
    for case in cases:
        logits = megatron_logits(case["model"], torch.load(case["ids"]), parallel, impl, dtype)
        if logits is None:
            continue
        results[case["name"]] = {}
        for label, ref_path in case["refs"].items():
            ref = torch.load(ref_path)
            if ref.shape != logits.shape:  # broadcasting would hide a wrong vocab or sequence length
                shapes = f"logits {tuple(logits.shape)} vs {label} {tuple(ref.shape)}"
                raise RuntimeError(f"{case['name']}: {shapes}")
            results[case["name"]][label] = (logits.cpu() - ref).abs().max().item()
    writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if writer and ps.get_data_parallel_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    destroy_megatron()


if __name__ == "__main__":  # Megatron's dist_checkpointing starts a multiprocessing Manager
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:7])
