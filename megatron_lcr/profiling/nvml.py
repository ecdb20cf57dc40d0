"""GPU utilisation, memory and power over time, sampled through NVML in a background thread.

NVML (``nvidia-ml-py``, imported as ``pynvml``: ``pip install -e ".[profile]"``) reads every GPU of the
node, whatever ``CUDA_VISIBLE_DEVICES`` says, and whichever process (trainer, rollout servers) uses
it. Utilisation is the driver's "percent of time over the past sample period during which one or more
kernels was executing": a GPU busy with one small kernel reads 100%, so it bounds idleness, not
efficiency (that is MFU's job). Without NVML (no NVIDIA driver, or the package missing) the sampler
records why, and everything else goes on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU."""

    time: float
    """Wall clock (``time.time()``, seconds)."""
    index: int
    """NVML device index."""
    util_pct: float
    """Kernel-busy time over the driver's last sample period (%)."""
    memory_used: int
    """Device memory in use, all processes (bytes)."""
    power_w: float | None
    """Board power draw (W); None where the GPU does not report it."""


@dataclass(frozen=True)
class GpuInfo:
    """A GPU as NVML names it."""

    index: int
    name: str
    """e.g. 'NVIDIA H100 80GB HBM3' (what the peak-FLOP/s table is keyed by)."""
    memory_total: int
    """Bytes."""


class GpuSampler:
    """``with GpuSampler(interval_s=0.5) as sampler: ...``; then ``sampler.samples`` and ``sampler.gpus``,
    or ``sampler.unavailable``: why NVML could not be read (None when it could)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        if interval_s <= 0:
            raise ValueError(f"NVML sampling interval must be > 0 s, got {interval_s}")
        self.interval_s = interval_s
        self.samples: list[GpuSample] = []
        self.gpus: list[GpuInfo] = []
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None

    def __enter__(self) -> GpuSampler:
        try:
            import pynvml
        except ImportError:
            self.unavailable = 'nvidia-ml-py is not installed (pip install -e ".[profile]")'
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:  # no driver: "NVML Shared Library Not Found"
            self.unavailable = str(err)
            return self
        self._nvml = pynvml
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.gpus = [GpuInfo(index=i, name=_text(pynvml.nvmlDeviceGetName(h)),
                                 memory_total=int(pynvml.nvmlDeviceGetMemoryInfo(h).total))
                         for i, h in enumerate(handles)]
        except pynvml.NVMLError as err:
            self._shutdown()
            self.unavailable = str(err)
            return self
        if not handles:
            self._shutdown()
            self.unavailable = "NVML sees no GPU"
            return self
        self._thread = threading.Thread(target=self._run, args=(handles,), name="lcr-nvml", daemon=True)
        self._thread.start()
        return self

    def _read(self, handles) -> list[GpuSample]:
        pynvml, now = self._nvml, time.time()
        out = []
        for index, handle in enumerate(handles):
            try:
                power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW
            except pynvml.NVMLError:  # not supported on this board
                power = None
            out.append(GpuSample(time=now, index=index,
                                 util_pct=float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                                 memory_used=int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), power_w=power))
        return out

    def _run(self, handles) -> None:
        while True:
            try:
                self.samples.extend(self._read(handles))
            except self._nvml.NVMLError as err:  # e.g. a GPU fell off the bus: keep what was read
                self.unavailable = f"sampling stopped after {len(self.samples)} readings: {err}"
                return
            if self._stop.wait(self.interval_s):
                return

    def _shutdown(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def __exit__(self, *exc_info) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._shutdown()

    def status_line(self) -> str:
        """One line for the console: what is sampled, or why nothing is."""
        if self.unavailable:
            return f"NVML unavailable: {self.unavailable}"
        names = ", ".join(sorted({g.name for g in self.gpus}))
        return f"NVML: sampling {len(self.gpus)} GPU(s) ({names}) every {self.interval_s:g} s"

    def to_json(self) -> dict:
        return {"unavailable": self.unavailable, "interval_s": self.interval_s,
                "gpus": [asdict(g) for g in self.gpus], "samples": [asdict(s) for s in self.samples]}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # older pynvml returns bytes


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(samples: list[GpuSample], gpus: list[GpuInfo], windows: list[tuple[float, float]] | None = None) -> list[dict]:
    """Per GPU over the samples inside any of ``windows`` (wall-clock start, end; None: all): mean and max
    utilisation (%), peak memory used and the total (GiB), mean and max power (W)."""
    inside = [s for s in samples if windows is None or any(start <= s.time <= end for start, end in windows)]
    out = []
    for gpu in gpus:
        mine = [s for s in inside if s.index == gpu.index]
        util = [s.util_pct for s in mine]
        power = [s.power_w for s in mine if s.power_w is not None]
        out.append({"index": gpu.index, "name": gpu.name, "samples": len(mine),
                    "util_mean_pct": _mean(util), "util_max_pct": max(util, default=None),
                    "memory_max_gib": max((s.memory_used for s in mine), default=0) / 2**30 if mine else None,
                    "memory_total_gib": gpu.memory_total / 2**30,
                    "power_mean_w": _mean(power), "power_max_w": max(power, default=None)})
    return out
