"""Recipes, releases with resume and locking, the CI matrix, importance matrices and the workflows."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.errors import MoeprepError
from moeprep.lock import locked
from moeprep.records import manifest as mf
from moeprep.release import recipe
from moeprep.tools import versions
from tests.llm import generate

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "recipes" / "tiny-phimoe.yaml"
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def last_error(result) -> str:
    assert result.exit_code == 1, result.output
    return result.stderr.strip().splitlines()[-1]


def test_release_ships_recipes_for_the_named_models():
    repos = {recipe.load(p).source.repo for p in SHIPPED}
    assert {"microsoft/Phi-3.5-MoE-instruct", "openai/gpt-oss-20b", "deepseek-ai/deepseek-moe-16b-base",
            "Qwen/Qwen3-30B-A3B", "mistralai/Mixtral-8x7B-Instruct-v0.1"} <= repos


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_release_shipped_recipe_validates(path):
    r = recipe.load(path)
    assert r.expect.expert_count and r.expect.expert_used_count and r.expect.architecture
    assert r.hub.repo_id.count("/") == 1


@pytest.mark.parametrize("change, message", [
    ({"quant": ["Q8_0"]}, "unknown key 'quant'"),
    ({"quants": "Q8_0"}, "quants must be a list, not str 'Q8_0'"),
    ({"quants": ["Q9_X"]}, "unknown quant type 'Q9_X'"),
    ({"smoke": {"run": 3}}, "smoke: unknown key 'run'"),
    ({"smoke": {"runs": "three"}}, "smoke.runs must be an integer"),
    ({"hub": {"repo_id": "me/x", "private": "yes"}}, "hub.private must be true or false"),
    ({"quants": ["IQ2_XS"]}, "IQ2_XS need an importance matrix"),
    ({"smoke": {"placements": ["cpu-only"]}}, "unknown placement 'cpu-only'"),
])
def test_release_recipe_validation_names_file_and_key(change, message, tmp_path):
    data = yaml.safe_load(TINY.read_text()) | change
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MoeprepError) as e:
        recipe.load(path)
    assert str(path) in e.value.message and message in e.value.message
    result = run("release", path, "--dry-run")
    assert last_error(result).startswith(f"Error: {path}")


def test_release_matrix_prepare_and_publish_per_recipe_smoke_per_quant():
    result = run("matrix", ROOT / "recipes")
    assert result.exit_code == 0
    include = json.loads(result.stdout)["include"]
    recipes = [recipe.load(p) for p in SHIPPED]
    assert len(include) == 2 * len(SHIPPED) + sum(len(r.quants) + len(r.mix) for r in recipes)
    mixtral = [e for e in include if e["name"] == "Mixtral-8x7B-Instruct-v0.1"]
    prepare = next(e for e in mixtral if e["group"] == "prepare")
    assert prepare["recipe"] == str(ROOT / "recipes" / "mixtral-8x7b-instruct-v0.1.yaml") and prepare["stages"] == "prepare"
    # 93.4 GB of source, its F16 and three quants, shards of what passes 50 GB: no hosted runner holds that
    assert prepare["runs_on"] == ["self-hosted", "cpu", "large-disk"] and prepare["estimate"]["disk_bytes"] > 300e9
    assert prepare["estimate"]["download_bytes"] == int(93.4e9) and prepare["estimate"]["minutes"] > 0
    smoke = {e["quant"]: e for e in mixtral if e["group"] == "smoke"}
    assert list(smoke) == ["Q8_0", "Q4_K_M", "Q2_K"] and all(e["runs_on"] == ["self-hosted", "gpu"] for e in smoke.values())
    assert smoke["Q4_K_M"]["estimate"]["download_bytes"] < smoke["Q8_0"]["estimate"]["download_bytes"] < 60e9
    assert smoke["Q4_K_M"]["estimate"]["minutes"] is None  # GPU time: not measured, so not estimated
    publish = next(e for e in mixtral if e["group"] == "publish")
    assert publish["runs_on"] == "ubuntu-latest" and publish["estimate"]["download_bytes"] < 1e9
    only = json.loads(run("matrix", ROOT / "recipes", "--group", "smoke").stdout)["include"]
    assert {e["group"] for e in only} == {"smoke"} and len(only) == sum(len(r.quants) + len(r.mix) for r in recipes)


def test_release_matrix_small_recipe_fits_a_hosted_runner(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data | {"source": {"repo": "some-org/tiny-phimoe", "size": "30MB"}}))
    [prepare] = json.loads(run("matrix", path, "--group", "prepare").stdout)["include"]
    assert prepare["runs_on"] == "ubuntu-latest" and prepare["estimate"]["disk_bytes"] < 1e9
    path.write_text(yaml.safe_dump(data))  # no source.size: nothing to estimate from, so the large runner
    [unsized] = json.loads(run("matrix", path, "--group", "prepare").stdout)["include"]
    assert unsized["runs_on"] == ["self-hosted", "cpu", "large-disk"] and unsized["estimate"]["disk_bytes"] is None


def test_release_dry_run_offline_says_what_is_unknown(tmp_path):
    # a process of its own: huggingface_hub reads HF_HUB_OFFLINE when it is imported
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "moeprep.cli", "release", str(ROOT / "recipes" / "phi-3.5-moe-instruct.yaml"),
                             "--dry-run", "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "unknown: source size and commit: HF_HUB_OFFLINE is set" in result.stdout
    assert "Phi-3.5-MoE-instruct-Q4_K_M.gguf: to make, about unknown" in result.stdout
    assert "disk: unknown needed" in result.stdout


def test_release_dry_run_with_the_hub_gives_sizes(hub, tmp_path):
    result = run("release", TINY, "--dry-run", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)
    repo = hub.repos["some-org/tiny-phimoe"]
    assert p["source"]["commit"] == repo.commit and p["source"]["bytes"] == sum(len(b) for b in repo.files.values())
    assert all(f["estimated_bytes"] > 0 for f in p["files"]) and p["preflight"]["disk_ok"] is True
    assert p["unknown"] == []
    assert not (tmp_path / "out").exists()


def test_release_all_stages_then_nothing_to_do(hub, write_token, tmp_path):
    out = tmp_path / "release"
    first = run("release", TINY, "--out", out, "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["did_work"] and report["stages"]["smoke"]["made"] and report["stages"]["promote"]["made"]
    assert report["stages"]["stage"]["made"] and report["stages"]["quality"]["made"]
    m = mf.load(out)
    assert [a.quant for a in m.artifacts] == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
    assert m.source.architecture == "PhiMoEForCausalLM"
    pushed = hub.repos["me/tiny-phimoe-release-GGUF"]
    assert all(pushed.sha256(a.path) == a.sha256 for a in m.artifacts)
    published = mf.Manifest.from_dict(json.loads(pushed.files["manifest.json"]))
    assert all(published.smoke_result(a) and published.smoke_result(a).quality for a in published.artifacts[1:])
    assert write_token not in first.output

    hub.requests.clear()
    second = run("release", TINY, "--out", out)
    assert second.exit_code == 0, second.output
    assert second.stdout.strip().splitlines()[-1] == "nothing to do: every stage was up to date", second.stdout
    assert "smoke: up to date" in second.stdout and "card: up to date" in second.stdout
    assert "promote: up to date" in second.stdout
    assert not [r for r in hub.requests if r[0] == "PUT" or "/commit/" in r[1]
                or r[0] == "GET" and "/resolve/" in r[1] and r[1].endswith((".gguf", ".safetensors"))]


def test_release_killed_during_quantize_then_completed(hub, tmp_path):
    out = tmp_path / "killed"
    local = "download,convert,quantize,probe"  # prepare without the Hub hand-off
    cmd = [sys.executable, "-m", "moeprep.cli", "release", str(TINY), "--stages", local, "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    killed_mid_quantize = False
    while time.monotonic() < deadline and proc.poll() is None:
        partials = [p for p in out.glob("*.gguf.partial") if "-F16" not in p.name] if out.exists() else []
        if partials:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_mid_quantize = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_mid_quantize, "the release finished before a quant was caught in progress"
    m = mf.load(out)
    assert len(m.artifacts) < 7
    assert not any(p.name.endswith(".gguf") and p.name not in {a.path for a in m.artifacts} for p in out.iterdir()), \
        "a killed quantize left a file that looks finished"

    result = run("release", TINY, "--stages", local, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stages"]["convert"]["kept"] == ["tiny-phimoe-F16.gguf"]
    m = mf.load(out)
    assert len(m.artifacts) == 7 and not list(out.glob("*.partial"))
    assert len(generate(out / "tiny-phimoe-Q3_K_M.gguf")) == 8


def test_release_second_release_on_the_same_directory_refuses(hub, tmp_path):
    out = tmp_path / "locked"
    with locked(out):
        result = run("release", TINY, "--out", out)
    assert last_error(result) == (f"Error: another moeprep command is writing into {out}: pid {os.getpid()} (moeprep) "
                                  f"holds {out / '.moeprep.lock'} "
                                  "(wait for it to finish; the lock goes away when that process ends)")


def test_release_probe_checks_the_recipe_expectations(hub, tmp_path):
    data = yaml.safe_load(TINY.read_text())
    data["expect"]["expert_count"] = 8
    data["quants"] = ["Q8_0"]
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run("release", path, "--stages", "prepare", "--out", tmp_path / "out")
    assert "the converted file does not match the recipe: expert_count 16 (expected 8)" in last_error(result)


def test_release_unknown_stage(tmp_path):
    assert last_error(run("release", TINY, "--stages", "bake")).startswith("Error: unknown stage 'bake'")


# --- importance matrix ------------------------------------------------------------------------------

def test_imatrix_quant_needs_and_uses_an_importance_matrix(converted_phimoe, tmp_path):
    out = tmp_path / "imat"
    shutil.copytree(converted_phimoe, out)
    f16 = out / "tiny-phimoe-F16.gguf"
    refused = run("quantize", f16, "--quant", "IQ2_XS")
    assert "IQ2_XS needs an importance matrix" in last_error(refused)
    made = run("imatrix", f16, "--text", ROOT / "recipes" / "calibration" / "general-en.txt", "--ctx", "128", "--json")
    assert made.exit_code == 0, made.output
    info = json.loads(made.stdout)
    assert info["tool"] == f"llama-imatrix, llama.cpp {versions()['llama_cpp_commit']}" and Path(info["imatrix"]).is_file()
    assert info["made_from"] == mf.load(out).artifact("F16").sha256  # the manifest's, not hashed again
    result = run("quantize", f16, "--quant", "IQ2_XS", "--imatrix", info["imatrix"], "--json")
    assert result.exit_code == 0, result.output
    [a] = json.loads(result.stdout)
    assert a["settings"] == {"outtype": None, "ftype": "IQ2_XS", "imatrix": info["sha256"], "mix": None,
                             "tensor_types": []}
    assert len(generate(out / "tiny-phimoe-IQ2_XS.gguf")) == 8


def test_imatrix_release_records_text_and_quants_and_the_card_says_so(hub, tmp_path):
    out = tmp_path / "imatrix-release"
    recipe_path = ROOT / "tests" / "data" / "recipes" / "tiny-phimoe-imatrix.yaml"
    result = run("release", recipe_path, "--stages", "download,convert,quantize,probe", "--out", out)
    assert result.exit_code == 0, result.output
    carded = run("card", out, "--repo-id", "me/tiny-phimoe-imatrix-GGUF")
    assert carded.exit_code == 0, carded.output
    m = mf.load(out)
    text = ROOT / "recipes" / "calibration" / "general-en.txt"
    import hashlib

    assert m.imatrix.text == "general-en.txt"
    assert m.imatrix.text_sha256 == hashlib.sha256(text.read_bytes()).hexdigest()
    assert m.artifact("IQ2_XS").settings.imatrix == m.imatrix.sha256
    assert m.artifact("Q4_K_M").settings.imatrix is None
    card = (out / "README.md").read_text()
    assert "| IQ2_XS (imatrix) |" in card
    assert f"`general-en.txt` (sha256 {m.imatrix.text_sha256[:12]}…), used for IQ2_XS" in card


# --- workflows ---------------------------------------------------------------------------------------

def test_workflows_pass_actionlint():
    exe = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    assert exe, "actionlint is not installed (pip install -e '.[test]')"
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert {w.name for w in workflows} == {"ci.yml", "release.yml"}
    result = subprocess.run([exe, *map(str, workflows)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _steps_with(job: dict, text: str) -> list[dict]:
    return [st for st in job["steps"] if text in json.dumps(st)]


def test_workflows_release_shape():
    import re

    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    triggers = wf[True]  # YAML 1.1 reads the key `on` as true
    assert "schedule" in triggers and "recipe" in triggers["workflow_dispatch"]["inputs"]
    jobs = wf["jobs"]
    assert set(jobs) == {"plan", "prepare", "smoke", "publish", "revalidate"}
    monthly = next(c["cron"] for c in triggers["schedule"] if c["cron"] != "17 3 * * 1")
    assert jobs["revalidate"]["if"] == f"github.event.schedule == '{monthly}'"
    assert all(monthly in str(jobs[j]["if"]) for j in ("prepare", "smoke", "publish"))  # the monthly run only checks
    assert "moeprep matrix" in json.dumps(jobs["plan"])
    assert jobs["prepare"]["needs"] == "plan" and jobs["smoke"]["needs"] == ["plan", "prepare"]
    assert jobs["publish"]["needs"] == ["plan", "prepare", "smoke"]
    assert jobs["smoke"]["runs-on"] == ["self-hosted", "gpu"] and jobs["publish"]["runs-on"] == "ubuntu-latest"
    assert jobs["prepare"]["runs-on"] == "${{ matrix.runs_on }}"
    for group in ("prepare", "smoke", "publish"):
        job = jobs[group]
        assert job["strategy"]["matrix"] == f"${{{{ fromJSON(needs.plan.outputs.{group}) }}}}"
        assert job["concurrency"]["group"].startswith("release-${{ matrix.name }}-")
        assert job["concurrency"]["cancel-in-progress"] is False
        [step] = _steps_with(job, "moeprep -q release")
        assert f"--stages {group}" in step["run"]
        # every matrix key the job reads is one `moeprep matrix` emits for that group
        used = set(re.findall(r"matrix\.(\w+)", json.dumps(job)))
        emitted = json.loads(run("matrix", ROOT / "recipes", "--group", group).stdout)["include"]
        assert emitted and all(used <= set(entry) for entry in emitted), (group, used)
    # smoke entries share a recipe: one group per recipe would queue them and cancel the pending ones
    assert "matrix.quant" in jobs["smoke"]["concurrency"]["group"]
    assert '--quant "$QUANT"' in _steps_with(jobs["smoke"], "moeprep -q release")[0]["run"]
    # the token: only in the env of the steps that write to the Hub, never job- or workflow-wide
    assert "secrets." not in json.dumps({k: v for k, v in wf.items() if k != "jobs"})
    for name, job in jobs.items():
        assert "secrets." not in json.dumps({k: v for k, v in job.items() if k != "steps"}), name
        for st in job["steps"]:
            if "secrets." in json.dumps(st):
                assert "moeprep -q release" in st.get("run", "") or "moeprep -q revalidate" in st.get("run", ""), (name, st)
                assert st["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert "secrets." not in json.dumps(jobs["plan"])
    # the monthly re-validation: one GPU job per published repo, reading what `moeprep matrix --group revalidate` emits
    revalidate = jobs["revalidate"]
    assert revalidate["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.revalidate) }}"
    used = set(re.findall(r"matrix\.(\w+)", json.dumps(revalidate)))
    emitted = json.loads(run("matrix", ROOT / "recipes", "--group", "revalidate").stdout)["include"]
    assert emitted and all(used <= set(entry) for entry in emitted)
    # no model file travels between jobs: no artifacts at all, and caches hold pip's files and the llama.cpp build
    text = json.dumps(jobs)
    assert "upload-artifact" not in text and "download-artifact" not in text
    for job in jobs.values():
        for st in job["steps"]:
            if st.get("uses", "").startswith("actions/cache"):
                assert set(st["with"]["path"].split()) <= {"~/.cache/pip", "~/.cache/moeprep/llama.cpp"}, st
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "make demo" in ci and "make test" in ci


def test_imatrix_release_records_coverage_and_publishes_the_imatrix(hub, write_token, tmp_path):
    out = tmp_path / "imatrix-coverage"
    recipe_path = ROOT / "tests" / "data" / "recipes" / "tiny-phimoe-imatrix.yaml"
    assert run("release", recipe_path, "--stages", "download,convert,quantize,probe,plan", "--out", out).exit_code == 0
    m = mf.load(out)
    coverage = m.imatrix.coverage
    assert [layer.block for layer in coverage] == list(range(m.probe.block_count))
    assert all(layer.experts == m.probe.expert_count for layer in coverage)
    card = run("card", out, "--repo-id", "me/tiny-phimoe-imatrix-cov-GGUF", "--push")
    assert card.exit_code == 0, card.output
    text = (out / "README.md").read_text()
    assert f"`imatrix.gguf` (sha256 {m.imatrix.sha256[:12]}…) is published beside the files; expert coverage:" in text
    assert hub.repos["me/tiny-phimoe-imatrix-cov-GGUF"].sha256("imatrix.gguf") == m.imatrix.sha256
