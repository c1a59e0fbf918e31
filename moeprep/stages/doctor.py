"""`moeprep doctor`: what this machine can do, as llama.cpp and NVML report it, with every version moeprep records."""

from __future__ import annotations

from dataclasses import dataclass

from moeprep.hardware import hardware, nvml
from moeprep.llama.build import backends, build_info, devices, program_commits
from moeprep.records.results import Hardware
from moeprep.tools import gguf_origin, versions


@dataclass
class DoctorReport:
    backends: list[str]
    devices: list[dict]  # llama.cpp's ggml devices, as build.devices reads them
    nvml: str  # NVML's state: the driver it found, or why none
    hardware: Hardware
    tools: dict  # the versions every record carries
    gguf: dict  # where the gguf module comes from, and whether its files are llama.cpp's
    build: dict  # what scripts/setup recorded of the llama.cpp build
    programs: dict[str, str | None]  # llama.cpp's programs beside libllama, and their commits


def report() -> DoctorReport:
    source, status = nvml()
    devs = devices()
    return DoctorReport(backends(devs), devs, status, hardware(source), versions(), gguf_origin(), build_info(),
                        program_commits())
