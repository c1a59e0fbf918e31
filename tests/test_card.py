"""card: rendering from the manifest, the lint, injection safety, and push round trips to the local Hub."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from moeprep.assets import template as shipped_template
from moeprep.card import render as card
from moeprep.card import sections
from moeprep.card.lint import lint
from moeprep.cli import main
from moeprep.records import manifest as mf
from moeprep.release.pipeline import prepare
from tests.llm import generate

DATA = Path(__file__).parent / "data"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


def table(text: str, columns: list[str] = card.COLUMNS) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = lines.index("| " + " | ".join(columns) + " |") + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fresh(converted_phimoe, tmp_path):
    out = tmp_path / "tiny-phimoe-GGUF"
    shutil.copytree(converted_phimoe, out)
    return out


def test_card_acceptance_front_matter_and_file_table(fresh):
    result = run("card", fresh)
    assert result.exit_code == 0, result.output
    text = (fresh / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "some-org/tiny-phimoe" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "text-generation" and meta["language"] == ["en"]
    assert meta["tags"] == ["gguf", "moe", "mixture-of-experts", "cpu-offload", "llama.cpp", "quantized"]
    assert meta["quantized_by"] == "moeprep"
    rows = table(text)
    m = mf.load(fresh)
    assert list(rows) == [a.path for a in m.artifacts]
    for a in m.artifacts:
        assert rows[a.path][3] == a.sha256 == sha256(fresh / a.path)
        assert rows[a.path][4] == sections.ram_cell(a) and rows[a.path][4].endswith("MiB")  # predicted from plans
        assert rows[a.path][5:] == ["not measured"] * 5  # no smoke recorded for this copy
    quality = table(text, card.QUALITY_COLUMNS)
    assert list(quality) == [a.quant for a in m.artifacts]
    for a in m.artifacts:
        assert quality[a.quant][1] == rows[a.path][2] and quality[a.quant][2:] == ["not measured"] * 9
    assert "Speed, VRAM and KLD: not measured" in text
    assert "## Offload plan (predicted, not measured)" in text and "the compute buffer: PREDICTED by llama.cpp" in text
    assert "## Which file fits your GPU (predicted, not measured)" in text
    assert f"commit [`{m.source.commit}`]" in text
    assert lint(fresh / "README.md") == []


def test_card_with_smoke_data_shows_measured_figures_and_plot(smoked, tmp_path):
    src, _ = smoked
    out = tmp_path / "smoked"
    shutil.copytree(src, out)
    assert run("card", out, "--repo-id", "me/tiny-phimoe-GGUF").exit_code == 0
    text = (out / "README.md").read_text()
    m = mf.load(out)
    rows = table(text)
    for a in m.artifacts:
        s = m.smoke.artifacts[a.path]
        tps = s.placements["gpu"].decode_tps
        assert rows[a.path][7] == f"{tps.mean:.1f} ± {tps.sd:.1f}"
        need = s.placements["gpu"].gpu_mib()
        # VRAM is llama.cpp's GPU buffers where there is a GPU, and never estimated where there is none
        assert rows[a.path][5] == (f"{need:.0f}" if need is not None else "not measured")
    assert "![Decode speed and memory per quant and placement](moeprep-smoke.png)" in text
    assert (out / "moeprep-smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "N=3 timed runs after 1 warm-up" in text
    assert ("VRAM: what the placement needs on the GPU" in text) if m.smoke.hardware.gpus else (
        "VRAM: not measured: the smoke ran without a GPU" in text)
    assert "llama.cpp ran with threads" in text and "n_ubatch 512" in text
    ran = "on" if m.smoke.artifacts[m.artifacts[0].path].placements["gpu"].runtime.flash_attn_used else "off"
    assert f"flash attention auto, which llama.cpp resolved to {ran}" in text
    assert "hf download me/tiny-phimoe-GGUF tiny-phimoe-Q4_K_M.gguf" in text
    assert lint(out / "README.md") == []


def test_card_sample_output_is_each_files_recorded_greedy_text(smoked, tmp_path):
    """The generated text in the card is smoke's, file by file, decoded from the tokens it recorded."""
    from llama_cpp import Llama

    src, _ = smoked
    out = tmp_path / "samples"
    shutil.copytree(src, out)
    m = mf.load(out)
    assert run("card", out, "--repo-id", "me/tiny-phimoe-GGUF").exit_code == 0
    text = (out / "README.md").read_text()
    assert "## Sample output" in text and m.smoke.settings.prompt in text
    for a in m.artifacts:
        gpu = m.smoke.artifacts[a.path].placements["gpu"]
        llm = Llama(str(out / a.path), n_ctx=64, vocab_only=True, verbose=False)
        decoded = llm.detokenize(gpu.greedy_tokens).decode("utf-8", errors="replace")
        assert gpu.greedy_text == decoded and decoded.strip()
        shown = card.cell(decoded).replace("[", "\\[")  # escaped for a table cell, as every cell is
        assert f"| `{a.path}` | `gpu` | {shown} |" in text


def test_card_shows_size_and_quality_side_by_side(smoked, tmp_path):
    """One row per file: its size, perplexity beside the F16's, KLD ± standard error and percentiles, same top
    token and RMS Δp, each the manifest's figure; the method line names the text and its chunking."""
    src, _ = smoked
    out = tmp_path / "quality"
    shutil.copytree(src, out)
    assert run("card", out, "--repo-id", "me/tiny-phimoe-GGUF").exit_code == 0
    text = (out / "README.md").read_text()
    m = mf.load(out)
    rows = table(text, card.QUALITY_COLUMNS)
    f16 = m.smoke.artifacts["tiny-phimoe-F16.gguf"].quality
    for a in m.artifacts:
        q = m.smoke.artifacts[a.path].quality
        head = [a.quant, table(text)[a.path][2], f"{q.ppl:.4f} ± {q.ppl_se:.4f}", f"{f16.ppl:.4f} ± {f16.ppl_se:.4f}"]
        if a.quant == "F16":  # the reference: its perplexity, and no comparison with itself
            assert rows[a.quant] == head + ["the reference"] * 7
            continue
        assert rows[a.quant] == head + [
            f"{q.kld_mean:.6f} ± {q.kld_se:.6f}", f"{q.kld_median:.6f}", f"{q.kld_p99:.6f}", f"{q.kld_p999:.6f}",
            f"{q.kld_max:.6f}", f"{100 * q.top1_agreement:.2f} ± {100 * q.top1_se:.2f} %",
            f"{100 * q.rms_dp:.3f} ± {100 * q.rms_dp_se:.3f} %"]
    assert float(rows["Q2_K"][4].split()[0]) > float(rows["Q8_0"][4].split()[0])
    assert (f"Perplexity and KLD vs F16: `eval-en.txt` (sha256 {f16.text_sha256[:12]}…, {f16.text_tokens} tokens), "
            f"2 chunks of 128 tokens, 126 positions scored, n_batch 2048, n_ubatch 512, 16 chunks per decode") in text
    assert "llama-perplexity's --kl-divergence" in text


def test_card_of_a_manifest_with_the_earlier_quality_record(smoked, tmp_path):
    """A format-2 manifest whose quality was 384 positions of one fixed text (no perplexity, no chunks) still
    loads, and its card says what was measured and shows nothing it lacks."""
    src, _ = smoked
    out = tmp_path / "earlier"
    shutil.copytree(src, out)
    data = json.loads((out / "manifest.json").read_text())
    keep = ("reference", "reference_sha256", "text_sha256", "finite", "kld_mean", "kld_median", "kld_p99", "kld_max",
            "top1_agreement")
    for entry in data["smoke"]["artifacts"].values():
        entry["quality"] = {k: entry["quality"][k] for k in keep} | {"kld_sd": 0.001, "positions": 384}
    settings = data["smoke"]["settings"]
    for key in ("quality_text", "quality_ctx", "quality_chunks"):
        del settings[key]
    settings["quality_tokens"] = 384
    (out / "manifest.json").write_text(json.dumps(data))
    m = mf.load(out)
    q = m.smoke.artifacts["tiny-phimoe-Q4_K_M.gguf"].quality
    assert not q.chunked and q.positions == 384 and q.ppl is None and q.kld_mean == data["smoke"]["artifacts"][
        "tiny-phimoe-Q4_K_M.gguf"]["quality"]["kld_mean"]
    assert run("card", out, "--repo-id", "me/tiny-phimoe-GGUF").exit_code == 0
    text = (out / "README.md").read_text()
    row = table(text, card.QUALITY_COLUMNS)["Q4_K_M"]
    assert row[2:5] == ["not measured", "not measured", f"{q.kld_mean:.6f}"] and row[7] == "not measured"
    assert "over 384 positions of a fixed text" in text and "perplexity was not measured" in text
    assert lint(out / "README.md") == []


def test_card_results_of_other_bytes_are_not_shown(smoked, tmp_path):
    src, _ = smoked
    out = tmp_path / "changed"
    shutil.copytree(src, out)
    m = mf.load(out)
    m.smoke.artifacts["tiny-phimoe-Q8_0.gguf"].sha256 = "0" * 64  # measured some other file
    mf.save(out, m)
    run("card", out)
    assert table((out / "README.md").read_text())["tiny-phimoe-Q8_0.gguf"][6] == "not measured"


def test_card_vram_is_the_placements_gpu_buffers_with_the_overhead_stated_once(fresh):
    """A GPU smoke, recorded: the H200 run's load log for the buffers, NVML readings for the process."""
    from moeprep.hardware import hardware
    from moeprep.records.results import (
        FileResult,
        GpuInfo,
        PlacementResult,
        SmokeReport,
        SmokeSettings,
        Statistic,
        Tokens,
        Vram,
    )
    from moeprep.stages.smoke import METHODS, parse_log

    m = mf.load(fresh)
    a = m.artifact("Q4_K_M")
    log = parse_log((DATA / "cuda" / "log-phimoe-gpu-Q4_K_M-gpu.txt").read_text())
    one = Statistic.of([1.0])
    vram = Vram(METHODS["vram"], Statistic.of([615.0]), Statistic.of([1500.0]), Statistic.of([1560.0]),
                Statistic.of([1380.0]), Statistic.of([1400.0]))
    placed = PlacementResult("gpu", [], [], True, log.buffers, 1, 1, one, one, one, one, one, Tokens(1, [1]), [1], vram)
    hw = hardware(None)
    hw.gpus = [GpuInfo(0, "NVIDIA H200", 143771.0, 615.0, "580.159.04", "13.0")]
    m.smoke = SmokeReport("2026-11-26T00:00:00+00:00", "CUDA", "ok", hw, m.tools, SmokeSettings(), METHODS,
                          {a.path: FileResult(a.path, "Q4_K_M", a.sha256, {"gpu": placed})})
    mf.save(fresh, m)
    assert run("card", fresh).exit_code == 0
    text = (fresh / "README.md").read_text()
    buffers = {(b.device, b.kind): b.mib for b in log.buffers}
    need = buffers[("CUDA0", "model")] + buffers[("CUDA0", "KV")] + buffers[("CUDA0", "compute")]
    assert table(text)[a.path][5] == f"{need:.0f}" and table(text)[a.path][6] == "not measured"
    assert f"add {1400 - need:.0f} MiB on top (NVML's per-process peak minus those buffers, mean over 1 loads)" in text
    assert lint(fresh / "README.md") == []


def test_card_names_mixes_and_custom_tensor_types_with_their_rules(fresh):
    f16 = fresh / "tiny-phimoe-F16.gguf"
    assert run("quantize", f16, "--mix", "moe-q4").exit_code == 0
    assert run("quantize", f16, "--quant", "Q5_K_M", "--tensor-type", "attn_.*=Q8_0").exit_code == 0
    assert run("card", fresh).exit_code == 0
    text = (fresh / "README.md").read_text()
    rows = table(text)
    assert rows["tiny-phimoe-moe-q4.gguf"][1] == "moe-q4"
    assert rows["tiny-phimoe-Q5_K_M.gguf"][1] == "Q5_K_M (custom tensor types)"
    assert "## Quant mixes" in text
    assert "- `moe-q4`: Q4_K_M with these tensor types, the first matching rule wins: `ffn_down_exps=Q5_K`" in text
    assert "- `Q5_K_M`: Q5_K_M with these tensor types, the first matching rule wins: `attn_.*=Q8_0`." in text
    assert lint(fresh / "README.md") == []


@pytest.fixture
def good_card(fresh):
    run("card", fresh)
    return fresh / "README.md"


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


@pytest.mark.parametrize("defect, expect", [
    ("merge", "merge-conflict marker"),
    ("unrendered", "unrendered template syntax"),
    ("empty_cell", "empty table cell"),
    ("figure", "Size is"),
    ("quality", "table 'Quality against the F16', row 'Q8_0': PPL is '5.1234', the manifest says 'not measured'"),
    ("quality_row", "table 'Quality against the F16' lists F16, Q8_0, Q4_K_M; the manifest gives F16, Q8_0, Q4_K_M, Q2_K"),
    ("sha", "does not have the sha256 the card lists"),
    ("missing_file", "does not exist beside the card"),
    ("relative_link", "relative link '../tiny-phimoe-Q2_K-GGUF'"),
    ("yaml", "front matter: not valid YAML"),
    ("key", "front matter: missing base_model"),
    ("placeholder", "placeholder (add)"),
])
def test_card_lint_catches(defect, expect, good_card):
    out = good_card.parent
    if defect == "merge":
        edit(good_card, "## Method", "<<<<<<< HEAD\n## Method\n=======\n## Methods\n>>>>>>> main")
    elif defect == "unrendered":
        edit(good_card, "## Method", "## Method {{ method }}")
    elif defect == "empty_cell":
        edit(good_card, "| Layers | 2 (0 leading dense) |", "| Layers |  |")
    elif defect == "figure":
        edit(good_card, "| Q8_0 | 13.48 MiB |", "| Q8_0 | 13.50 MiB |")
    elif defect == "quality":
        edit(good_card, "| Q8_0 | 13.48 MiB | not measured |", "| Q8_0 | 13.48 MiB | 5.1234 |")
    elif defect == "quality_row":
        text = good_card.read_text()
        row = next(line for line in text.splitlines() if line.startswith("| Q2_K | "))
        edit(good_card, row + "\n", "")
    elif defect == "sha":
        with open(out / "tiny-phimoe-Q2_K.gguf", "r+b") as f:
            f.seek(1000)
            f.write(b"\x00\x01\x02")
    elif defect == "missing_file":
        (out / "tiny-phimoe-Q2_K.gguf").unlink()
    elif defect == "relative_link":
        edit(good_card, "## Provenance", "See [Q2_K](../tiny-phimoe-Q2_K-GGUF).\n\n## Provenance")
    elif defect == "yaml":
        edit(good_card, "base_model_relation: quantized", "base_model_relation: [quantized")
    elif defect == "key":
        edit(good_card, "base_model: some-org/tiny-phimoe\n", "")
    elif defect == "placeholder":
        edit(good_card, "## Provenance", "SHA256: (add)\n\n## Provenance")
    problems = lint(good_card)
    assert any(expect in p for p in problems), problems
    result = run("card", out, "--check", good_card)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: card lint failed: ")


def test_card_lint_rejects_the_published_cards(tmp_path):
    copy = tmp_path / "README.md"
    shutil.copy(DATA / "card-phi-3.5-moe-q8_0.md", copy)
    result = run("card", "--check", copy)
    assert result.exit_code == 1
    assert "line 83: merge-conflict marker '<<<<<<<'" in result.stdout
    assert "relative link '../phi-3.5-moe-q4-k-m-cpu-offload-gguf'" in result.stdout
    assert "no manifest.json beside the card" in result.stdout
    shutil.copy(DATA / "card-phi-3.5-moe-f16.md", copy)
    assert any("base_model_relation" in p for p in lint(copy))


def test_card_source_text_is_data_not_template(checkpoints, tmp_path):
    src = tmp_path / "evil"
    shutil.copytree(checkpoints["mixtral"], src)
    (src / "README.md").write_text(
        "---\nlicense: '{{ 7*7 }}'\nlanguage:\n- en\n---\n\n# evil\n\n"
        "Ignore this {{ 7*7 }} and {% for x in range(3) %}x{% endfor %} | pipe.\n")
    out = tmp_path / "out"
    prepare(str(src), out=out, quants=["Q8_0"])
    result = run("card", out, "--base-model", "some-org/evil")
    assert result.exit_code == 0, result.output
    text = (out / "README.md").read_text()
    assert "49" not in text and "xxx" not in text
    assert "&#123;&#123; 7*7 &#125;&#125;" in text and "&#123;% for x in range(3) %&#125;" in text
    meta = front_matter(text)
    assert meta["license"] == "other" and meta["license_name"] == "unknown"
    assert "unknown: the source states no license moeprep can read" in text
    assert lint(out / "README.md") == []


def test_card_sandbox_refuses_unsafe_templates(fresh, tmp_path):
    evil = tmp_path / "evil.md.j2"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    result = run("--debug", "card", fresh, "--template", evil)
    assert result.exit_code != 0
    assert "SecurityError" in type(result.exception).__name__ or "unsafe" in str(result.exception)


def test_card_local_source_needs_a_base_model(converted_local):
    result = run("card", converted_local["llama"])
    assert result.exit_code == 1
    assert "pass --base-model ORG/NAME" in result.stderr


# --- push ------------------------------------------------------------------------------------------

def downloaded(repo_id: str, tmp_path: Path) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_dir=tmp_path / repo_id.replace("/", "__")))


def test_push_round_trip_byte_for_byte(hub, fresh, write_token, tmp_path):
    result = run("card", fresh, "--push", "--repo-id", "me/tiny-phimoe-GGUF")
    assert result.exit_code == 0, result.output
    assert write_token not in result.output
    local = downloaded("me/tiny-phimoe-GGUF", tmp_path)
    m = mf.load(fresh)
    for a in m.artifacts:
        assert sha256(local / a.path) == a.sha256
    assert (local / "README.md").read_text() == (fresh / "README.md").read_text()
    assert json.loads((local / "manifest.json").read_text())["artifacts"] == json.loads(
        (fresh / "manifest.json").read_text())["artifacts"]
    assert [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]

    # a second push finds everything on the Hub and uploads nothing
    hub.requests.clear()
    again = run("card", fresh, "--push", "--repo-id", "me/tiny-phimoe-GGUF", "--json")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert {i["action"] for r in data["repos"] for i in r["items"]} == {"skip (same sha256 on the Hub)"}
    assert not [r for r in hub.requests if r[0] in ("PUT",) or "/commit/" in r[1] or "/preupload/" in r[1]]


def test_push_dry_run_uploads_nothing(hub, fresh, write_token):
    hub.requests.clear()
    result = run("card", fresh, "--push", "--repo-id", "me/dry-run-GGUF", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"{hub.url}/me/dry-run-GGUF" in result.stdout
    for name in ("tiny-phimoe-F16.gguf", "tiny-phimoe-Q2_K.gguf", "README.md", "manifest.json"):
        assert f"-> me/dry-run-GGUF/{name}" in result.stdout
    assert "dry run: nothing uploaded" in result.stdout
    assert not [r for r in hub.requests if r[0] in ("POST", "PUT")]
    assert "me/dry-run-GGUF" not in hub.repos


def test_push_splits_large_files_into_shards_that_load(hub, fresh, write_token, tmp_path):
    result = run("card", fresh, "--push", "--repo-id", "me/tiny-split-GGUF", "--max-shard", "5MiB")
    assert result.exit_code == 0, result.output
    m = mf.load(fresh)
    f16 = m.artifact("F16")
    assert [s.path for s in f16.shards] == [f"F16/tiny-phimoe-F16-0000{i}-of-00006.gguf" for i in range(1, 7)]
    assert not m.artifact("Q2_K").shards  # under the limit: uploaded whole
    text = (fresh / "README.md").read_text()
    for s in f16.shards:
        assert f"| {s.path} | F16 (" in text
    local = downloaded("me/tiny-split-GGUF", tmp_path)
    for s in f16.shards:
        assert sha256(local / s.path) == s.sha256
    assert generate(local / f16.shards[0].path) == generate(fresh / f16.path)


def test_push_per_quant_layout_links_siblings(hub, fresh, write_token, tmp_path):
    result = run("card", fresh, "--push", "--repo-id", "me/tiny-pq", "--layout", "per-quant")
    assert result.exit_code == 0, result.output
    local = downloaded("me/tiny-pq-Q4_K_M", tmp_path)
    text = (local / "README.md").read_text()
    assert list(table(text)) == ["tiny-phimoe-Q4_K_M.gguf"]
    for q in ("F16", "Q8_0", "Q2_K"):
        assert f"- [{q}]({hub.url}/me/tiny-pq-{q})" in text
        assert f"me/tiny-pq-{q}" in hub.repos


def test_push_without_token(hub, fresh):
    result = run("card", fresh, "--push", "--repo-id", "me/x-GGUF")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: no Hugging Face token is set (set HF_TOKEN or run `hf auth login` with a write token)")


def test_push_without_write_access(hub, fresh, granted_token):
    result = run("card", fresh, "--push", "--repo-id", "other-org/x-GGUF")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: no write access to other-org/x-GGUF with this token")
    assert granted_token not in result.output


def test_push_network_failure_mid_upload_then_rerun_continues(hub, fresh, write_token, monkeypatch):
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)  # skip the client's backoff
    hub.puts_left = 1
    try:
        result = run("card", fresh, "--push", "--repo-id", "me/flaky-GGUF")
    finally:
        hub.puts_left = None
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "Error: the upload to me/flaky-GGUF failed midway (")
    assert "run the same command again" in result.stderr
    sent = len(hub.lfs.get("me/flaky-GGUF", {}))
    hub.requests.clear()
    again = run("card", fresh, "--push", "--repo-id", "me/flaky-GGUF")
    assert again.exit_code == 0, again.output
    puts = [r for r in hub.requests if r[0] == "PUT"]
    assert sent >= 1 and len(puts) == 4 - sent, "objects uploaded before the failure were sent again"
    m = mf.load(fresh)
    assert {p: hub.repos["me/flaky-GGUF"].sha256(p) for p in (a.path for a in m.artifacts)} == {
        a.path: a.sha256 for a in m.artifacts}


def test_push_stops_when_the_lint_fails(hub, fresh, write_token, tmp_path):
    template = tmp_path / "bad.md.j2"
    template.write_text(shipped_template().read_text().replace("## Method", "<<<<<<< HEAD\n## Method"))
    hub.requests.clear()
    result = run("card", fresh, "--push", "--repo-id", "me/linted-GGUF", "--template", template)
    assert result.exit_code == 1
    assert "Error: card lint failed for README.md (1 problem; first: line" in result.stderr
    assert not [r for r in hub.requests if r[0] in ("PUT",) or "/commit/" in r[1]]


def test_push_manifest_without_artifacts(hub, fresh, write_token):
    m = mf.load(fresh)
    m.artifacts = []
    mf.save(fresh, m)
    result = run("card", fresh, "--push", "--repo-id", "me/empty-GGUF")
    assert result.exit_code == 1
    assert "lists no artifacts" in result.stderr


def _hide_and_fake(text: str) -> str:
    """The issue's attack: the real file table inside an HTML comment (invisible on the Hub) and a fake one below,
    whose header differs by one space."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("| File | Quant |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    real = "".join(lines[start:end])
    fake = real.replace("| File | Quant |", "| File | Quant  |").replace(" not measured |", " 9999.0 |")
    return "".join(lines[:start]) + "<!--\n" + real + "-->\n\n" + fake + "".join(lines[end:])


@pytest.mark.parametrize("case, change, expect", [
    ("hidden-table", _hide_and_fake, "HTML (a comment or raw HTML)"),
    ("front-matter-license", lambda t: t.replace("license: mit", "license: apache-2.0", 1),
     "front matter: license is 'apache-2.0', the manifest gives 'mit'"),
    ("front-matter-base-model", lambda t: t.replace("base_model: some-org/tiny-phimoe", "base_model: other/model", 1),
     "front matter: base_model is 'other/model'"),
    ("front-matter-extra", lambda t: t.replace("quantized_by: moeprep\n", "quantized_by: moeprep\nthumbnail: x.png\n", 1),
     "front matter: 'thumbnail' is a field the manifest does not give"),
    ("model-table", lambda t: t.replace("| Experts | 16 |", "| Experts | 64 |"),
     "table 'The model', row 'Experts': Value is '64', the manifest says '16'"),
    ("duplicated-table", lambda t: t.replace("## Method", t[t.index("| Property | Value |"):t.index("## Files")] + "## Method"),
     "a table under 'What is in each file' headed 'Property | Value', which the manifest does not give"),
    ("method-line", lambda t: t.replace("Sizes and SHA256: of the files", "Sizes and SHA256: of some files"),
     "the list item 'Sizes and SHA256: of some files"),
    ("provenance", lambda t: t.replace("Importance matrix: none was used", "Importance matrix: a big one was used"),
     "differs from what the manifest gives"),
    ("tier-cell", lambda t: t.replace("| 8 GiB | all on GPU: GPU ", "| 8 GiB | `--cpu-moe`: GPU ", 1),
     "table 'Which file fits your GPU (predicted, not measured)', row '8 GiB'"),
    ("plan-cell", lambda t: t.replace("| `gpu` |", "| `gpu` (fast) |", 1), "table 'Offload plan (predicted, not measured)'"),
    ("usage-code", lambda t: t.replace("--cpu-moe -p", "--cpu-moe -ngl 0 -p", 1), "a code block (sh)"),
    ("raw-html", lambda t: t.replace("## Method", '<img src="https://example.com/x.png">\n\n## Method'),
     "HTML (a comment or raw HTML)"),
    ("inline-html", lambda t: t.replace("## The model", "## The model <span>!</span>"), "inline HTML"),
    ("removed-section", lambda t: t[:t.index("## Provenance")], "is missing"),
])
def test_card_lint_fails_any_change_a_reader_would_see(case, change, expect, good_card):
    """Issue 18: the lint renders the card again from the manifest and compares what a reader sees."""
    good_card.write_text(change(good_card.read_text()))
    problems = lint(good_card)
    assert any(expect in p for p in problems), problems
    result = run("card", good_card.parent, "--check", good_card)
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_card_lint_fails_a_card_whose_manifest_was_edited(good_card):
    """A figure changed in the manifest after the card was rendered: the card no longer is what the manifest gives."""
    data = json.loads((good_card.parent / "manifest.json").read_text())
    base = next(a for a in data["artifacts"] if a["stage"] == "convert")
    base["probe"]["expert_count"] = 99
    (good_card.parent / "manifest.json").write_text(json.dumps(data))
    assert any("row 'Experts'" in p or "Experts" in p for p in lint(good_card))


def test_card_lint_passes_the_card_as_rendered_and_after_a_round_trip(good_card):
    assert lint(good_card) == []
    text = good_card.read_text()
    good_card.write_text(text.replace("\n## ", "\n\n## "))  # blank lines a reader does not see
    assert lint(good_card) == []
