"""megatron_lcr: long-context reasoning post-training on Megatron-Core.

Built: GRPO / DAPO / GSPO / CISPO with DePO and DePO-IW, rollouts from SGLang, vLLM or ``lcr serve`` with
weight sync; LongBlocks and RULER-style short/long context data; ``lcr sft``, ``lcr pretrain`` and
checkpoint conversion. Planned: dGRPO, on-policy distillation from a teacher, the sparse-to-dense
workflow.
"""

__version__ = "0.1.0"
