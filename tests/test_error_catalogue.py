"""The error catalogue: each bad input, its exact first line, exit code 1, no traceback, nothing that looks finished.

Every row is run through the installed entry point's Click group in-process; `setup` prepares the
inputs in a fresh directory and returns the arguments.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.records import manifest as mf

ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = ROOT / "tests" / "data" / "recipes" / "tiny-phimoe.yaml"
FINISHED = ("*.gguf", "README*.md", "manifest.json", "imatrix.gguf", "*.png")


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a converted directory whose GGUFs are hard links: cheap, and the session's files stay as they were."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns(".moeprep.lock"))
    (dst / "manifest.json").unlink()
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


def finished_files(root: Path) -> dict[str, int]:
    found = {}
    for pattern in FINISHED:
        for p in root.rglob(pattern):
            found[str(p.relative_to(root))] = p.stat().st_mtime_ns
    return found


def recipe(tmp: Path, change: dict) -> Path:
    data = yaml.safe_load(TINY_RECIPE.read_text())
    for dotted, value in change.items():
        *parents, key = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# (id, setup(tmp, converted) -> args, expected first line; "{tmp}" and "{dir}" are filled in)
CASES = [
    ("out-under-proc", lambda t, d: ["convert", str(d.checkpoint), "--out", "/proc/moeprep-x"],
     "Error: cannot write into /proc/moeprep-x"),
    ("out-is-a-file", lambda t, d: ["convert", str(d.checkpoint), "--out", str(_file(t / "taken"))],
     "Error: cannot write into {tmp}/taken"),
    ("out-under-a-file", lambda t, d: ["convert", str(d.checkpoint), "--out", str(_file(t / "taken") / "sub")],
     "Error: cannot write into {tmp}/taken/sub"),
    ("convert-dotdot", lambda t, d: ["convert", "../etc"],
     "Error: ../etc is neither a model directory nor a Hub repo id (pass org/name or a folder)"),
    ("vram-two-dots", lambda t, d: ["plan", str(d.q8), "--vram", "1.2.3GiB"],
     "Error: cannot read '1.2.3GiB' as a GPU memory size (write it like 24GiB, 16GB or 8000MiB)"),
    ("vram-dot", lambda t, d: ["plan", str(d.q8), "--vram", "."],
     "Error: cannot read '.' as a GPU memory size (write it like 24GiB, 16GB or 8000MiB)"),
    ("vram-no-unit", lambda t, d: ["plan", str(d.q8), "--vram", "24"],
     "Error: cannot read '24' as a GPU memory size (add a unit: 24GiB or 24GB)"),
    ("max-shard-two-dots", lambda t, d: ["card", str(d.dir), "--max-shard", "1..5GB"],
     "Error: cannot read '1..5GB' as a shard size (write it like 24GiB, 16GB or 8000MiB)"),
    ("max-shard-zero", lambda t, d: ["card", str(d.dir), "--max-shard", "0GB"],
     "Error: shard size '0GB' is zero (give a positive size, like 50GB)"),
    ("probe-dir", lambda t, d: ["probe", str(d.dir)],
     "Error: {dir} is a directory (give the path of a .gguf file in it)"),
    ("plan-dir", lambda t, d: ["plan", str(d.dir)],
     "Error: {dir} is a directory (give the path of a .gguf file in it)"),
    ("manifest-is-a-list", lambda t, d: ["smoke", str(_manifest(d.dir, "[]"))],
     "Error: {dir}/manifest.json: a manifest must be a JSON object, not list (convert again into a fresh directory)"),
    ("smoke-listed-file-deleted", lambda t, d: ["smoke", str(_unlink(d.dir, "tiny-phimoe-Q2_K.gguf"))],
     "Error: {dir}/tiny-phimoe-Q2_K.gguf is listed in the manifest but missing "
     "(rerun `moeprep convert` to make it again, then smoke again)"),
    ("n-cpu-moe-huge", lambda t, d: ["smoke", str(d.dir), "--placement", "n-cpu-moe=99999999999"],
     "Error: placement 'n-cpu-moe=99999999999': N is larger than the block count (no model has over 1024 blocks) "
     "(use n-cpu-moe=1..1024, or cpu-moe for every block)"),
    ("n-cpu-moe-over-blocks", lambda t, d: ["smoke", str(d.dir), "--placement", "n-cpu-moe=3"],
     "Error: placement 'n-cpu-moe=3': N is larger than the block count (the model has 2 blocks) "
     "(use n-cpu-moe=1..2, or cpu-moe for every block)"),
    ("imatrix-not-gguf", lambda t, d: ["imatrix", str(_file(t / "x.gguf", b"not a gguf")), "--text", str(TINY_RECIPE)],
     "Error: {tmp}/x.gguf is not a GGUF file (no GGUF magic at its start) (give the path of a .gguf file)"),
    ("requantize-q2k", lambda t, d: ["quantize", str(d.dir / "tiny-phimoe-Q2_K.gguf"), "--quant", "Q4_K_M"],
     "Error: llama.cpp could not quantize tiny-phimoe-Q2_K.gguf to Q4_K_M: failed to quantize: requantizing from "
     "type q2_K is disabled (quantize from the F16 (or BF16) file instead)"),
    ("release-a-directory", lambda t, d: ["release", str(ROOT / "recipes")],
     "Error: " + str(ROOT / "recipes")),
    ("recipe-max-shard", lambda t, d: ["release", str(recipe(t, {"hub.max_shard": "1.2.3GB"})), "--dry-run"],
     "Error: {tmp}/bad.yaml"),
    ("recipe-runs-zero", lambda t, d: ["release", str(recipe(t, {"smoke.runs": 0})), "--dry-run"],
     "Error: {tmp}/bad.yaml"),
    ("recipe-tokens-zero", lambda t, d: ["release", str(recipe(t, {"smoke.tokens": 0})), "--dry-run"],
     "Error: {tmp}/bad.yaml"),
    ("recipe-ctx-negative", lambda t, d: ["release", str(recipe(t, {"smoke.ctx": -5})), "--dry-run"],
     "Error: {tmp}/bad.yaml"),
    ("recipe-n-cpu-moe-huge", lambda t, d: ["release", str(recipe(t, {"smoke.placements": ["n-cpu-moe=99999999999"]})),
                                            "--dry-run"],
     "Error: {tmp}/bad.yaml"),
    # issue 18: every input bounded before work starts
    ("smoke-ctx-huge", lambda t, d: ["smoke", str(d.dir), "--ctx", "99999999999"],
     "Error: Invalid value for '--ctx': 99999999999 is not in the range 64<=x<=16777216 (see `moeprep smoke --help`)"),
    ("smoke-ctx-wraps-uint32", lambda t, d: ["smoke", str(d.dir), "--ctx", "4294967296"],
     "Error: Invalid value for '--ctx': 4294967296 is not in the range"),
    ("smoke-ctx-over-trained", lambda t, d: ["smoke", str(d.dir), "--ctx", "16384"],
     "Error: --ctx 16384 is longer than the 8192 tokens tiny-phimoe-F16.gguf was trained for (give --ctx 8192 or less)"),
    ("smoke-quality-ctx-over-trained", lambda t, d: ["smoke", str(d.dir), "--quality-ctx", "9000"],
     "Error: --quality-ctx 9000 is longer than the 8192 tokens"),
    ("smoke-threads-huge", lambda t, d: ["smoke", str(d.dir), "--threads", "100000"],
     "Error: Invalid value for '--threads': 100000 is not in the range 1<=x<=512"),
    ("smoke-threads-over-cpus", lambda t, d: ["smoke", str(d.dir), "--threads", "512"],
     f"Error: --threads 512 is more than the {os.cpu_count()} CPUs this machine has"),
    ("smoke-tokens-over-ctx", lambda t, d: ["smoke", str(d.q8), "--tokens", "600", "--placement", "gpu"],
     "Error: the prompt ("),
    ("smoke-runs-huge", lambda t, d: ["smoke", str(d.dir), "--runs", "1000000"],
     "Error: Invalid value for '--runs': 1000000 is not in the range 1<=x<=100"),
    ("smoke-quality-text-dev-zero", lambda t, d: ["smoke", str(d.dir), "--quality-text", "/dev/zero"],
     "Error: the evaluation text /dev/zero is not a regular file"),
    ("smoke-quality-text-fifo", lambda t, d: ["smoke", str(d.dir), "--quality-text", str(_fifo(t / "fifo"))],
     "Error: the evaluation text {tmp}/fifo is not a regular file"),
    ("imatrix-text-dev-zero", lambda t, d: ["imatrix", str(d.dir / "tiny-phimoe-F16.gguf"), "--text", "/dev/zero",
                                            "--out", str(t / "i.gguf")],
     "Error: calibration text /dev/zero is not a regular file (give a plain-text file)"),
    ("imatrix-ctx-over-trained", lambda t, d: ["imatrix", str(d.dir / "tiny-phimoe-F16.gguf"), "--text",
                                               str(TINY_RECIPE), "--ctx", "100000", "--out", str(t / "i.gguf")],
     "Error: --ctx 100000 is longer than the 8192 tokens tiny-phimoe-F16.gguf was trained for"),
    ("recipe-alias-bomb", lambda t, d: ["release", str(_file(t / "bomb.yaml", BOMB)), "--dry-run"],
     "Error: {tmp}/bomb.yaml is not valid YAML (anchors (&a) are not allowed here)"),
    ("recipe-huge", lambda t, d: ["release", str(_file(t / "huge.yaml", b"name: x\n" + b"#" * 300_000)), "--dry-run"],
     "Error: recipe {tmp}/huge.yaml is 300,008 bytes; moeprep reads at most 262,144"),
    ("recipe-long-value-quoted-short", lambda t, d: ["release", str(recipe(t, {"smoke.runs": "9" * 5000})), "--dry-run"],
     "Error: {tmp}/bad.yaml: smoke.runs must be an integer, not str '999999999999999999999999"),
    ("probe-claims-1000-blocks", lambda t, d: ["probe", str(_claims(t / "claims.gguf", 1000))],
     "Error: {tmp}/claims.gguf claims 1000 blocks and has tensors for 1"),
    ("tiers-too-many", lambda t, d: ["plan", str(d.q8), "--tiers", ",".join(["8"] * 100)],
     "Error: 100 GPU sizes is more than a table can show (give at most 64)"),
    ("vram-over-a-pib", lambda t, d: ["plan", str(d.q8), "--vram", "99999TB"],
     "Error: GPU memory size '99999TB' is over 1 PiB"),
    ("plan-ctx-huge", lambda t, d: ["plan", str(d.q8), "--ctx", "4294967296"],
     "Error: Invalid value for '--ctx': 4294967296 is not in the range 1<=x<=16777216"),
    # issue 18: results bound to bytes
    ("smoke-reference-changed", lambda t, d: ["smoke", str(d.q8), "--reference", str(_rewritten(d.dir / "tiny-phimoe-F16.gguf")),
                                              "--placement", "gpu", "--runs", "1"],
     "Error: the reference {dir}/tiny-phimoe-F16.gguf no longer matches the sha256 in its manifest"),
    ("card-files-not-the-manifests", lambda t, d: ["card", str(d.dir), "--repo-id", "me/x-GGUF"]
     if _rewritten(d.dir / "tiny-phimoe-Q2_K.gguf") else [],
     "Error: {dir}/tiny-phimoe-Q2_K.gguf is not the bytes the manifest records (sha256 differs), so no card can vouch for it"),
]

BOMB = b"""a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _claims(path: Path, blocks: int) -> Path:
    """A tiny GGUF whose header claims `blocks` blocks, with tensors for one."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(blocks)
    w.add_expert_count(8)
    w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((2, 2, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _rewritten(path: Path) -> Path:
    """The file with one byte changed in a copy of its own (the directory's GGUFs are hard links to the session's)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))
    return path


class Converted:
    def __init__(self, dir: Path, checkpoint: Path):
        self.dir, self.checkpoint, self.q8 = dir, checkpoint, dir / "tiny-phimoe-Q8_0.gguf"


def _file(path: Path, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    return path


def _manifest(folder: Path, text: str) -> Path:
    (folder / "manifest.json").write_text(text)
    return folder


def _unlink(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


@pytest.mark.parametrize("case, setup, first", CASES, ids=[c[0] for c in CASES])
def test_error_catalogue(case, setup, first, converted_phimoe, checkpoints, tmp_path):
    tmp = tmp_path / "work"
    tmp.mkdir()
    d = Converted(linked_copy(converted_phimoe, tmp / "tiny-phimoe-GGUF"), checkpoints["phimoe"])
    args = setup(tmp, d)
    before = finished_files(tmp)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    want = first.format(tmp=tmp, dir=d.dir)
    assert lines and lines[-1].startswith(want), (lines, want)
    assert len([line for line in lines if line.startswith("Error: ")]) == 1
    assert "Traceback" not in result.output
    after = finished_files(tmp)
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}, "a failed command left a finished-looking file"


def test_error_catalogue_full_disk_while_smoke_writes_the_manifest(converted_phimoe, tmp_path, monkeypatch):
    """The manifest is written aside and renamed: a full disk leaves the old one, and one line says why."""
    d = linked_copy(converted_phimoe, tmp_path / "full")
    old = (d / "manifest.json").read_bytes()
    import moeprep.files

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(moeprep.files.os, "fsync", full)
    result = CliRunner().invoke(main, ["smoke", str(d), "--runs", "1", "--tokens", "2", "--placement", "gpu",
                                       "--quality-ctx", "128", "--quality-chunks", "2"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: the disk filled up while writing {d}/manifest.json")
    assert "Traceback" not in result.output
    assert (d / "manifest.json").read_bytes() == old and not list(d.glob("*.partial"))


def test_error_catalogue_quant_equal_to_the_converted_type_is_nothing_to_do(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "f16")
    before = json.loads((d / "manifest.json").read_text())
    result = CliRunner().invoke(main, ["quantize", str(d / "tiny-phimoe-F16.gguf"), "--quant", "F16"])
    assert result.exit_code == 0, result.output
    assert "note: F16 is the input file itself; nothing to quantize" in result.stderr
    assert json.loads((d / "manifest.json").read_text()) == before


def test_error_catalogue_push_dry_run_writes_nothing(hub, converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "dry")
    before = finished_files(d)
    result = CliRunner().invoke(main, ["card", str(d), "--push", "--repo-id", "me/dry-GGUF", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert finished_files(d) == before and not (d / ".moeprep.lock").exists()
    assert mf.load(d).artifacts
