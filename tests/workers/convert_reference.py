"""torchrun worker for tests/models/test_convert_stream.py: Megatron's own save of Hugging Face models,
and Megatron's own load of the checkpoints the streaming converter wrote.

Usage: ``convert_reference.py SPEC_JSON`` on 4 processes (TP=2 x PP=2). SPEC_JSON lists cases
``{"name", "hf", "reference", "streamed", "dtype"}``. For each case every rank builds its model chunk
(``dtype``, local spec: it keeps norm weights in float32 whatever the dtype), fills it from the Hugging Face tensors through ``load_hf_into_chunk`` (as ``lcr train``
does from a HF directory) and saves the chunks with ``save_model`` (Megatron's ``dist_checkpointing``)
into ``reference``; then it builds a second chunk, loads ``streamed`` (a checkpoint the streaming
converter wrote at another layout) with ``load_model`` (what ``lcr train`` resume uses) and compares
every parameter with the first chunk's. Each rank writes ``{reference}.rank{R}.json``: how many
parameters it compared and the names of those that differ. All cases share one process group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def build_chunk(arch, cfg, parallel):
    from megatron.core import parallel_state as ps

    from megatron_lcr.models.builder import build_gpt_model

    return build_gpt_model(arch, cfg, parallel, pre_process=ps.is_pipeline_first_stage(),
                           post_process=ps.is_pipeline_last_stage())


def run_case(case: dict, parallel) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_lcr.models.builder import ModelConfig, resolved_vocab_size
    from megatron_lcr.models.families import hf_arch
    from megatron_lcr.models.hf_checkpoint import SafetensorsReader, load_hf_config
    from megatron_lcr.models.megatron_checkpoint import load_model, save_model
    from megatron_lcr.models.transfer import load_hf_into_chunk, maps_for_rank

    arch = hf_arch(load_hf_config(case["hf"]))
    cfg = ModelConfig(params_dtype=case["dtype"], transformer_impl="local")
    from_hf = build_chunk(arch, cfg, parallel)
    maps = maps_for_rank(arch, te=False, padded_vocab=resolved_vocab_size(arch, cfg, parallel))
    load_hf_into_chunk(from_hf, maps, SafetensorsReader(case["hf"]).get,
                       tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size())
    save_model([from_hf], case["reference"])

    loaded = build_chunk(arch, cfg, parallel)
    load_model([loaded], case["streamed"])
    expected = dict(from_hf.named_parameters())
    got = dict(loaded.named_parameters())
    differ = sorted(name for name in expected if not torch.equal(expected[name], got[name]))
    return {"compared": len(expected), "differ": differ}


def main(spec_path: str) -> None:
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron

    spec = json.loads(Path(spec_path).read_text())
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    initialize_megatron(parallel)
    rank = torch.distributed.get_rank()
    for case in spec["cases"]:
        report = run_case(case, parallel)
        Path(f"{case['reference']}.rank{rank}.json").write_text(json.dumps(report))
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:])
