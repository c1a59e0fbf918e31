"""`moeprep revalidate` against the local Hub: a published repo smoked again with the llama.cpp at hand. Identical
tools: nothing is committed. A published figure that the files no longer reproduce: one commit, a new card with a
dated changelog entry holding the old figure beside the new."""

from __future__ import annotations

import json

from click.testing import CliRunner

from moeprep.cli import main
from moeprep.hub.repo import HubRepo, Want
from moeprep.records import manifest as mf
from tests.test_error_catalogue import linked_copy

REPO = "me/tiny-phimoe-revalidate-GGUF"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def commits(hub) -> list:
    return [r for r in hub.requests if "/commit/" in r[1]]


def test_revalidate_commits_nothing_when_nothing_moved_and_a_changelog_when_a_figure_did(
        hub, write_token, converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "tiny-phimoe-GGUF")
    smoked = run("smoke", d, "--quality-ctx", "128", "--quality-chunks", "2")
    assert smoked.exit_code == 0, smoked.output
    assert run("card", d, "--repo-id", REPO, "--push").exit_code == 0

    hub.requests.clear()
    # the test process's own speed varies far more than a quiet machine's: a wide tolerance, tenfold still counts
    same = run("revalidate", REPO, "--out", tmp_path / "again", "--speed-tolerance", "0.9", "--json")
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["changes"] == [] and not commits(hub)

    # a figure the files no longer reproduce: the published decode speed of Q4_K_M on the GPU placement, tenfold
    published = json.loads(HubRepo(REPO).download(mf.FILENAME).read_text())
    tps = published["smoke"]["artifacts"]["tiny-phimoe-Q4_K_M.gguf"]["placements"]["gpu"]["decode_tps"]
    tps["mean"], tps["values"] = tps["mean"] * 10, [v * 10 for v in tps["values"]]
    HubRepo(REPO).commit([Want(mf.FILENAME, local=json.dumps(published).encode())], "an edited figure")
    hub.requests.clear()
    moved = run("revalidate", REPO, "--out", tmp_path / "moved", "--speed-tolerance", "0.9", "--json")
    assert moved.exit_code == 0, moved.output
    changes = json.loads(moved.stdout)["changes"]
    assert [(c["file"], c["what"]) for c in changes] == [("tiny-phimoe-Q4_K_M.gguf", "gpu decode tok/s")]
    assert len(commits(hub)) == 1
    card = HubRepo(REPO).download("README.md").read_text()
    assert "## Changelog" in card and "| `tiny-phimoe-Q4_K_M.gguf` | gpu decode tok/s |" in card
    assert f"{tps['mean']:.1f}" in card  # the old figure stays, beside the new
    m = mf.Manifest.from_dict(json.loads(HubRepo(REPO).download(mf.FILENAME).read_text()))
    assert m.changelog[-1].llama_cpp_before == m.changelog[-1].llama_cpp_after  # the same build, this test
    assert run("card", "--check", tmp_path / "moved" / "README.md").exit_code == 0


def test_revalidate_refuses_a_repo_with_nothing_measured(hub, write_token, converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "tiny-phimoe-GGUF")
    data = json.loads((d / "manifest.json").read_text())
    data["smoke"] = None
    (d / "manifest.json").write_text(json.dumps(data))
    assert run("card", d, "--repo-id", "me/unmeasured-GGUF", "--push").exit_code == 0
    result = run("revalidate", "me/unmeasured-GGUF", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "publishes no smoke results to compare with" in result.stderr


def test_the_monthly_matrix_has_one_revalidate_job_per_recipe():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
    result = run("matrix", recipes[0].parent, "--group", "revalidate")
    assert result.exit_code == 0, result.output
    jobs = json.loads(result.stdout)["include"]
    assert [j["recipe"] for j in jobs] == [str(p) for p in recipes]
    assert all(j["group"] == "revalidate" and "/" in j["repo_id"] and j["runs_on"] == ["self-hosted", "gpu"]
               for j in jobs)
