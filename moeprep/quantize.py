"""Quantize stage: libllama's own quantizer (`llama_model_quantize`) through llama-cpp-python."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from . import progress
from .errors import MoeprepError
from .files import write_aside

DEFAULT_QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")

# llama.cpp refuses these without an importance matrix (llama-quant.cpp). libllama's C API cannot be
# handed one (it takes a C++ map), so with an imatrix moeprep runs llama.cpp's llama-quantize instead.
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}

# Approximate bits per weight of whole files, for the free-disk check only (never reported as a size).
BITS_PER_WEIGHT = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5,
    "Q5_1": 6, "Q5_0": 5.5, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_1": 5, "Q4_0": 4.5, "IQ4_XS": 4.3,
    "IQ4_NL": 4.5, "MXFP4_MOE": 4.3, "Q3_K_L": 4.3, "Q3_K_M": 3.9, "Q3_K_S": 3.5, "IQ3_M": 3.7,
    "IQ3_S": 3.5, "IQ3_XS": 3.3, "IQ3_XXS": 3.1, "Q2_K": 3.0, "IQ2_M": 2.7,
}


class QuantizeError(MoeprepError):
    pass


def check_types(names: list[str] | tuple[str, ...], allow_imatrix: bool = False) -> list[str]:
    """Normalise quant names; refuse unknown ones, and those that need an importance matrix unless one is given."""
    from .libllama import file_types

    known = file_types()
    out = []
    for raw in names:
        name = raw.upper()
        if name not in known:
            raise QuantizeError(f"unknown quant type {raw!r}", f"choose from {', '.join(known)}")
        if name in NEEDS_IMATRIX and not allow_imatrix:
            raise QuantizeError(
                f"{name} needs an importance matrix, and llama.cpp refuses it without one",
                "give a calibration text with --imatrix-text (or an imatrix with --imatrix), or choose Q2_K or larger",
            )
        if name not in out:
            out.append(name)
    return out


def planned_size(n_params: int, name: str) -> int:
    return int(n_params * BITS_PER_WEIGHT.get(name, 16) / 8 * 1.1)


WARN, ERROR = 3, 4  # enum ggml_log_level (INFO is 2, CONT 5)
_COUNTER = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def quantize(src: Path, dst: Path, name: str, nthread: int = 0) -> None:
    """Quantize `src` (an F16/BF16/F32 GGUF) to `dst` as llama.cpp file type `name`."""
    import llama_cpp

    from .libllama import capture_log, file_types

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_types()[name]
    params.nthread = nthread
    errors: list[str] = []
    with progress.bar(f"quantize → {dst.name}", None, unit="tensor") as bar:

        def on_line(level: int, text: str) -> None:
            if m := _COUNTER.match(text):
                bar.total = int(m.group(2))
                bar.update(int(m.group(1)) - bar.n)
            elif level in (WARN, ERROR):
                errors.append(text.strip().removeprefix("llama_model_quantize: "))

        with write_aside(dst, planned_size(src.stat().st_size // 2, name)) as tmp, capture_log(on_line):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0 or not tmp.is_file():
                detail = next((e for e in reversed(errors) if e), "no message")
                hint = ("quantize from the F16 (or BF16) file instead" if "requantizing" in detail
                        else "check that the input is a complete GGUF from `moeprep convert`")
                raise QuantizeError(f"llama.cpp could not quantize {src.name} to {name}: {detail}", hint)
