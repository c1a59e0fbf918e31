"""The CLI surface: help with examples, download, quantize alone, demo, and the manifest file."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from click.testing import CliRunner

from moeprep.card.lint import lint
from moeprep.cli import main
from moeprep.records import manifest as mf
from tests.llm import generate


def commands():
    return sorted(main.commands)


@pytest.mark.parametrize("name", commands())
def test_cli_every_command_has_help_with_an_example(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and f"moeprep {name}" in result.output


def test_cli_quantize_help_lists_llama_cpp_file_types():
    out = CliRunner().invoke(main, ["quantize", "--help"]).output
    for name in ("Q8_0", "Q4_K_M", "Q2_K", "IQ4_XS", "Q6_K", "BF16"):
        assert name in out


def test_cli_top_level_help_does_not_import_heavy_modules():
    code = "import sys; from moeprep.cli import main; print(sorted(m for m in ('torch','llama_cpp','transformers','huggingface_hub') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_cli_download_verifies_and_prints_hashes(hub):
    result = CliRunner().invoke(main, ["download", "some-org/tiny-mixtral", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    repo = hub.repos["some-org/tiny-mixtral"]
    assert data["source"]["commit"] == repo.commit
    assert {f["path"]: f["sha256"] for f in data["source"]["files"]} == {p: repo.sha256(p) for p in repo.files}


def test_cli_download_pins_a_commit(hub):
    repo = hub.repos["some-org/tiny-mixtral"]
    result = CliRunner().invoke(main, ["download", "some-org/tiny-mixtral", "--revision", repo.commit, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"]["revision"] == repo.commit


def test_cli_quantize_alone_records_in_the_manifest(converted_local, tmp_path):
    out = tmp_path / "mixtral"
    shutil.copytree(converted_local["mixtral"], out)  # the session's conversion stays as it was
    result = CliRunner().invoke(main, ["quantize", str(out / "tiny-mixtral-F16.gguf"), "--quant", "q5_k_m", "--json"])
    assert result.exit_code == 0, result.output
    [made] = json.loads(result.stdout)
    assert made["path"] == "tiny-mixtral-Q5_K_M.gguf" and made["quant"] == "Q5_K_M"
    assert mf.load(out).artifact("Q5_K_M").sha256 == made["sha256"]
    assert len(generate(out / "tiny-mixtral-Q5_K_M.gguf")) == 8


def test_cli_demo_runs_the_main_job(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--runs", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [a["quant"] for a in data["manifest"]["artifacts"]] == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    assert data["manifest"]["artifacts"][0]["probe"]["expert_count"] == 16
    # the whole job: every file smoked, a plan, and a card whose figures all trace to the manifest
    assert set(data["manifest"]["smoke"]["artifacts"]) == {a["path"] for a in data["manifest"]["artifacts"]}
    assert data["plan"]["kind"] == "prediction" and data["plan"]["rows"]
    card = Path(data["card"][0])
    text = card.read_text()
    assert "decode tok/s" in text and "![Decode speed" in text and "a local model (tiny-phimoe, not on the Hub)" in text
    assert set(lint(card)) == {"front matter: missing base_model", "front matter: missing base_model_relation"}
    # the demo's model is trained (tests/test_demo.py): it writes the calibration text's words, and its quants order
    smoke = data["manifest"]["smoke"]["artifacts"]
    kld = {name: smoke[f"tiny-phimoe-{name}.gguf"]["quality"]["kld_mean"] for name in ("Q8_0", "Q4_K_M", "Q2_K")}
    assert kld["Q8_0"] < kld["Q4_K_M"] < kld["Q2_K"], kld
    greedy = smoke["tiny-phimoe-F16.gguf"]["placements"]["gpu"]["greedy_tokens"]
    tokenizer = spm.SentencePieceProcessor(model_file=str(tmp_path / "tiny-phimoe" / "tokenizer.model"))
    words = tokenizer.decode(greedy).split()
    known = set((Path(__file__).parent.parent / "recipes" / "calibration" / "general-en.txt").read_text().split())
    assert len(words) >= 10 and len(set(words)) > len(words) // 2, words  # text, not a loop
    assert sum(w in known for w in words) >= 0.7 * len(words), words


def test_cli_manifest_round_trips_and_rejects_other_formats(converted_phimoe, tmp_path):
    m = mf.load(converted_phimoe)
    mf.save(tmp_path, m)
    assert mf.load(tmp_path).to_dict() | {"updated": ""} == m.to_dict() | {"updated": ""}
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["format"] = "something-else/9"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(mf.MoeprepError, match="unsupported manifest format"):
        mf.load(tmp_path)


def test_cli_manifest_format_1_is_upgraded_as_it_was_measured():
    """The manifest of the first GPU run (format 1): its probe moves into the F16, its smoke keeps its own settings."""
    data = json.loads((Path(__file__).parent / "data" / "manifest-v1-h200.json").read_text())
    m = mf.Manifest.from_dict(data)
    assert m.format == mf.FORMAT and m.probe.expert_count == 16 and m.probe is m.base.probe
    s = m.smoke
    assert (s.settings.flash_attn, s.settings.n_batch, s.settings.threads) == ("off", 512, None)
    assert s.hardware.gpus[0].name.startswith("NVIDIA H200")
    q4 = m.artifact("Q4_K_M")
    placed = m.smoke_result(q4).placements["cpu-moe"]
    assert placed.gpu_bytes()["model"] > 0 and {b.source for b in placed.buffers} >= {"load_tensors"}
    assert m.chain_problems() == []
    assert mf.Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


def test_cli_matrix_groups_are_the_release_groups():
    from moeprep.cli.publish import GROUPS, REVALIDATE
    from moeprep.release.run import GROUPS as RELEASE_GROUPS
    from moeprep.release.run import REVALIDATE as RELEASE_REVALIDATE

    assert list(GROUPS) == list(RELEASE_GROUPS) and REVALIDATE == RELEASE_REVALIDATE
