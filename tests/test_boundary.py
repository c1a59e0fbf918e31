"""The write boundary: moeprep writes only inside its output directory, never through a link it did not make,
never over a file its manifest lists unless making that file is the point, and reads only the paths a manifest
may name. Each case is a hostile or careless input; after it, coreutils' sha256sum shows that nothing outside
the output directory changed and no listed file changed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.records import manifest as mf
from tests.test_error_catalogue import linked_copy

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "recipes" / "calibration" / "general-en.txt"


def sums(folder: Path) -> dict[str, str]:
    """sha256sum of every regular file under `folder` (links not followed), by coreutils, not by moeprep."""
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".moeprep.lock")
    if not files:
        return {}
    out = subprocess.run(["sha256sum", *files], capture_output=True, text=True, check=True).stdout
    return {line[66:]: line[:64] for line in out.splitlines()}


@pytest.fixture
def world(converted_phimoe, tmp_path):
    """A converted directory (hard-linked GGUFs) and, beside it, a victim folder nothing may touch."""
    d = linked_copy(converted_phimoe, tmp_path / "out")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("do not overwrite\n")
    return d, victim


def run_refused(args: list[str], *watched: Path) -> str:
    before = {w: sums(w) for w in watched}
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert len([line for line in lines if line.startswith("Error: ")]) == 1
    for w in watched:
        assert sums(w) == before[w], f"{w} changed"
    return lines[-1]


@pytest.mark.parametrize("name", ["tiny-phimoe-Q8_0.gguf", "tiny-phimoe-F16.gguf", "manifest.json"])
def test_imatrix_out_never_replaces_a_listed_file(world, name):
    d, victim = world
    line = run_refused(["imatrix", str(d / "tiny-phimoe-F16.gguf"), "--text", str(TEXT), "--out", str(d / name)],
                       d, victim)
    if name.endswith(".gguf"):
        assert line == (f"Error: {d / name} is a file the manifest lists, and this would replace it (write to another "
                         "name; moeprep replaces a listed file only when making it again)")
    else:  # not even a GGUF name: refused before the listing is read
        assert line.startswith("Error: --out ") and line.endswith("is not a .gguf file name (name the importance "
                                                                   "matrix NAME.gguf)")
    mf.load(d)  # still a manifest


def test_a_planted_lock_link_is_refused(world):
    d, victim = world
    (d / ".moeprep.lock").symlink_to(victim / "precious.txt")
    line = run_refused(["smoke", str(d), "--runs", "1"], d, victim)
    assert line.startswith(f"Error: {d / '.moeprep.lock'} is a symbolic link, which moeprep did not make")


@pytest.mark.parametrize("planted", ["README.md", "moeprep-smoke.png"])
def test_card_never_writes_through_a_planted_link(smoked, tmp_path, planted):
    src, _ = smoked
    d = linked_copy(src, tmp_path / "out")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep\n")
    (d / planted).unlink(missing_ok=True)
    (d / planted).symlink_to(victim / "precious.txt")
    line = run_refused(["card", str(d)], victim)
    assert line.startswith(f"Error: {d / planted} is a symbolic link, which moeprep did not make")
    assert (victim / "precious.txt").read_text() == "keep\n"


def test_imatrix_log_link_is_refused(world):
    d, victim = world
    (d / "imat.log").symlink_to(victim / "precious.txt")
    line = run_refused(["imatrix", str(d / "tiny-phimoe-F16.gguf"), "--text", str(TEXT), "--out", str(d / "imat.gguf")],
                       victim)
    assert line.startswith(f"Error: {d / 'imat.log'} is a symbolic link")
    assert not (d / "imat.gguf").exists()


def test_convert_log_folder_link_is_refused(checkpoints, tmp_path):
    out, victim = tmp_path / "fresh", tmp_path / "victim"
    out.mkdir()
    victim.mkdir()
    (out / "logs").symlink_to(victim)
    line = run_refused(["convert", str(checkpoints["phimoe"]), "--out", str(out), "--quant", "Q8_0"], victim)
    assert line.startswith(f"Error: {out / 'logs'} is a symbolic link")
    assert list(victim.iterdir()) == [] and not list(out.glob("*.gguf"))


def test_a_manifest_link_is_refused(world):
    d, victim = world
    (victim / "manifest.json").write_bytes((d / "manifest.json").read_bytes())
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to(victim / "manifest.json")
    line = run_refused(["quantize", str(d / "tiny-phimoe-F16.gguf"), "--quant", "Q5_K_M"], victim)
    assert line.startswith(f"Error: {d / 'manifest.json'} is a symbolic link")


def _tamper(d: Path, edit) -> None:
    data = json.loads((d / "manifest.json").read_text())
    edit(data)
    (d / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("where, value", [
    ("path", "/etc/hostname"),
    ("path", "../victim/precious.txt"),
    ("path", "sub/../../x.gguf"),
    ("path", "README.md"),
    ("quant", "../../victim"),
])
def test_manifest_paths_outside_the_directory_are_refused_on_load(world, hub, write_token, where, value):
    """A tampered manifest can make no command read or upload a file outside the directory."""
    d, victim = world
    _tamper(d, lambda m: m["artifacts"][1].__setitem__(where, value))
    line = run_refused(["push", str(d), "--repo-id", "me/tampered-GGUF"], d, victim)
    assert line.startswith(f"Error: {d / 'manifest.json'}: not a valid moeprep manifest: artifacts.1.{where}: ")
    assert repr(value)[:40] in line or "quant name" in line
    assert "me/tampered-GGUF" not in hub.repos


def test_a_shard_outside_its_folder_is_refused(world):
    d, victim = world
    _tamper(d, lambda m: m["artifacts"][1].__setitem__("shards", [
        {"path": "Q2_K/x-00001-of-00002.gguf", "size": 1, "sha256": "0" * 64}]))
    line = run_refused(["smoke", str(d)], d, victim)
    assert "shard 'Q2_K/x-00001-of-00002.gguf' is outside its folder Q8_0/" in line


def test_smoking_one_file_keeps_the_others_or_refuses(smoked, tmp_path):
    """Issue 18: a smoke of one file adds to the directory's results when it measures the same way on the same
    machine, and is refused where it would drop them."""
    src, _ = smoked
    d = linked_copy(src, tmp_path / "out")
    before = mf.load(d).smoke
    other = sorted(set(before.artifacts) - {"tiny-phimoe-Q8_0.gguf"})
    line = run_refused(["smoke", str(d / "tiny-phimoe-Q8_0.gguf"), "--runs", "1"], d)
    assert line.startswith(f"Error: {d / 'manifest.json'} holds results for ") and "other settings" in line
    s = before.settings
    same = ["smoke", str(d / "tiny-phimoe-Q8_0.gguf"), "--runs", str(s.runs), "--quality-ctx", str(s.quality_ctx),
            "--quality-chunks", str(s.quality_chunks)]
    result = CliRunner().invoke(main, same)
    assert result.exit_code == 0, result.output
    after = mf.load(d).smoke
    assert sorted(set(after.artifacts) - {"tiny-phimoe-Q8_0.gguf"}) == other
    assert all(after.artifacts[n] == before.artifacts[n] for n in other)


def test_card_keeps_the_source_readme_it_converted(checkpoints, tmp_path):
    """Issue 18: the card inherits from the README whose sha256 the manifest records, not from whatever the source
    folder holds now."""
    from moeprep.release.pipeline import prepare

    src = tmp_path / "model"
    shutil.copytree(checkpoints["mixtral"], src)
    out = tmp_path / "out"
    prepare(str(src), out=out, quants=["Q8_0"])
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n\nSomething else.\n")
    assert CliRunner().invoke(main, ["card", str(out), "--base-model", "some-org/m"]).exit_code == 0
    text = (out / "README.md").read_text()
    assert "license: mit" in text and "apache-2.0" not in text
    # a manifest from before moeprep kept the README's fields reads it again, and only as recorded
    data = json.loads((out / "manifest.json").read_text())
    data["source"]["card"] = None
    (out / "manifest.json").write_text(json.dumps(data))
    line = run_refused(["card", str(out), "--base-model", "some-org/m"], out)
    assert "the source's README.md as recorded" in line
