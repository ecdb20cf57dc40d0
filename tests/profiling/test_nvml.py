"""profiling/nvml.py: without NVIDIA GPUs (or without nvidia-ml-py) the sampler says why in one line
and records nothing; the summary of samples equals a hand computation; on a GPU it samples for real."""

from __future__ import annotations

import sys
import time

import pytest

from megatron_lcr.profiling.nvml import GpuInfo, GpuSample, GpuSampler, summarise


def _has_nvidia_driver() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:  # noqa: BLE001 - no package, no library, no driver: all mean "no NVML"
        return False


@pytest.mark.skipif(_has_nvidia_driver(), reason="this machine has NVML: the GPU test covers it")
def test_without_a_driver_nvml_is_unavailable_in_one_line():
    with GpuSampler(interval_s=0.01) as sampler:
        time.sleep(0.05)
    line = sampler.status_line()
    assert line.startswith("NVML unavailable: ") and "\n" not in line
    assert sampler.unavailable and sampler.samples == [] and sampler.gpus == []
    assert summarise(sampler.samples, sampler.gpus) == []


def test_without_nvidia_ml_py_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with GpuSampler() as sampler:
        pass
    assert sampler.status_line() == 'NVML unavailable: nvidia-ml-py is not installed (pip install -e ".[profile]")'


def test_bad_interval_is_rejected():
    with pytest.raises(ValueError, match="interval must be > 0 s, got 0"):
        GpuSampler(interval_s=0)


def test_summary_per_gpu_inside_the_window_equals_a_hand_computation():
    gib = 2**30
    gpus = [GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", memory_total=80 * gib),
            GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", memory_total=80 * gib)]
    samples = [
        GpuSample(time=9.0, index=0, util_pct=100.0, memory_used=70 * gib, power_w=700.0),  # before the window
        GpuSample(time=10.0, index=0, util_pct=50.0, memory_used=10 * gib, power_w=300.0),
        GpuSample(time=10.0, index=1, util_pct=0.0, memory_used=1 * gib, power_w=None),  # no power reading
        GpuSample(time=11.0, index=0, util_pct=90.0, memory_used=30 * gib, power_w=500.0),
        GpuSample(time=11.0, index=1, util_pct=20.0, memory_used=2 * gib, power_w=None),
        GpuSample(time=12.0, index=0, util_pct=70.0, memory_used=20 * gib, power_w=400.0),
    ]
    gpu0, gpu1 = summarise(samples, gpus, windows=[(10.0, 10.5), (10.9, 12.0)])
    assert gpu0 == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "samples": 3, "util_mean_pct": 70.0,
                    "util_max_pct": 90.0, "memory_max_gib": 30.0, "memory_total_gib": 80.0,
                    "power_mean_w": 400.0, "power_max_w": 500.0}
    assert gpu1["util_mean_pct"] == 10.0 and gpu1["memory_max_gib"] == 2.0
    assert gpu1["power_mean_w"] is None and gpu1["power_max_w"] is None
    everything = summarise(samples, gpus)[0]
    assert everything["samples"] == 4 and everything["util_max_pct"] == 100.0 and everything["memory_max_gib"] == 70.0


@pytest.mark.gpu
def test_on_a_gpu_the_sampler_reads_every_device_while_it_works():
    import torch

    with GpuSampler(interval_s=0.05) as sampler:
        a = torch.randn(4096, 4096, device="cuda")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            a = a @ a
            a = a / a.norm()
        torch.cuda.synchronize()
    assert sampler.unavailable is None and sampler.status_line().startswith("NVML: sampling")
    assert len(sampler.gpus) >= 1 and all(g.name and g.memory_total > 0 for g in sampler.gpus)
    assert len(sampler.samples) >= 5 * len(sampler.gpus)
    for s in sampler.samples:
        assert 0 <= s.util_pct <= 100 and 0 < s.memory_used <= sampler.gpus[s.index].memory_total
    busy = summarise(sampler.samples, sampler.gpus)[torch.cuda.current_device()]
    assert busy["util_max_pct"] > 50  # matmuls kept it busy
