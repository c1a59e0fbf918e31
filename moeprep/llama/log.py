"""llama.cpp's load log, read: where each tensor went, every buffer, the context as llama.cpp applied it, and how
it resolved flash attention. The log is llama.cpp's own evidence; these are its format strings at 0c1e570
(src/llama-model-loader.cpp, src/llama-model.cpp, src/llama-kv-cache.cpp, src/llama-context.cpp)."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import llama_cpp
from llama_cpp import _logger

from moeprep.records.results import Buffer, FlashAttn, Override

_OVERRIDE = re.compile(r"^tensor (\S+) \((\d+) MiB (\S+)\) buffer type overridden to (\S+)")
_BUFFER = re.compile(r"^(\w+):\s+(\S+)\s+(model|KV|RS|compute|output) buffer size =\s*([\d.]+) MiB")
_CONTEXT = re.compile(r"^llama_context: (n_ctx|n_batch|n_ubatch|n_seq_max|flash_attn|kv_unified)\s+= (\S+)")
# llama_context::resolve_fused_ops (src/llama-context.cpp) resolves flash attention `auto` as the context is made:
# "Flash Attention enabled", or, where the backend lacks the kernel, "Flash Attention not supported, set to disabled".
_FLASH_RESOLVED = re.compile(r"resolve_fused_ops: Flash Attention (enabled|not supported)")
# The KV cache and recurrent state as llama.cpp sizes them; logged with no_alloc too, where the buffers are empty.
_MEMORY = re.compile(r"^(llama_kv_cache|llama_memory_recurrent): size =\s*([\d.]+) MiB")


@dataclass
class LoadLog:
    overridden: list[Override]
    buffers: list[Buffer]
    context: dict[str, str]  # llama_context's own n_ctx, n_batch, n_ubatch, n_seq_max, flash_attn, kv_unified
    flash_attn_used: bool | None = None  # what flash attention ran as; None where the log does not say
    memory_mib: float = 0.0  # every KV cache and recurrent state, as llama.cpp sized them

    @property
    def flash_attn(self) -> FlashAttn | None:
        """What the context was asked for, from llama.cpp's `flash_attn = enabled|disabled|auto`."""
        return FlashAttn.parse(self.context["flash_attn"]) if "flash_attn" in self.context else None


def parse_log(text: str) -> LoadLog:
    """The overridden tensors, per-device buffer sizes, memory and context settings in a llama.cpp load log."""
    log = LoadLog([], [], {})
    for line in text.splitlines():
        line = line.strip()
        if m := _OVERRIDE.match(line):
            log.overridden.append(Override(m.group(1), m.group(3), m.group(4)))
        elif m := _BUFFER.match(line):
            log.buffers.append(Buffer(m.group(2), m.group(3), float(m.group(4)), m.group(1)))
        elif m := _CONTEXT.match(line):
            log.context[m.group(1)] = m.group(2)
        elif m := _MEMORY.match(line):
            log.memory_mib += float(m.group(2))
        elif m := _FLASH_RESOLVED.search(line):
            log.flash_attn_used = m.group(1) == "enabled"
    if log.flash_attn_used is None and log.flash_attn in (FlashAttn.ON, FlashAttn.OFF):
        log.flash_attn_used = log.flash_attn is FlashAttn.ON  # on or off as asked: llama.cpp resolves nothing
    return log


LogLine = Callable[[int, str], None]  # (ggml log level, text)


@contextmanager
def capture_log(on_line: LogLine) -> Iterator[None]:
    """Route llama.cpp's and ggml's log to `on_line` for the duration, then give it back to llama-cpp-python."""
    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        on_line(level, text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        del callback  # only now may the ctypes thunk be collected
