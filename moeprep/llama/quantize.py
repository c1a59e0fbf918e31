"""libllama's own quantizer (`llama_model_quantize`), in-process.

At llama.cpp 0c1e570 the quantizer takes everything llama-quantize passes it through plain C structs in
llama_model_quantize_params (include/llama.h): the importance matrix as a NULL-terminated array of
llama_model_imatrix_data {name, data, size}, per-tensor types as one of llama_model_tensor_override
{pattern, type}, extra metadata as one of llama_model_kv_override, and `dry_run` to size without writing.
llama-cpp-python 0.3.36 declares all four with the same layout, so no second llama.cpp build is needed.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llama_cpp import llama_cpp as lib

from moeprep import progress
from moeprep.errors import MoeprepError
from moeprep.files import human_bytes, write_aside
from moeprep.ggufio.probe import read
from moeprep.llama.build import file_types
from moeprep.llama.log import capture_log
from moeprep.quants import planned_size

WARN, ERROR = 3, 4  # enum ggml_log_level (INFO is 2, CONT 5)


class QuantizeError(MoeprepError):
    pass


# llama_model_quantize_impl logs, per tensor: "[  3/ 39]  blk.0.ffn_up_exps.weight - [256, 512, 16, 1], type = f16, "
# then "converting to q4_K .. size = ... -> ... MiB", or in a dry run "size = ... -> ... MiB (q4_K)", or for a
# tensor it keeps, "size = ... MiB" alone.
_TENSOR = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+)")


_NEW_TYPE = re.compile(r"converting to (\w+) \.\.|-> .*MiB \((\w+)\)")


def quantize(src: Path, dst: Path, name: str, nthread: int = 0, *, imatrix=None, rules=(), dry_run: bool = False,
             before_rename=None) -> dict[str, str]:
    """Quantize `src` (an F16/BF16/F32 GGUF) to `dst` as llama.cpp file type `name`.

    `imatrix` is an imatrix.Imatrix; `rules` are mixes.Rule, first match wins. With `dry_run` llama.cpp
    decides every tensor's type and writes nothing. Returns the type it gave each tensor.
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_types()[name]
    params.nthread = nthread
    params.dry_run = dry_run
    keep = _point_at(params, imatrix, list(rules))  # every C array and string the params point into
    errors: list[str] = []
    types: dict[str, str] = {}
    current = ""  # the tensor the last counter line named
    with progress.bar(("size " if dry_run else "quantize → ") + dst.name, None, unit="tensor") as bar:

        def on_line(level: int, text: str) -> None:
            nonlocal current
            if m := _TENSOR.match(text):
                bar.total = int(m.group(2))
                bar.update(int(m.group(1)) - bar.n)
                current = m.group(3)
                types[current] = m.group(4).upper()
            elif m := _NEW_TYPE.search(text):
                types[current] = (m.group(1) or m.group(2)).upper()
            elif level in (WARN, ERROR):
                errors.append(text.strip().removeprefix("llama_model_quantize: "))

        def run(out: Path) -> None:
            with capture_log(on_line):
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
            if rc != 0 or not (dry_run or out.is_file()):
                detail = next((e for e in reversed(errors) if e), "no message")
                hint = ("quantize from the F16 (or BF16) file instead" if "requantizing" in detail
                        else "check that the input is a complete GGUF from `moeprep convert`")
                raise QuantizeError(f"llama.cpp could not quantize {src.name} to {name}: {detail}", hint)

        if dry_run:
            run(dst)  # llama.cpp opens no output in a dry run
        else:
            with write_aside(dst, planned_size(src.stat().st_size // 2, name), before_rename) as tmp:
                run(tmp)
    del keep  # only now may the arrays llama.cpp read from go
    return types


def _point_at(params, imatrix, rules: list) -> list:
    """Set params.imatrix, .kv_overrides and .tt_overrides to NULL-terminated C arrays, as llama-quantize does
    (tools/quantize/quantize.cpp, main); returns everything they point into, for the caller to keep alive."""
    keep: list = []

    def array(kind, n: int):
        arr = (kind * (n + 1))()  # zero-filled: the last element is the terminator (NULL name, pattern or key)
        keep.append(arr)
        return arr

    if imatrix is not None:
        entries = array(lib.llama_model_imatrix_data, len(imatrix.entries))
        for slot, (tensor, values) in zip(entries, imatrix.entries.items(), strict=False):
            values = np.ascontiguousarray(values, dtype=np.float32)
            key = tensor.encode()
            keep += [values, key]
            slot.name, slot.size = key, values.size
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lib.llama_model_imatrix_data))
        kv = _imatrix_metadata(imatrix)
        overrides = array(lib.llama_model_kv_override, len(kv))
        for slot, (key, value) in zip(overrides, kv, strict=False):
            slot.key = key.encode()
            if isinstance(value, int):
                slot.tag, slot.value.val_i64 = lib.LLAMA_KV_OVERRIDE_TYPE_INT, value
            else:
                slot.tag, slot.value.val_str = lib.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(lib.llama_model_kv_override))
    if rules:
        table = array(lib.llama_model_tensor_override, len(rules))
        for slot, rule in zip(table, rules, strict=False):
            pattern = rule.pattern.encode()
            keep.append(pattern)
            slot.pattern, slot.type = pattern, GGMLQuantizationType[rule.type].value
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(lib.llama_model_tensor_override))
    return keep


def _imatrix_metadata(imatrix) -> list[tuple[str, str | int]]:
    """The keys llama-quantize writes with an imatrix, so readers of the GGUF can tell; names, not local paths."""
    kv: list[tuple[str, str | int]] = [("quantize.imatrix.file", imatrix.file)]
    kv += [("quantize.imatrix.dataset", Path(imatrix.datasets[0]).name)] if imatrix.datasets else []
    kv += [("quantize.imatrix.entries_count", len(imatrix.entries))]
    kv += [("quantize.imatrix.chunks_count", imatrix.chunk_count)] if imatrix.chunk_count > 0 else []
    return kv


@dataclass
class Sized:
    """One output as a dry run sizes it: llama.cpp chose each tensor's type, ggml's block sizes give the bytes."""

    file: str
    quant: str
    ftype: str
    mix: str | None
    tensor_types: list[str]
    bytes: int  # the whole file: header and every tensor, padded as llama.cpp pads them
    bits_per_weight: float
    by_type: dict[str, int] = field(default_factory=dict)  # ggml type -> tensor bytes of that type


def size(src: Path, types: dict[str, str], imatrix=None) -> tuple[int, float, dict[str, int]]:
    """The file llama.cpp would write with these tensor types: (bytes, bits per weight, bytes per type)."""
    reader = read(src)
    align = reader.alignment
    # the input's header (metadata and tensor infos keep their sizes), plus any imatrix keys, padded
    header = max((t.field.offset + sum(p.nbytes for p in t.field.parts) for t in reader.tensors),
                 default=reader.data_offset)
    for key, value in _imatrix_metadata(imatrix) if imatrix is not None else []:  # a u32 or a string each
        header += 8 + len(key) + 4 + (4 if isinstance(value, int) else 8 + len(value.encode()[:127]))
    by_type: dict[str, int] = {}
    total, weights, n = -(-header // align) * align, 0, 0
    for t in reader.tensors:
        kind = types.get(t.name, t.tensor_type.name)
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        nbytes = int(t.n_elements) // block * block_bytes
        total += -(-nbytes // align) * align
        weights, n = weights + nbytes, n + int(t.n_elements)
        by_type[kind] = by_type.get(kind, 0) + nbytes
    return total, weights * 8 / max(n, 1), dict(sorted(by_type.items(), key=lambda kv: -kv[1]))


def size_lines(rows: list[Sized]) -> list[str]:
    lines = []
    for r in rows:
        made_as = r.ftype + (f" + {len(r.tensor_types)} rule{'s' * (len(r.tensor_types) != 1)}" if r.tensor_types else "")
        label = r.quant if r.quant == made_as else f"{r.quant} ({made_as})"
        lines.append(f"{r.file}: {label}, {human_bytes(r.bytes)}, {r.bits_per_weight:.2f} bits per weight")
        lines.append("  " + ", ".join(f"{kind} {human_bytes(n)}" for kind, n in r.by_type.items()))
    return lines + ["sizes from llama.cpp's dry run; nothing written"]
