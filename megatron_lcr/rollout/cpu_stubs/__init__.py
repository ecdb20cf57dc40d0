"""Import stubs that let real SGLang start on a CPU machine (see ``vllm/__init__.py``).

This directory (not the package) goes on a CPU server's PYTHONPATH; nothing here is imported by megatron_lcr.
"""
