"""pull: a pushed repo's manifest and chosen GGUFs, verified against the manifest, and a rerun that moves nothing."""

from __future__ import annotations

import hashlib
import json
import shutil

from click.testing import CliRunner

from moeprep.cli import main
from moeprep.records import manifest as mf


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_pull_one_quant_verified_then_nothing_again(hub, converted_phimoe, write_token, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(converted_phimoe, src, ignore=shutil.ignore_patterns(".moeprep.lock"))
    assert run("card", src, "--repo-id", "me/tiny-pull-GGUF", "--push").exit_code == 0
    out = tmp_path / "job"
    result = run("pull", "me/tiny-pull-GGUF", "--quant", "q4_k_m", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["made"] == ["tiny-phimoe-Q4_K_M.gguf"]
    m = mf.load(out)
    q4 = m.artifact("Q4_K_M")
    assert hashlib.sha256((out / q4.path).read_bytes()).hexdigest() == q4.sha256
    assert not (out / "tiny-phimoe-F16.gguf").exists()  # only what was asked for

    hub.requests.clear()
    again = run("pull", "me/tiny-pull-GGUF", "--quant", "Q4_K_M", "--out", out, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["made"] == []
    assert not [r for r in hub.requests if r[0] == "GET" and r[1].endswith(".gguf")], "a GGUF was fetched again"
    unknown = run("pull", "me/tiny-pull-GGUF", "--quant", "Q9_X", "--out", out)
    assert unknown.exit_code == 1 and unknown.stderr.startswith("Error: me/tiny-pull-GGUF has no Q9_X (it has F16, ")


def test_pull_refuses_bytes_the_manifest_does_not_list(hub, converted_phimoe, write_token, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(converted_phimoe, src, ignore=shutil.ignore_patterns(".moeprep.lock"))
    assert run("card", src, "--repo-id", "me/tiny-liar-GGUF", "--push").exit_code == 0
    repo = hub.repos["me/tiny-liar-GGUF"]
    repo.files["tiny-phimoe-Q2_K.gguf"] = repo.files["tiny-phimoe-Q2_K.gguf"][:-1] + b"\x00"  # bytes changed behind it
    out = tmp_path / "job"
    result = run("pull", "me/tiny-liar-GGUF", "--quant", "Q2_K", "--out", out)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "Error: me/tiny-liar-GGUF/tiny-phimoe-Q2_K.gguf does not have the sha256 its manifest lists")
    assert not (out / "tiny-phimoe-Q2_K.gguf").exists()


def test_pull_bad_repo_id_makes_nothing(hub, tmp_path):
    assert run("pull", "../etc", "--out", tmp_path / "x").stderr.startswith("Error: '../etc' is not a Hub repo id")
    assert not (tmp_path / "x").exists()


def test_pull_into_a_directory_keeps_its_own_records_and_refuses_to_replace_them(hub, converted_phimoe, write_token,
                                                                                tmp_path):
    """Issue 18: pulling into an existing directory merges into its manifest; a record it would replace is refused."""
    src = tmp_path / "src"
    shutil.copytree(converted_phimoe, src, ignore=shutil.ignore_patterns(".moeprep.lock"))
    assert run("card", src, "--repo-id", "me/tiny-merge-GGUF", "--push").exit_code == 0
    local = tmp_path / "local"
    shutil.copytree(converted_phimoe, local, ignore=shutil.ignore_patterns(".moeprep.lock"))
    made = run("quantize", local / "tiny-phimoe-F16.gguf", "--quant", "Q5_K_M")  # a quant only this directory has
    assert made.exit_code == 0, made.output
    result = run("pull", "me/tiny-merge-GGUF", "--quant", "Q4_K_M", "--out", local)
    assert result.exit_code == 0, result.output
    m = mf.load(local)
    assert m.artifact("Q5_K_M") is not None and m.artifact("Q4_K_M") is not None  # the local record is kept

    other = tmp_path / "other"
    shutil.copytree(converted_phimoe, other, ignore=shutil.ignore_patterns(".moeprep.lock"))
    data = json.loads((other / "manifest.json").read_text())
    q4 = next(a for a in data["artifacts"] if a["quant"] == "Q4_K_M")
    q4["sha256"] = "0" * 64  # a local record of other bytes under the same name
    (other / "manifest.json").write_text(json.dumps(data))
    before = (other / "manifest.json").read_bytes()
    refused = run("pull", "me/tiny-merge-GGUF", "--quant", "Q4_K_M", "--out", other)
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"Error: pulling would replace the record of tiny-phimoe-Q4_K_M.gguf in {other / 'manifest.json'} with the "
        "repo's tiny-phimoe-Q4_K_M.gguf (other bytes) (pull into another --out)")
    assert (other / "manifest.json").read_bytes() == before
