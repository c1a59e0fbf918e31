"""The few native libllama calls moeprep makes through llama-cpp-python, each behind one function."""

from __future__ import annotations

import ctypes
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

LogLine = Callable[[int, str], None]  # (ggml log level, text)


def _lib():
    from llama_cpp import llama_cpp

    return llama_cpp._lib


def lib_dir() -> Path:
    """Where llama-cpp-python loads libllama from: LLAMA_CPP_LIB_PATH if set (as llama-cpp-python reads it),
    else the package's lib/. scripts/setup puts llama.cpp's programs from the same build beside the libraries."""
    import llama_cpp

    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(llama_cpp.__file__).parent / "lib"


def program(name: str) -> Path:
    """One of llama.cpp's programs (llama-imatrix, llama-perplexity, llama-bench) from the build libllama is."""
    from .errors import MoeprepError

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
    import re
    import subprocess

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
    fn = getattr(_lib(), name, None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return fn().decode()


def versions() -> dict:
    import llama_cpp

    return {
        "llama_cpp_python": llama_cpp.__version__,
        # ggml is built inside llama.cpp's tree, so its commit is llama.cpp's ("-dirty": files differ from it)
        "llama_cpp_commit": _c_string("ggml_commit"),
        "ggml": _c_string("ggml_version"),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        # the flags scripts/setup compiled that one build with (backends, CUDA architectures follow from them)
        "llama_cpp_cmake_args": " ".join(build_info().get("cmake_args", [])) or None,
    }


@contextmanager
def capture_log(on_line: LogLine) -> Iterator[None]:
    """Route llama.cpp's and ggml's log to `on_line` for the duration, then give it back to llama-cpp-python."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        on_line(level, text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        del callback  # only now may the ctypes thunk be collected


def file_types() -> dict[str, int]:
    """Every llama.cpp file type name (Q4_K_M, IQ2_XS, F16, ...) and its llama_ftype number."""
    import llama_cpp

    types = {}
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[name.removeprefix("LLAMA_FTYPE_MOSTLY_")] = getattr(llama_cpp, name)
    types["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return dict(sorted(types.items(), key=lambda kv: kv[1]))


class BuftOverride(ctypes.Structure):
    """llama.h's `struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_buffer_type() -> int:
    fn = _lib().ggml_backend_cpu_buffer_type
    fn.restype, fn.argtypes = ctypes.c_void_p, []
    return fn()


def override_array(patterns: list[str]):
    """A NULL-terminated override array sending every tensor matching a pattern to the CPU buffer type,
    as llama.cpp's --cpu-moe / --n-cpu-moe do. The caller keeps it alive as long as the model."""
    cpu = cpu_buffer_type()
    array = (BuftOverride * (len(patterns) + 1))()
    for slot, pattern in zip(array, patterns):
        slot.pattern = pattern.encode()
        slot.buft = cpu
    return array


@contextmanager
def model_params_with_overrides(patterns: list[str]) -> Iterator[None]:
    """Make Llama() see tensor_buft_overrides.

    llama-cpp-python 0.3.36 declares the field (as a void pointer) but has no keyword for it, and
    Llama.__init__ takes its params from llama_model_default_params(); the struct is passed to
    llama_model_load_from_file unchanged, so the field is set on the defaults it receives.
    """
    from llama_cpp import llama_cpp

    array = override_array(patterns) if patterns else None
    original = llama_cpp.llama_model_default_params

    def with_overrides():
        params = original()
        if array is not None:
            params.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)
        return params

    llama_cpp.llama_model_default_params = with_overrides
    try:
        yield
    finally:
        llama_cpp.llama_model_default_params = original


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # enum llama_flash_attn_type


@contextmanager
def flash_attn(setting: str) -> Iterator[None]:
    """Create contexts with llama.cpp's flash-attention type `setting` (auto, on, off).

    llama-cpp-python 0.3.36's Llama() takes flash_attn as a bool (on or off) and has no `auto`, which
    is llama-server's default; the context params it builds are passed to llama_init_from_model, so the
    type is set there, as model_params_with_overrides does for the model params.
    """
    from llama_cpp import llama_cpp

    value = FLASH_ATTN[setting]
    original = llama_cpp.llama_init_from_model

    def with_type(model, params):
        params.flash_attn_type = value
        return original(model, params)

    llama_cpp.llama_init_from_model = with_type
    try:
        yield
    finally:
        llama_cpp.llama_init_from_model = original


def devices() -> list[dict]:
    """The ggml backend devices compiled in (CPU, CUDA0, ...), with memory where the backend reports it."""
    lib = _lib()
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



def simulate_context(path, *, patterns: list[str], n_ctx: int, n_batch: int, n_ubatch: int,
                     flash_attn: str = "auto") -> str:
    """llama.cpp's own sizing of every buffer for `path`, with nothing allocated and no weight read.

    The model is loaded with `no_alloc` (and load_mode none: mmap trips an assert there), every layer offloaded
    and the placement's overrides applied, then a context is created: llama.cpp reserves its worst-case graphs
    and logs each buffer's size, as llama-fit-params does. Returns the captured log.
    """
    from llama_cpp import llama_cpp as ll

    from .errors import MoeprepError

    lines: list[str] = []
    array = override_array(patterns) if patterns else None
    with capture_log(lambda level, text: lines.append(text)):
        mp = ll.llama_model_default_params()
        mp.no_alloc = True
        mp.load_mode = ll.LLAMA_LOAD_MODE_NONE
        mp.n_gpu_layers = -1
        if array is not None:
            mp.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)
        model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise MoeprepError(f"llama.cpp could not load {path} to size its buffers: {_last_error(lines)}",
                               "see `moeprep probe` for its layout")
        try:
            cp = ll.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_ubatch
            cp.flash_attn_type = FLASH_ATTN[flash_attn]
            ctx = ll.llama_init_from_model(model, cp)
            if not ctx:
                raise MoeprepError(f"llama.cpp could not size a context for {path}: {_last_error(lines)}",
                                   "try a smaller --ctx or --ubatch")
            ll.llama_free(ctx)
        finally:
            ll.llama_model_free(model)
    del array  # only now may the override strings go
    return "".join(lines)


def _last_error(lines: list[str]) -> str:
    """llama.cpp's own reason: its last line naming an error ("error loading model: missing tensor ..."),
    which comes before the generic "failed to load model"."""
    for words in (("error",), ("failed",)):
        if found := [line.strip() for line in lines if any(w in line.lower() for w in words)]:
            return found[-1]
    return "no reason logged"
