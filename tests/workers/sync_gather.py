"""torchrun worker for tests/rollout/test_weight_sync.py: gather a policy's HF tensors on rank 0.

Usage: ``sync_gather.py HF_DIR TP PP OUT_JSON``. Builds the policy from the Hugging Face directory at
TP x PP (DP = the rest), runs ``hf_tensors_on_source`` on every rank, and on rank 0 records, per
tensor, whether it is bit-identical to the file's, plus the order of names.
"""

from __future__ import annotations

import json
import sys


def main(hf_dir: str, tp: int, pp: int, out_path: str) -> None:
    import torch

    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.models.hf_checkpoint import SafetensorsReader
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.rollout.weight_sync import hf_tensors_on_source
    from megatron_lcr.train.model_setup import build_policy

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize_megatron(parallel)
    policy = build_policy(ModelConfig(hf_path=hf_dir, params_dtype="float32"), parallel)
    pairs = list(hf_tensors_on_source(policy))
    if torch.distributed.get_rank() == 0:
        reader = SafetensorsReader(hf_dir)
        result = {
            "names": [name for name, _ in pairs],
            "identical": {name: torch.equal(tensor, reader.get(name)) for name, tensor in pairs},
            "expected": sorted(reader.keys()),
        }
        with open(out_path, "w") as f:
            json.dump(result, f)
    else:
        assert not pairs, f"rank {torch.distributed.get_rank()} yielded tensors"
    destroy_megatron()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
