"""The one llama.cpp build moeprep runs: where its libraries and programs are, what it is, what it can do.

scripts/build-llama compiles libllama and llama.cpp's programs once, with the same CMAKE_ARGS, and puts them where
llama-cpp-python loads libllama from; this module finds them, and reads the build's commit, backends and devices.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
from pathlib import Path

import llama_cpp
from llama_cpp import llama_cpp as ll

from moeprep.errors import MoeprepError


def clib():
    """libllama as llama-cpp-python loaded it, for the C functions it does not bind."""
    return ll._lib  # noqa: SLF001 -- the handle llama-cpp-python opened; a second CDLL would be another copy


def lib_dir() -> Path:
    """Where llama-cpp-python loads libllama from: LLAMA_CPP_LIB_PATH if set (as llama-cpp-python reads it),
    else the package's lib/. scripts/setup puts llama.cpp's programs from the same build beside the libraries."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(llama_cpp.__file__).parent / "lib"


def program(name: str) -> Path:
    """One of llama.cpp's programs (llama-imatrix, llama-perplexity, llama-bench) from the build libllama is."""
    path = lib_dir() / name
    if not path.is_file():
        raise MoeprepError(f"{name} is missing from {path.parent}, the llama.cpp build moeprep runs",
                           "run scripts/setup, which builds llama.cpp's programs beside its libraries")
    return path


def build_info() -> dict:
    """What scripts/setup recorded of the llama.cpp build (commit, CMAKE_ARGS, backends); {} if it did not."""
    try:
        return json.loads((lib_dir() / "moeprep-build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def program_commits() -> dict[str, str | None]:
    """Each of llama.cpp's programs beside libllama and the commit it says it was built from (None: missing
    or silent), so `moeprep doctor` can show that one build serves everything."""
    commits: dict[str, str | None] = {}
    for name in ("llama-imatrix", "llama-perplexity", "llama-bench"):
        path = lib_dir() / name
        try:
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            commits[name] = None
            continue
        found = re.search(r"^version: .*\bcommit ([0-9a-f]+)\)", out.stdout + out.stderr, re.MULTILINE)
        commits[name] = found.group(1) if found else None
    return commits


def _c_string(name: str) -> str | None:
    fn = getattr(clib(), name, None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return fn().decode()


def versions() -> dict:
    return {
        "llama_cpp_python": llama_cpp.__version__,
        # ggml is built inside llama.cpp's tree, so its commit is llama.cpp's ("-dirty": files differ from it)
        "llama_cpp_commit": _c_string("ggml_commit"),
        "ggml": _c_string("ggml_version"),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        # the flags scripts/setup compiled that one build with (backends, CUDA architectures follow from them)
        "llama_cpp_cmake_args": " ".join(build_info().get("cmake_args", [])) or None,
    }


def file_types() -> dict[str, int]:
    """Every llama.cpp file type name (Q4_K_M, IQ2_XS, F16, ...) and its llama_ftype number."""
    types = {}
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[name.removeprefix("LLAMA_FTYPE_MOSTLY_")] = getattr(llama_cpp, name)
    types["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return dict(sorted(types.items(), key=lambda kv: kv[1]))


def devices() -> list[dict]:
    """The ggml backend devices compiled in (CPU, CUDA0, ...), with memory where the backend reports it."""
    lib = clib()
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    kinds = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}  # enum ggml_backend_dev_type
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({
            "name": lib.ggml_backend_dev_name(dev).decode(),
            "description": lib.ggml_backend_dev_description(dev).decode(),
            "type": kinds.get(lib.ggml_backend_dev_type(dev), "UNKNOWN"),
            "memory_free": free.value,
            "memory_total": total.value,
        })
    return out


def backends(devs: list[dict] | None = None) -> list[str]:
    """Backend names without device numbers: ["CPU"], ["CUDA"], ..."""
    return sorted({d["name"].rstrip("0123456789") for d in (devs if devs is not None else devices())})
