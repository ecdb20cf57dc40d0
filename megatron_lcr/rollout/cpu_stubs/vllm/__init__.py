"""A stand-in for the ``vllm`` package, put on a CPU SGLang server's PYTHONPATH only (never imported here).

SGLang's generic rotary embedding (``sglang/srt/layers/rotary_embedding/base.py``, 0.5.23) imports
``vllm._custom_ops.rotary_embedding`` while it builds the model on any device it has no kernel
branch for, CPU included, although on CPU it then computes RoPE in PyTorch and never calls it.
Real vLLM is not installed beside SGLang (and its CUDA build would not import on CPU), so this
package gives that import something to find. The launcher puts it first on the path of CPU servers
only (``megatron_lcr.rollout.sglang.server_env``), so it also shadows a real ``vllm`` there.
"""
