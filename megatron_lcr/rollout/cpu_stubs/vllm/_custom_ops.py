"""The one name SGLang imports from ``vllm._custom_ops`` on CPU; see the package docstring."""


def rotary_embedding(*args, **kwargs):
    """Never called by SGLang on CPU (it uses its PyTorch RoPE); fail loudly if that ever changes."""
    raise RuntimeError(
        "megatron_lcr's CPU stub of vllm._custom_ops.rotary_embedding was called: this SGLang version "
        "uses vLLM's CUDA rotary kernel on CPU, which the stub cannot provide (run SGLang on a GPU, or "
        "a version that computes RoPE in PyTorch on CPU)")
