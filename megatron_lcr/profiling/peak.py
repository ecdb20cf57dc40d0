"""Peak dense FLOP/s of NVIDIA data-center GPUs, keyed by the name NVML reports: MFU's denominator.

Numbers are the vendors' datasheets, per GPU, **dense** (datasheets quote tensor-core figures "with
sparsity", twice the dense rate: those are halved here). ``bf16`` also stands for fp16 (same rate);
``fp32`` is the non-tensor-core rate: what float32 matmuls get while torch leaves TF32 off, its
default. A GPU or precision missing here gives no MFU unless ``lcr profile --peak-tflops`` says
what to divide by.

Sources (NVIDIA datasheets, tensor-core figures with sparsity / 2):
- H100 SXM / H100 NVL / H100 PCIe: "NVIDIA H100 Tensor Core GPU" datasheet: BF16 1,979* / 1,671* /
  1,513* TFLOPS, FP8 3,958* / 3,341* / 3,026*, FP32 67 / 60 / 51 (GH200's GPU is an H100 SXM).
- H200 SXM / H200 NVL: "NVIDIA H200 Tensor Core GPU" datasheet: BF16 1,979* / 1,671*, FP8 3,958* /
  3,341*, FP32 67 / 60.
- A100 (SXM and PCIe, 40 and 80 GB): "NVIDIA A100 Tensor Core GPU" datasheet: BF16 312 dense (624*),
  FP32 19.5; no FP8.
- B200: "NVIDIA HGX B200" datasheet, per GPU: FP16/BF16 4.5* PFLOPS, FP8 9* PFLOPS, FP32 75 TFLOPS;
  GB200 (GB200 NVL72 datasheet, per GPU): 5* / 10* PFLOPS, FP32 80 TFLOPS.
- L40S: "NVIDIA L40S" datasheet: BF16 362.05 dense (733*), FP8 733 dense (1,466*), FP32 91.6.
- L4: "NVIDIA L4 Tensor Core GPU" datasheet: BF16 242*, FP8 485*, FP32 30.3.
- A10 / A10G: "NVIDIA A10 Tensor Core GPU" datasheet: BF16 125 dense (250*), FP32 31.2; no FP8.
"""

from __future__ import annotations

import re

# (pattern matched against the NVML name, model, {precision: dense TFLOPS}); the first match wins, so
# more specific names come first (GH200 before H200, "H100 NVL" before H100).
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"\bGH200\b", "GH200 (H100 SXM)", {"bf16": 989.5, "fp8": 1979.0, "fp32": 67.0}),
    (r"\bGB200\b", "GB200", {"bf16": 2500.0, "fp8": 5000.0, "fp32": 80.0}),
    (r"\bB200\b", "B200", {"bf16": 2250.0, "fp8": 4500.0, "fp32": 75.0}),
    (r"\bH200 NVL\b", "H200 NVL", {"bf16": 835.5, "fp8": 1670.5, "fp32": 60.0}),
    (r"\bH200\b", "H200 SXM", {"bf16": 989.5, "fp8": 1979.0, "fp32": 67.0}),
    (r"\bH100 NVL\b", "H100 NVL", {"bf16": 835.5, "fp8": 1670.5, "fp32": 60.0}),
    (r"\bH100 PCIe\b", "H100 PCIe", {"bf16": 756.5, "fp8": 1513.0, "fp32": 51.0}),
    (r"\bH100\b", "H100 SXM", {"bf16": 989.5, "fp8": 1979.0, "fp32": 67.0}),  # "NVIDIA H100 80GB HBM3"
    (r"\bA100\b", "A100", {"bf16": 312.0, "fp32": 19.5}),
    (r"\bL40S\b", "L40S", {"bf16": 362.05, "fp8": 733.0, "fp32": 91.6}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp8": 242.5, "fp32": 30.3}),
    (r"\bA10G?\b", "A10", {"bf16": 125.0, "fp32": 31.2}),
)

_PRECISION = {"bfloat16": "bf16", "float16": "bf16", "float32": "fp32", "fp8": "fp8"}


def precision_of(params_dtype: str, fp8: str | None) -> str:
    """The peak column a run's matmuls use: ``fp8`` with Transformer Engine FP8, else by dtype."""
    return "fp8" if fp8 else _PRECISION[params_dtype]


def peak_tflops(gpu_name: str, precision: str) -> tuple[float, str] | None:
    """``(dense TFLOPS, which table row)`` of an NVML device name at ``precision`` (bf16/fp8/fp32), or
    None when the GPU or that precision is not in the table."""
    for pattern, model, peaks in PEAK_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return (peaks[precision], f"{model} {precision} (datasheet, dense)") if precision in peaks else None
    return None
