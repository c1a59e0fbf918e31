"""convert: the whole pipeline through the real client, converter, quantizer and loader."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.records import manifest as mf
from moeprep.release.pipeline import prepare
from tests.llm import generate

QUANTS = ["F16", "Q8_0", "Q4_K_M", "Q2_K"]


def coreutils_sha256(path: Path) -> str:
    """An independent hash: coreutils, not moeprep's hashlib code."""
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


def test_convert_hub_repo_end_to_end(converted_phimoe, hub):
    m = mf.load(converted_phimoe)
    assert [a.quant for a in m.artifacts] == QUANTS
    assert [a.path for a in m.artifacts] == [f"tiny-phimoe-{q}.gguf" for q in QUANTS]
    for a in m.artifacts:
        path = converted_phimoe / a.path
        assert a.sha256 == coreutils_sha256(path)
        assert a.size == path.stat().st_size
    assert not list(converted_phimoe.glob("*.partial"))
    repo = hub.repos["some-org/tiny-phimoe"]
    assert (m.source.id, m.source.kind, m.source.revision, m.source.commit) == ("some-org/tiny-phimoe", "hub", "main", repo.commit)
    assert {f.path: f.sha256 for f in m.source.files} == {p: repo.sha256(p) for p in repo.files}
    assert m.probe.architecture == "phimoe" and m.probe.expert_count == 16
    assert m.tools["llama_cpp_commit"].startswith("0c1e570")
    f16 = m.artifact("F16")
    assert all(a.made_from == f16.sha256 for a in m.artifacts if a.quant != "F16")
    assert f16.made_from == m.source.fingerprint()


@pytest.mark.parametrize("quant", QUANTS)
def test_convert_every_phimoe_file_loads_and_generates(converted_phimoe, quant):
    assert len(generate(converted_phimoe / f"tiny-phimoe-{quant}.gguf")) == 8


@pytest.mark.parametrize("kind", ["mixtral", "llama"])
def test_convert_local_checkpoints_load_and_generate(converted_local, kind):
    out = converted_local[kind]
    m = mf.load(out)
    assert [a.quant for a in m.artifacts] == QUANTS
    for a in m.artifacts:
        assert len(generate(out / a.path)) == 8, a.path
    assert m.probe.architecture == "llama"
    assert m.probe.expert_count == (8 if kind == "mixtral" else 0)


def test_convert_k_quants_really_apply(converted_phimoe):
    from moeprep.ggufio.probe import probe

    types = {t.type for layer in probe(converted_phimoe / "tiny-phimoe-Q2_K.gguf").layers for t in layer.experts}
    assert types <= {"Q2_K", "Q3_K", "Q4_K"} and "Q2_K" in types


def test_convert_rerun_does_no_work(converted_phimoe, hub):
    before = {p.name: p.stat().st_mtime_ns for p in converted_phimoe.glob("*.gguf")}
    hub.requests.clear()
    result = CliRunner().invoke(main, ["convert", "some-org/tiny-phimoe", "--out", str(converted_phimoe), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["made"] == [] and len(data["kept"]) == 4
    assert {p.name: p.stat().st_mtime_ns for p in converted_phimoe.glob("*.gguf")} == before
    assert not [r for r in hub.requests if "/resolve/" in r[1] and r[0] == "GET"], "cached files were fetched again"


def test_convert_rerun_redoes_damaged_and_missing_outputs(checkpoints, tmp_path):
    out = tmp_path / "out"
    prepare(str(checkpoints["mixtral"]), out=out, quants=["Q8_0", "Q4_K_M"])
    m = mf.load(out)
    good = {a.quant: a.sha256 for a in m.artifacts}
    # what a crash or a bad disk leaves: a stray partial, a damaged file, an unrecorded file
    (out / "tiny-mixtral-Q2_K.gguf.partial").write_bytes(b"half")
    with open(out / "tiny-mixtral-Q8_0.gguf", "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 64)
    (out / "tiny-mixtral-Q2_K.gguf").write_bytes(b"GGUF looks finished but is not")
    result = prepare(str(checkpoints["mixtral"]), out=out)
    assert result.kept == ["tiny-mixtral-F16.gguf", "tiny-mixtral-Q4_K_M.gguf"]
    assert result.made == ["tiny-mixtral-Q8_0.gguf", "tiny-mixtral-Q2_K.gguf"]
    m = mf.load(out)
    assert m.artifact("Q8_0").sha256 == good["Q8_0"] == coreutils_sha256(out / "tiny-mixtral-Q8_0.gguf")
    assert m.artifact("Q2_K").sha256 == coreutils_sha256(out / "tiny-mixtral-Q2_K.gguf")
    assert not list(out.glob("*.partial"))


def test_convert_killed_mid_run_resumes(checkpoints, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moeprep.cli", "convert", str(checkpoints["phimoe"]), "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    partial = out / "tiny-phimoe-F16.gguf.partial"  # made empty by moeprep, then written by the converter
    while not (partial.is_file() and partial.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the converter child goes down with it
    proc.wait()
    assert not (out / "tiny-phimoe-F16.gguf").exists(), "a killed conversion left a file that looks finished"
    result = CliRunner().invoke(main, ["convert", str(checkpoints["phimoe"]), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    m = mf.load(out)
    assert [a.quant for a in m.artifacts] == QUANTS
    assert all(a.sha256 == coreutils_sha256(out / a.path) for a in m.artifacts)
    assert not list(out.glob("*.partial"))
    assert len(generate(out / "tiny-phimoe-Q4_K_M.gguf")) == 8
