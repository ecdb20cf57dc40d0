"""profiling/peak.py: NVML device names find their datasheet row; precisions a GPU lacks give no peak."""

from __future__ import annotations

import pytest

from megatron_lcr.profiling.peak import peak_tflops, precision_of


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5),  # SXM: 1,979 TFLOPS with sparsity / 2
    ("NVIDIA H100 80GB HBM3", "fp8", 1979.0),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "fp8", 1670.5),
    ("NVIDIA H200", "bf16", 989.5),
    ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA GH200 480GB", "bf16", 989.5),  # not the H200 row
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("NVIDIA B200", "fp8", 4500.0),
    ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L4", "bf16", 121.0),  # not the L40S row
    ("NVIDIA A10G", "bf16", 125.0),
])
def test_nvml_names_find_their_row(name, precision, tflops):
    value, source = peak_tflops(name, precision)
    assert value == tflops and precision in source


def test_missing_precision_or_gpu_gives_none():
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp8") is None  # Ampere has no FP8 tensor cores
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None


def test_precision_follows_the_run_config():
    assert precision_of("bfloat16", None) == "bf16"
    assert precision_of("float16", None) == "bf16"
    assert precision_of("float32", None) == "fp32"
    assert precision_of("bfloat16", "hybrid") == "fp8"
