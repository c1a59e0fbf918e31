"""The few native libllama calls moeprep makes through llama-cpp-python, each behind one function."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Callable, Iterator

LogLine = Callable[[int, str], None]  # (ggml log level, text)


def _lib():
    from llama_cpp import llama_cpp

    return llama_cpp._lib


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
        # ggml is built inside llama.cpp's tree, so its commit is llama.cpp's ("-dirty": patched by the wheel)
        "llama_cpp_commit": _c_string("ggml_commit"),
        "ggml": _c_string("ggml_version"),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
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
