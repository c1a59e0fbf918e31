"""Importance matrices: collected by llama.cpp's llama-imatrix, read here for the in-process quantizer.

libllama's C API has no importance-matrix collector, so `moeprep imatrix` runs llama-imatrix, which
scripts/setup builds in the same build as the libllama llama-cpp-python loads (one commit for both).
Quantizing with the result needs no program: `load` turns the file into the per-tensor arrays
llama-quantize would hand the quantizer, and llama/quantize.py hands them over in-process.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from moeprep import child, progress
from moeprep.errors import MoeprepError
from moeprep.files import open_log, write_aside
from moeprep.ggufio.probe import read, value
from moeprep.inputs import check_file
from moeprep.limits import MAX_CALIBRATION_TEXT, MAX_IMATRIX
from moeprep.llama.build import program, versions
from moeprep.records.manifest import LayerCoverage


class ToolError(MoeprepError):
    pass


def version() -> str:
    """The imatrix's tool as the manifest records it: llama-imatrix of the one llama.cpp build."""
    return f"llama-imatrix, llama.cpp {versions()['llama_cpp_commit']}"


def _run(name: str, args: list[str], log_path: Path, what: str, root: Path) -> None:
    exe = program(name)
    env = dict(os.environ)
    env.pop("HF_TOKEN", None)
    with open_log(log_path, root=root) as log, progress.bar(what, None, unit="s") as bar:
        rc = child.run([str(exe), *args], log=log, env=env, tick=lambda: bar.update(0.5))
    if rc != 0:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        lines = [line for line in text.splitlines() if re.search(r"error|failed|cannot", line, re.IGNORECASE)]
        raise ToolError(f"{name} failed: {(lines or text.splitlines() or ['no output'])[-1].strip()}",
                        f"the full log is {log_path}")


def compute(model: Path, text: Path, out: Path, log_path: Path, ctx: int = 512, chunks: int = 0, *,
            root: Path | None = None, protected: Collection[str] = ()) -> None:
    """llama-imatrix over `text` with `model` (the F16), written to `out` (aside, then renamed) inside `root`
    (default: the directory `out` is in), never over a file in `protected`."""
    check_text(text)
    root = Path(root) if root is not None else Path(out).parent
    with write_aside(out, root=root, protected=protected) as tmp:
        args = ["-m", str(model), "-f", str(text), "-o", str(tmp), "-c", str(ctx), "--no-ppl"]
        if chunks:
            args += ["--chunks", str(chunks)]
        _run("llama-imatrix", args, log_path, f"imatrix ← {Path(text).name}", root)
        if tmp.stat().st_size == 0:
            raise ToolError("llama-imatrix wrote no importance matrix", f"see {log_path}")


def check_text(text: Path) -> None:
    """A calibration text llama-imatrix can read to its end: a regular file of bounded size."""
    check_file(text, MAX_CALIBRATION_TEXT, "calibration text", "give a plain-text file")


@dataclass
class Imatrix:
    """An importance matrix as llama-quantize hands it to the quantizer."""

    file: str  # its file name, which llama-quantize records in the quantized GGUF
    entries: dict[str, np.ndarray]  # tensor name -> float32 importances, one row of columns per expert
    datasets: list[str]
    chunk_count: int


def load(path: Path) -> Imatrix:
    """Read an imatrix as llama.cpp 0c1e570's llama-quantize does: common_imatrix_load (common/imatrix-loader.cpp),
    GGUF or the legacy .dat, then load_imatrix (tools/quantize/quantize.cpp), which normalises by the counts."""
    path = Path(path)
    check_file(path, MAX_IMATRIX, "importance matrix", "compute one with `moeprep imatrix`")
    with open(path, "rb") as f:
        gguf = f.read(4) == b"GGUF"
    sums, counts, datasets, chunks = (_read_gguf if gguf else _read_legacy)(path)
    if not sums:
        raise MoeprepError(f"{path} holds no importance data", "compute it again with `moeprep imatrix`")
    entries = {name: (_by_counts if gguf else _by_calls)(sums[name], counts[name]) for name in sorted(sums)}
    return Imatrix(path.name, entries, datasets, chunks)


_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(up|gate_up|gate|down)_exps\.weight$")


def coverage(path: Path) -> list[LayerCoverage]:
    """Per layer, the tokens each expert received while llama-imatrix ran, from the GGUF's per-expert counts (one
    expert tensor per layer stands for the layer: every expert tensor of a layer sees the same tokens). An expert
    with none gets no importance weights: llama-quantize treats its columns as all equally important."""
    path = Path(path)
    check_file(path, MAX_IMATRIX, "importance matrix", "compute one with `moeprep imatrix`")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return []  # the legacy .dat keeps one call count per tensor, not one per expert
    _, counts, _, _ = _read_gguf(path)
    by_block: dict[int, np.ndarray] = {}
    for name in sorted(counts):
        if (m := _EXPERTS.match(name)) and int(m.group(1)) not in by_block and counts[name].size > 1:
            by_block[int(m.group(1))] = counts[name]
    out = []
    for block, c in sorted(by_block.items()):
        tokens = c.astype(np.int64)
        out.append(LayerCoverage(block, int(tokens.size), int((tokens > 0).sum()), int(tokens.min()),
                                 float(np.median(tokens)), int(tokens.max()),
                                 [int(e) for e in np.flatnonzero(tokens == 0)]))
    return out


def coverage_lines(layers: list[LayerCoverage]) -> list[str]:
    """What `moeprep imatrix` prints: a line per layer, and a summary."""
    lines = [f"blk.{x.block}: {x.covered}/{x.experts} experts received tokens (min {x.tokens_min}, median "
             f"{x.tokens_median:g}, max {x.tokens_max})" + (f"; none for experts {_ids(x.missing)}" if x.missing else "")
             for x in layers]
    missing = sum(len(x.missing) for x in layers)
    if layers:
        lines.append("every expert of every layer received calibration tokens" if not missing else
                     f"{missing} experts in {sum(1 for x in layers if x.missing)} layers received no calibration "
                     "tokens: llama.cpp quantizes them without importance weights; a longer or more varied text "
                     "reaches more")
    return lines


def _ids(experts: list[int], most: int = 12) -> str:
    shown = ", ".join(map(str, experts[:most]))
    return shown + (f" and {len(experts) - most} more" if len(experts) > most else "")


def _by_counts(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """GGUF: each expert's (row of) sums divided by that expert's token count; 1 where it saw none."""
    out = np.zeros(sums.size, dtype=np.float32)  # std::vector::resize zero-fills a tail no count covers
    n = counts.size
    ne0 = sums.size // n
    c = counts.astype(np.float32)[:, None]  # (float) entry.counts[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = np.where(c > 0, sums[: n * ne0].reshape(n, ne0) / c, np.float32(1))
    out[: n * ne0] = rows.ravel()
    return out


def _by_calls(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Legacy .dat: the sums hold (raw / count) * ncall, so divide by ncall (if any)."""
    ncall = int(counts[0]) if counts.size else 0
    return sums / np.float32(ncall) if ncall > 0 else sums.copy()


def _read_gguf(path: Path):
    reader = read(path)
    if not reader.tensors:
        raise MoeprepError(f"{path} holds no importance data", "compute it again with `moeprep imatrix`")
    keys = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
    if any(reader.get_field(k) is None for k in keys):  # llama-quantize refuses such a file too
        raise MoeprepError(f"{path} is not an importance matrix from llama-imatrix (it lacks {', '.join(keys)})",
                           "give the file `moeprep imatrix` wrote")
    field = reader.get_field("imatrix.datasets")
    datasets = [str(d) for d in field.contents()] if isinstance(field.contents(), list) else []
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:  # other tensors (newer llama-imatrix adds .in_sum and .stats) are not read
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise MoeprepError(f"{path}: {t.name} must be F32, not {t.tensor_type.name}",
                                       "give the file `moeprep imatrix` wrote")
                into[t.name.removesuffix(suffix)] = np.asarray(t.data, dtype=np.float32).ravel()
    if odd := sorted(set(sums) ^ set(counts)):
        raise MoeprepError(f"{path}: mismatched sums and counts for {odd[0]}", "compute it again with `moeprep imatrix`")
    for name, c in counts.items():
        if not c.size:
            raise MoeprepError(f"{path}: no counts for {name}", "compute it again with `moeprep imatrix`")
        counts[name] = np.sign(c) * np.floor(np.abs(c.astype(np.float64)) + 0.5)  # std::lround
    return sums, counts, datasets, int(value(reader, "imatrix.chunk_count", 0))


def _read_legacy(path: Path):
    """The .dat format: int32 n; per entry int32 name length, name, int32 ncall, int32 nval, nval float32;
    then, optionally, int32 chunk count, int32 length and the dataset name."""
    data = path.read_bytes()
    at = 0

    def take(fmt: str):
        nonlocal at
        size = struct.calcsize(fmt)
        if at + size > len(data):
            raise MoeprepError(f"{path} is neither a GGUF nor a legacy imatrix .dat file (it ends too soon)",
                               "give the file `moeprep imatrix` wrote")
        out = struct.unpack_from(fmt, data, at)
        at += size
        return out

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    (n,) = take("<i")
    for _ in range(max(n, 0)):
        (length,) = take("<i")
        name = take(f"<{max(length, 0)}s")[0].split(b"\0")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise MoeprepError(f"{path}: no values for {name}", "give the file `moeprep imatrix` wrote")
        sums[name] = np.array(take(f"<{nval}f"), dtype=np.float32)
        counts[name] = np.array([ncall], dtype=np.int64)
    datasets, chunks = [], 0
    if at + 4 <= len(data):
        (chunks,) = take("<i")
        if at + 4 <= len(data) and (length := take("<i")[0]) > 0 and at + length <= len(data):
            datasets.append(take(f"<{length}s")[0].split(b"\0")[0].decode("utf-8", "replace"))
    return sums, counts, datasets, chunks
