"""A staged release as scheduled CI runs it: jobs in separate directories that share nothing but the Hub.

prepare, then two smoke jobs at once (one quant each, concurrent processes), then publish; each job is
its own process with its own working directory and HF cache, as on separate runners. Then the same four
jobs again on fresh "runners": nothing changed, so nothing may be uploaded or committed, and no GGUF read.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from moeprep.records import manifest as mf
from tests.hub_server import WRITE_TOKEN

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests" / "data" / "recipes" / "tiny-phimoe-staged.yaml"
REPO = "me/tiny-phimoe-staged-GGUF"
BRANCH = "moeprep-staging"


def start(root: Path, job: str, *args: str) -> subprocess.Popen:
    """One CI job: a fresh working directory and HF cache, the recipe, and the Hub."""
    work = root / job
    work.mkdir(parents=True)
    env = dict(os.environ, HF_HOME=str(work / "hf"), HF_TOKEN=WRITE_TOKEN)
    return subprocess.Popen([sys.executable, "-m", "moeprep.cli", "-q", "release", str(RECIPE), *args,
                             "--out", str(work / "out"), "--json"],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return json.loads(stdout)


def last_error(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    return stderr.strip().splitlines()[-1]


def run_release(root: Path, hub, between=None) -> dict[str, object]:
    """prepare; smoke Q8_0 and Q4_K_M at once; publish. Returns each phase's reports and Hub requests.

    `between(root)` runs after prepare, before the smoke jobs."""
    phases = {}
    hub.requests.clear()
    t0 = time.monotonic()
    phases["prepare"] = (finish(start(root, "prepare", "--stages", "prepare")), list(hub.requests))
    if between:
        between(root)
    hub.requests.clear()
    t1 = time.monotonic()
    jobs = [start(root, f"smoke-{q}", "--stages", "smoke", "--quant", q) for q in ("Q8_0", "Q4_K_M")]
    phases["smoke"] = ([finish(p) for p in jobs], list(hub.requests))
    hub.requests.clear()
    t2 = time.monotonic()
    phases["publish"] = (finish(start(root, "publish", "--stages", "publish")), list(hub.requests))
    print(f"{root.name}: prepare {t1 - t0:.1f} s, smoke {t2 - t1:.1f} s, publish {time.monotonic() - t2:.1f} s")
    return phases


def gguf_gets(requests) -> list[str]:
    return [r[1].rsplit("/", 1)[-1] for r in requests if r[0] == "GET" and "/resolve/" in r[1] and r[1].endswith(".gguf")]


def puts(requests) -> list[str]:
    return [r[1].rsplit("/", 1)[-1] for r in requests if r[0] == "PUT"]


def test_staging_three_jobs_through_the_hub_then_nothing_again(hub, tmp_path):
    def refusals(root: Path) -> None:
        """Before any smoke: publish refuses and promotes nothing; a quant the recipe does not make is refused."""
        assert last_error(start(root, "early-publish", "--stages", "publish")) == (
            f"Error: {REPO}@{BRANCH} has no current smoke result for Q8_0, Q4_K_M "
            f"(run `moeprep release {RECIPE} --stages smoke --quant Q8_0`)")
        assert last_error(start(root, "wrong-quant", "--stages", "smoke", "--quant", "Q2_K")) == (
            f"Error: {RECIPE} does not smoke Q2_K (its quants and mixes: Q8_0, Q4_K_M)")
        assert not [p for p in hub.repos[REPO].files if p.endswith(".gguf") or p == "README.md"], "main changed early"

    first = run_release(tmp_path / "run1", hub, between=refusals)
    repo = hub.repos[REPO]
    staged = repo.branch_files(BRANCH)
    m = mf.Manifest.from_dict(json.loads(repo.files["manifest.json"]))
    q8, q4, f16 = m.artifact("Q8_0"), m.artifact("Q4_K_M"), m.artifact("F16")

    # main: every GGUF once with its sha256, the merged manifest, the card; none of staging's own files
    ggufs = {a.path: a.sha256 for a in m.artifacts}
    assert {p for p in repo.files if p.endswith(".gguf")} == set(ggufs)
    assert all(hashlib.sha256(repo.files[p]).hexdigest() == sha for p, sha in ggufs.items())
    assert {"README.md", "manifest.json", "moeprep-smoke.png"} <= set(repo.files)
    assert not [p for p in repo.files if p.startswith(("smoke/", "headers/")) or p == "quality.json"]
    card = repo.files["README.md"].decode()
    assert f"| {q4.path} | Q4_K_M |" in card and q4.sha256 in card and REPO in card
    for a in (q8, q4):  # each quant's GPU-job result, with the quality prepare measured
        result = m.smoke_result(a)
        assert result is not None and result.ok and set(result.placements) == {"gpu", "cpu-moe"}
        assert result.quality is not None and result.quality.reference_sha256 == f16.sha256
    assert m.smoke_result(q8).quality.kld_mean < m.smoke_result(q4).quality.kld_mean
    assert "prepare job" in m.smoke.methods["kld"]
    assert {f"smoke/{q}.json" for q in ("Q8_0", "Q4_K_M")} | {"quality.json"} <= set(staged)
    # publish renders the card from the manifest alone: every file's plan is in it, sized where the files were
    assert not [p for p in staged if p.startswith("headers/")]
    assert all(a.plans and not any(r.why_not for r in a.plans) for a in m.artifacts)
    assert not list((tmp_path / "run1" / "publish").rglob("*.gguf"))  # no GGUF, not even a stand-in

    # prepare uploaded each GGUF once; the smoke jobs fetched only the file each measures, nothing else heavy;
    # publish fetched no GGUF and uploaded none: main's commit references the LFS objects staging holds
    prepare_puts = puts(first["prepare"][1])
    assert Counter(prepare_puts) == Counter(set(prepare_puts)) and set(ggufs.values()) <= set(prepare_puts)
    assert sorted(gguf_gets(first["smoke"][1])) == sorted([q8.path, q4.path])
    assert puts(first["smoke"][1]) == []
    assert gguf_gets(first["publish"][1]) == []
    assert not set(puts(first["publish"][1])) & set(ggufs.values())
    every_put = Counter(prepare_puts + puts(first["publish"][1]))
    assert set(every_put.values()) == {1}, f"an LFS object was uploaded twice: {every_put}"
    promoted = [c for c in hub.commits if c[0] == REPO and c[1] == "main"]
    assert len(promoted) == 1 and promoted[0][3].count("lfsFile") == len(ggufs) + 1  # the GGUFs and the plot
    smoke_commits = [c for c in hub.commits if c[0] == REPO and c[1] == BRANCH and c[3] == ["header", "file"]]
    assert len(smoke_commits) == 2  # one small commit per smoke job, each its own file
    assert [r["did_work"] for r in first["smoke"][0]] == [True, True]
    assert first["smoke"][0][0]["stages"]["smoke"]["made"] == ["smoke/Q8_0.json"]

    # a second scheduled run on fresh runners, nothing changed: no upload, no commit, no GGUF read
    commits_before = len(hub.commits)
    second = run_release(tmp_path / "run2", hub)
    everything = [r for _, requests in second.values() for r in requests]
    assert puts(everything) == [] and len(hub.commits) == commits_before
    assert gguf_gets(everything) == [], "a GGUF was downloaded to find out that nothing changed"
    assert not [r for r in everything if r[0] == "GET" and "/resolve/" in r[1] and r[1].endswith(".safetensors")]
    reports = [second["prepare"][0], *second["smoke"][0], second["publish"][0]]
    assert [r["did_work"] for r in reports] == [False] * 4
    assert second["prepare"][0]["stages"]["stage"]["notes"][0].startswith("nothing to do: ")
