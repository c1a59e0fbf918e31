"""The card's reader-facing sections, as data for the template: which file to choose for a GPU, how to fetch it,
how to prompt it, what is in each file, and how to make it again. Every value is computed from the manifest (the
recorded plans, probes and measurements); the sentences around them are the template's."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from moeprep.predict.tiers import TierTable, command, gib
from moeprep.quants import MIXES
from moeprep.records.manifest import Artifact, Manifest
from moeprep.records.results import FlashAttn

CHOICE_CONTEXTS = (8192, 32768)  # "a typical context": the two the choice is made for, where the file reaches them
RAM_CTX = 4096  # the context the CPU-only RAM figure is for
MAX_COMMANDS = 8  # distinct choices given a command block; the table names the rest
CLASSES = ("experts", "shared experts", "routers", "attention", "output", "embedding", "norms and dense")


def kld_of(m: Manifest, a: Artifact) -> float | None:
    """The file's measured mean KLD against the F16: 0 for the F16 itself, None where not measured."""
    result = m.smoke_result(a)
    q = result.quality if result else None
    if q is None or not q.finite:
        return None
    return 0.0 if q.reference_sha256 == a.sha256 else q.kld_mean


def choose(m: Manifest, table: TierTable, repo_id: str | None) -> dict | None:
    """For each GPU size and typical context, among the files that fit, those with the least expert offload, and of
    them the one with the lowest measured mean KLD (a file whose quality was not measured comes last). Consecutive
    sizes with the same choices share a row."""
    contexts = [c for c in CHOICE_CONTEXTS if c in table.contexts] or table.contexts[-1:]
    if not contexts:
        return None
    by_path = {a.path: a for a in m.artifacts}
    rows: list[dict] = []
    picks: dict[tuple, dict] = {}
    for size in sorted({t.gib for t in table.tiers}):
        cells = []
        for ctx in contexts:
            tier = next(t for t in table.tiers if t.gib == size and t.ctx == ctx)
            fits = [(c, c.placement) for c in tier.cells if c.placement is not None]
            if not fits:
                cells.append("nothing fits")
                continue

            def rank(fit):
                c, placement = fit
                kld = kld_of(m, by_path[c.file]) if c.file in by_path else None
                return (placement.order, kld is None, kld or 0.0, c.gpu_bytes or 0)

            best, placement = min(fits, key=rank)
            kld = kld_of(m, by_path[best.file]) if best.file in by_path else None
            flags = " ".join(placement.flags())
            where = f"`{flags}`" if flags else "all on GPU"
            quality = ("the reference" if kld == 0.0 else f"mean KLD {kld:.4f}" if kld is not None
                       else "quality not measured")
            cells.append(f"{best.quant}, {where} ({quality}; GPU {gib(best.gpu_bytes or 0)})")
            key = (best.file, placement, ctx)
            pick = picks.setdefault(key, {"file": best.file, "quant": best.quant, "ctx": ctx, "tiers": [],
                                          "commands": _run_commands(repo_id, by_path.get(best.file), best.file,
                                                                    placement, ctx, table.flash_attn)})
            pick["tiers"].append(size)
        if rows and rows[-1]["cells"] == cells:
            rows[-1]["sizes"].append(size)
        else:
            rows.append({"sizes": [size], "cells": cells})
    for row in rows:
        row["gpu"] = _span(row["sizes"])
    commands = [dict(p, gpu=_span(p["tiers"])) for p in picks.values()][:MAX_COMMANDS]
    return {"contexts": contexts, "rows": rows, "commands": commands, "more": max(0, len(picks) - MAX_COMMANDS),
            "cpu": cpu_only(m)}


def _span(sizes: list[float]) -> str:
    return f"{sizes[0]:g} GiB" if len(sizes) == 1 else f"{sizes[0]:g}-{sizes[-1]:g} GiB"


def _run_commands(repo_id: str | None, a: Artifact | None, file: str, placement, ctx: int,
                  flash_attn: FlashAttn) -> list[str]:
    """The two commands from nothing to a running server: fetch the file, start llama-server with the choice."""
    lines = [download_command(repo_id, a)] if repo_id and a is not None else []
    return lines + [command(a.upload_files()[0].path if a else file, placement, ctx, flash_attn)]


def ram_cpu_only(a: Artifact) -> int | None:
    """Bytes of system memory the file needs with no GPU, predicted: its tensors, and the KV cache and compute
    buffer llama.cpp's allocator sized on the CPU backend at RAM_CTX tokens (flash attention as the CPU runs it)."""
    rec = next((r for r in a.plans if r.ctx == RAM_CTX and r.cache_type == "f16"), None)
    if rec is None or a.probe is None:
        return None
    cpu = [s for s in rec.simulations if s.placement is None and s.device == "CPU"]
    sim = next((s for s in cpu if s.flash_attn == FlashAttn.ON), cpu[0] if cpu else None)
    return a.probe.bytes.get("total", a.size) + sim.kv + sim.compute if sim else None


def cpu_only(m: Manifest) -> dict | None:
    sized = [(a, ram) for a in m.artifacts if (ram := ram_cpu_only(a)) is not None]
    if not sized:
        return None
    small, large = min(sized, key=lambda x: x[1]), max(sized, key=lambda x: x[1])
    return {"ctx": RAM_CTX, "smallest": small[0].quant, "smallest_ram": gib(small[1]), "largest": large[0].quant,
            "largest_ram": gib(large[1])}


def download_command(repo_id: str, a: Artifact) -> str:
    """`hf download` as huggingface_hub 2.4's CLI takes it: one file, or a shard folder."""
    pattern = f"{a.quant}/*" if a.shards else a.path
    return shlex.join(["hf", "download", repo_id, "--include", pattern, "--local-dir", "."])


def hf_tag(a: Artifact, everything: list[str]) -> str | None:
    """The `:TAG` llama-server's -hf resolves to exactly this file, or None. llama.cpp (common/download.cpp,
    find_best_model) takes the first model file whose path matches `TAG[.-]` (any case), skipping later shards
    and imatrix files; the tag works only where this file is the one match."""
    first = a.upload_files()[0].path
    pattern = re.compile(re.escape(a.quant) + r"[.-]", re.IGNORECASE)
    matches = [p for p in everything if p.endswith(".gguf") and "imatrix" not in p.rsplit("/", 1)[-1]
               and pattern.search(p) and not re.search(r"-0000[2-9]-of-|-000[1-9]\d-of-", p)]
    return a.quant if matches == [first] else None


def fetch(m: Manifest, artifacts: list[Artifact], repo_id: str | None) -> dict | None:
    if repo_id is None:
        return None
    everything = [f.path for a in m.artifacts for f in a.upload_files()]
    rows = []
    for a in artifacts:
        tag = hf_tag(a, everything)
        server = (f"llama-server -hf {repo_id}:{tag}" if tag
                  else shlex.join(["llama-server", "-hf", repo_id, "--hf-file", a.upload_files()[0].path]))
        rows.append([a.quant, f"`{download_command(repo_id, a)}`", f"`{server}`"])
    shards = [a for a in artifacts if a.shards]
    return {"rows": rows, "shards": [{"quant": a.quant, "count": len(a.shards), "first": a.shards[0].path}
                                     for a in shards]}


def chat(m: Manifest) -> dict:
    """The chat template and special tokens the GGUFs carry (the converted file's, which every quant copies)."""
    base = m.base
    c = base.probe.chat if base and base.probe else None
    if c is None:
        return {"recorded": False}
    template = c.template or ""
    longest = max((len(run) for run in re.findall(r"`+", template)), default=0)
    return {"recorded": True, "template": template or None, "truncated": c.template_truncated,
            "chars": len(template), "fence": "`" * max(3, longest + 1),
            "tokens": [[name, f"`{_token(text)}`" if text else "none"]
                       for name, text in (("BOS", c.bos), ("EOS", c.eos), ("EOT", c.eot))],
            "add_bos": c.add_bos}


def _token(text: str) -> str:
    return text.replace("`", "'").replace("|", "\\|").replace("\n", "\\n")


def contents(artifacts: list[Artifact]) -> dict:
    """Per file, the ggml types of each tensor class, as the probe counted them (the manifest keeps them as
    `probe.types`, machine-readable)."""
    rows = []
    for a in artifacts:
        types = a.probe.types if a.probe else {}
        row = [a.quant]
        for name in CLASSES:
            counts = types.get(name, {})
            row.append(", ".join(f"{t} ×{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none")
        rows.append(row)
    return {"columns": ["File", *CLASSES], "rows": rows}


def reproduce(m: Manifest, artifacts: list[Artifact]) -> dict:
    """The commands that make each file again byte for byte from the recorded source commit, with the llama.cpp
    build the manifest names: convert for the converted file, quantize for the rest, with the rules and the
    importance matrix each was made with."""
    base = m.base
    src = m.source
    out = f"{m.model}-GGUF"
    lines = []
    if base is not None:
        source = src.id if src.kind == "hub" else f"./{m.model}"  # the directory's name is the model's
        convert = ["moeprep", "convert", source, "--out", out, "--outtype", base.settings.outtype or "f16",
                   "--quant", base.quant]
        if src.kind == "hub" and src.commit:
            convert[4:4] = ["--revision", src.commit]
        lines.append({"file": base.path, "command": shlex.join(convert)})
    for a in artifacts:
        if a.stage != "quantize" or base is None:
            continue
        s = a.settings
        args = ["moeprep", "quantize", f"{out}/{base.path}"]
        if s.mix and s.mix in MIXES:
            args += ["--mix", s.mix]
            own = MIXES[s.mix].rules
            rules = s.tensor_types[: len(s.tensor_types) - len(own)]  # the user's come first, the mix's after
        else:
            args += ["--quant", a.quant]
            rules = s.tensor_types
        for rule in rules:
            args += ["--tensor-type", rule]
        if s.imatrix:
            args += ["--imatrix", f"{out}/{m.imatrix.path if m.imatrix else 'imatrix.gguf'}"]
        lines.append({"file": a.path, "command": shlex.join(args)})
    return {"lines": lines, "llama_cpp": m.tools.get("llama_cpp_commit"),
            "local": f"./{m.model}" if src.kind != "hub" else None}


def ram_cell(a: Artifact) -> str:
    ram = ram_cpu_only(a)
    return gib(ram) if ram is not None else "not predicted"


def longest(table: TierTable) -> dict | None:
    """Per GPU size and file, the longest context that fits with each cache type the manifest sized."""
    if not table.longest:
        return None
    files = list(dict.fromkeys((x.file, x.quant) for x in table.longest))
    types = list(dict.fromkeys(x.cache_type for x in table.longest))
    rows = []
    for size in sorted({x.gib for x in table.longest}):
        row = [f"{size:g} GiB"]
        for file, _ in files:
            parts = []
            for t in types:
                x = next((y for y in table.longest if (y.gib, y.file, y.cache_type) == (size, file, t)), None)
                if x is not None:
                    shown = "does not fit" if x.ctx is None else f"{x.ctx:,}" + (" (all)" if x.limit else "")
                    parts.append(f"{t} {shown}")
            row.append(", ".join(parts) or "not sized")
        rows.append(row)
    return {"quants": [q for _, q in files], "rows": rows, "types": types}


@dataclass
class Curve:
    quant: str
    placements: list[str]
    memory: list[int]  # bytes on the GPU per placement: measured where a GPU was, else the probe's weights
    tps: list[float]
    measured_memory: bool


def offload_curves(manifest: Manifest) -> list[Curve]:
    """Per file smoked in three placements or more (`smoke --sweep`), decode speed against GPU memory."""
    curves = []
    for a in manifest.artifacts:
        result = manifest.smoke_result(a)
        if result is None or len(result.placements) < 3 or a.probe is None:
            continue
        points = []
        for name, r in result.placements.items():
            offload = a.probe.placement(name)
            measured = r.gpu_mib()
            memory = measured * 2**20 if measured is not None else (offload.bytes_on_gpu if offload else None)
            if memory is not None and r.decode_tps.mean is not None:
                points.append((int(memory), r.decode_tps.mean, name, measured is not None))
        points.sort()
        if len(points) >= 3:
            curves.append(Curve(a.quant, [p[2] for p in points], [p[0] for p in points], [p[1] for p in points],
                                all(p[3] for p in points)))
    return curves
