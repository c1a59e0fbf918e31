"""What hardware a measurement ran on, and device memory through NVML (nvidia-ml-py).

On a machine without an NVIDIA driver NVML is unavailable: every VRAM figure is then None
("not measured"), never an estimate.
"""

from __future__ import annotations

import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprep.records.results import GpuInfo, Hardware

MIB = 1024 * 1024


@dataclass
class Nvml:
    """An initialised NVML module (pynvml, or a stand-in with the same calls in tests)."""

    nv: Any  # pynvml, typed by nothing

    def gpus(self) -> list[GpuInfo]:
        nv = self.nv
        driver = _text(nv.nvmlSystemGetDriverVersion())
        cuda = nv.nvmlSystemGetCudaDriverVersion()
        out = []
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            out.append(GpuInfo(
                index=i,
                name=_text(nv.nvmlDeviceGetName(handle)),
                memory_total_mib=round(mem.total / MIB, 1),
                memory_used_mib=round(mem.used / MIB, 1),
                driver=driver,
                cuda=f"{cuda // 1000}.{cuda % 1000 // 10}",
            ))
        return out

    def used_mib(self, index: int = 0) -> float:
        """Device-wide memory in use: every process's, CUDA contexts included."""
        nv = self.nv
        return round(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(index)).used / MIB, 1)

    def process_mib(self, pid: int | None = None, index: int = 0) -> float | None:
        """This process's own device memory (NVML's per-process accounting), or None where the driver does not say."""
        nv = self.nv
        pid = pid or os.getpid()
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(index))
        except Exception:  # NVMLError_NotSupported on some drivers and virtualised GPUs
            return None
        used = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
        return round(sum(used) / MIB, 1) if used else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml() -> tuple[Nvml | None, str]:
    """NVML if this machine has an NVIDIA driver, else None and the reason."""
    try:
        import pynvml  # noqa: PLC0415 -- optional: machines without an NVIDIA driver need not install it
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"NVML unavailable: {e}"
    return Nvml(pynvml), "ok"


class PeakWatch:
    """Polls device memory in a background thread: `peak_mib` (device-wide) and `process_peak_mib` (this
    process's own, None where the driver does not report it) are the highest readings seen."""

    def __init__(self, source: Nvml, index: int = 0, interval: float = 0.01):
        self.source, self.index, self.interval = source, index, interval
        self.peak_mib = source.used_mib(index)
        self.process_peak_mib = source.process_mib(index=index)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        self.peak_mib = max(self.peak_mib, self.source.used_mib(self.index))
        own = self.source.process_mib(index=self.index)
        if own is not None:
            self.process_peak_mib = max(self.process_peak_mib or 0.0, own)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self) -> PeakWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


def physical_cores() -> int:
    """llama.cpp's default thread count: one per physical core (common's cpu_get_num_physical_cores).

    Counted as the distinct sibling sets in sysfs; where sysfs does not say, every logical CPU counts.
    """
    siblings = set()
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings"):
        try:
            siblings.add(path.read_text().strip())
        except OSError:
            continue
    return len(siblings) or os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory the kernel can give a new allocation without swapping (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(source: Nvml | None) -> Hardware:
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return Hardware(
        cpu=cpu_model(),
        cpu_cores=os.cpu_count(),
        physical_cores=physical_cores(),
        ram_gib=round(pages * os.sysconf("SC_PAGE_SIZE") / 1024**3, 1) if pages else None,
        gpus=source.gpus() if source else [],
        os=platform.platform(),
    )
