"""The card a reader can act on (issue 20): which file to choose for a GPU, how to fetch it, how to prompt it, what
is in each file, and the commands that make each file again byte for byte."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeprep.card import sections
from moeprep.card.lint import lint
from moeprep.cli import main
from moeprep.records import manifest as mf
from moeprep.records.manifest import Artifact, ArtifactSettings, Shard
from tests.test_error_catalogue import linked_copy

REPO = "me/tiny-phimoe-GGUF"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def card(smoked, tmp_path) -> Path:
    out, result = smoked
    assert result.exit_code == 0, result.output
    d = linked_copy(out, tmp_path / "tiny-phimoe-GGUF")
    written = run("card", d, "--repo-id", REPO)
    assert written.exit_code == 0, written.output
    return d / "README.md"


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else None]


def test_the_card_answers_which_file_for_each_gpu_with_two_commands(card):
    m = mf.load(card.parent)
    text = card.read_text()
    assert text.index("## Which file should I choose") < text.index("## The model")  # the first screen
    choose = section(text, "Which file should I choose")
    rows = [line for line in choose.splitlines() if line.startswith("| ") and "GiB" in line]
    assert rows and all("all on GPU" in row or "--n-cpu-moe" in row or "--cpu-moe" in row for row in rows)
    # the tiny model fits every tier whole: the choice is the best quality there is, the F16 (the reference)
    assert "F16, all on GPU (the reference" in rows[0]
    blocks = re.findall(r"```sh\n(.*?)```", choose, re.DOTALL)
    first = blocks[0].strip().splitlines()
    assert len(first) == 2
    assert shlex.split(first[0]) == ["hf", "download", REPO, "--include", "tiny-phimoe-F16.gguf", "--local-dir", "."]
    assert shlex.split(first[1])[:3] == ["llama-server", "-m", "tiny-phimoe-F16.gguf"]
    small = min(m.artifacts, key=lambda a: sections.ram_cpu_only(a) or 0)
    assert f"from {small.quant} (" in choose  # the CPU-only sentence names RAM from the smallest file up


def test_the_choice_prefers_least_offload_then_lowest_kld(card):
    """Where two files fit whole, the lower mean KLD wins; the F16 (KLD 0) wins everywhere it fits."""
    m = mf.load(card.parent)
    klds = {a.quant: sections.kld_of(m, a) for a in m.artifacts}
    assert klds["F16"] == 0.0 and all(v > 0 for q, v in klds.items() if q != "F16")
    assert sorted(klds, key=lambda q: klds[q]) == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]


def test_the_fetch_section_names_the_hf_cli_and_llama_server_forms(card):
    fetch = section(card.read_text(), "How to fetch a file")
    for quant in ("F16", "Q8_0", "Q4_K_M", "Q2_K"):
        assert f"`hf download {REPO} --include tiny-phimoe-{quant}.gguf --local-dir .`" in fetch
        assert f"`llama-server -hf {REPO}:{quant}`" in fetch


def test_the_hf_cli_takes_the_download_command_as_the_card_writes_it():
    """`hf download REPO --include FILE --local-dir .`, checked against the installed huggingface_hub's CLI."""
    hf = shutil.which("hf", path=str(Path(__import__("sys").executable).parent))
    assert hf, "huggingface_hub's `hf` CLI is not installed"
    usage = subprocess.run([hf, "download", "--help"], capture_output=True, text=True).stdout
    assert "REPO_ID" in usage and "--include" in usage and "--local-dir" in usage


def test_an_hf_tag_is_given_only_where_llama_cpp_resolves_it_to_the_file():
    def artifact(quant: str, path: str, shards: int = 0) -> Artifact:
        a = Artifact(path, quant, 1, "0" * 64, "quantize", "0" * 64, ArtifactSettings(ftype=quant))
        a.shards = [Shard(f"{quant}/{path[:-5]}-{i:05d}-of-{shards:05d}.gguf", 1, "0" * 64, "0" * 64, 1)
                    for i in range(1, shards + 1)]
        return a

    q4 = artifact("Q4_K_M", "m-Q4_K_M.gguf")
    mix = artifact("moe-q4", "m-moe-q4.gguf")
    split = artifact("Q8_0", "m-Q8_0.gguf", shards=3)
    everything = [f.path for a in (q4, mix, split) for f in a.upload_files()] + ["imatrix.gguf"]
    assert sections.hf_tag(q4, everything) == "Q4_K_M"
    assert sections.hf_tag(mix, everything) == "moe-q4"
    assert sections.hf_tag(split, everything) == "Q8_0"  # the first shard; llama.cpp finds the rest
    clash = artifact("Q4_K_M", "m-Q4_K_M.gguf")
    assert sections.hf_tag(clash, everything + ["other-Q4_K_M.gguf"]) is None  # two matches: name the file


def test_the_chat_template_is_shown_as_data_in_a_fence_longer_than_any_in_it(checkpoints, tmp_path):
    """The tiny checkpoints carry Phi-3.5-MoE's template; one with backticks, braces and a closing tag shows as
    text: in a code fence longer than its longest run of backticks, inside a collapsed block."""
    import json

    from moeprep.release.pipeline import prepare

    src = tmp_path / "tiny-phimoe"
    shutil.copytree(checkpoints["phimoe"], src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}````</details>\n<script>x</script>{% for m in messages %}{{ m }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    prepare(str(src), out=out, quants=["Q8_0"])
    assert run("card", out, "--repo-id", REPO, "--base-model", "org/tiny-phimoe").exit_code == 0
    text = (out / "README.md").read_text()
    prompt = section(text, "How to prompt it")
    assert "<details>\n<summary>Chat template</summary>\n\n`````jinja\n{{ bos_token }}````</details>" in prompt
    assert "| BOS | `<s>` |" in prompt and "| EOS | `</s>` |" in prompt
    assert lint(out / "README.md") == []


def test_a_model_without_a_chat_template_says_so(card):
    # the smoked fixture's checkpoint carries one: take it away from the record and render again
    m = mf.load(card.parent)
    for a in m.artifacts:
        a.probe.chat.template = None
    mf.save(card.parent, m)
    assert run("card", card.parent, "--repo-id", REPO).exit_code == 0
    assert "The GGUFs carry no chat template" in section(card.read_text(), "How to prompt it")


def test_each_files_tensor_types_are_in_the_card_and_the_manifest(card):
    m = mf.load(card.parent)
    q4 = m.artifact("Q4_K_M")
    assert q4.probe.types["experts"] and q4.probe.types["attention"]
    contents = section(card.read_text(), "What is in each file")
    row = next(line for line in contents.splitlines() if line.startswith("| Q4_K_M |"))
    expected = ", ".join(f"{t} ×{n}" for t, n in sorted(q4.probe.types["experts"].items(), key=lambda kv: -kv[1]))
    assert row.split(" | ")[1] == expected


def test_requantizing_from_the_cards_command_reproduces_the_sha256(card, tmp_path, monkeypatch):
    m = mf.load(card.parent)
    text = card.read_text()
    commands = [line for line in section(text, "Provenance").splitlines() if line.startswith("moeprep quantize")]
    line = next(c for c in commands if "--quant Q4_K_M" in c)
    args = shlex.split(line)[1:]
    work = tmp_path / "again"
    (work / "tiny-phimoe-GGUF").mkdir(parents=True)
    shutil.copy(card.parent / m.base.path, work / "tiny-phimoe-GGUF" / m.base.path)  # only the F16
    monkeypatch.chdir(work)  # the command names paths as the card's reader has them, from where they ran convert
    result = run(*args)
    assert result.exit_code == 0, result.output
    again = work / "tiny-phimoe-GGUF" / "tiny-phimoe-Q4_K_M.gguf"
    digest = subprocess.run(["sha256sum", str(again)], capture_output=True, text=True, check=True).stdout[:64]
    assert digest == m.artifact("Q4_K_M").sha256


@pytest.mark.parametrize("title, old, new", [
    ("Which file should I choose", "all on GPU (the reference", "all on GPU (KLD 0.0001"),
    ("Which file should I choose", "--include tiny-phimoe-F16.gguf", "--include tiny-phimoe-Q2_K.gguf"),
    ("How to fetch a file", f"-hf {REPO}:Q4_K_M", f"-hf {REPO}:Q2_K"),
    ("How to prompt it", "| EOS | `</s>` |", "| EOS | `<|end|>` |"),
    ("What is in each file", "| Q4_K_M | Q4_K", "| Q4_K_M | Q8_0"),
    ("Files", "| tiny-phimoe-Q4_K_M.gguf | Q4_K_M | ", "| tiny-phimoe-Q4_K_M.gguf | Q4_K_M | 1 "),
    ("Provenance", "--quant Q4_K_M", "--quant Q4_K_S"),
])
def test_the_lint_fails_a_card_with_one_cell_of_the_new_sections_edited(card, title, old, new):
    text = card.read_text()
    part = section(text, title)
    assert old in part, part
    card.write_text(text.replace(part, part.replace(old, new, 1)))
    assert lint(card) != []
