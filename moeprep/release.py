"""Release: run a recipe's stages, skipping every stage whose recorded outputs are up to date.

Up to date means: the same sha256, made from the same inputs with the same settings. The output
directory is locked for the whole run, so two releases cannot write it at once; the lock is a
flock, which the kernel drops when its process dies, so a killed release never leaves it behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import manifest as mf
from .errors import MoeprepError
from .files import human_bytes
from .recipe import Recipe
from .recipe import load as load_recipe

STAGES = ["download", "convert", "quantize", "probe", "smoke", "card", "push"]
GROUPS = {  # how scheduled CI splits a release into jobs
    "prepare": ["download", "convert", "quantize", "probe"],
    "smoke": ["smoke"],
    "publish": ["card", "push"],
}
LOCK = ".moeprep.lock"


def parse_stages(text: str | None) -> list[str]:
    if not text:
        return list(STAGES)
    chosen = []
    for part in text.split(","):
        part = part.strip()
        names = GROUPS.get(part, [part])
        for name in names:
            if name not in STAGES:
                raise MoeprepError(f"unknown stage {part!r}", f"stages: {', '.join(STAGES)}; groups: {', '.join(GROUPS)}")
            if name not in chosen:
                chosen.append(name)
    return [s for s in STAGES if s in chosen]


def default_out(recipe: Recipe) -> Path:
    return Path("releases") / recipe.name


@contextmanager
def locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise MoeprepError(f"another release is running in {out}: it holds {path} (pid {holder})",
                               "wait for it to finish; the lock goes away when that process ends") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def check_expectations(recipe: Recipe, manifest: mf.Manifest) -> None:
    """The recipe's architecture facts against the converted file: a release of the wrong model stops here."""
    e = recipe.expect
    probe = manifest.probe or {}
    wrong = []
    if e.architecture and manifest.source.architecture != e.architecture:
        wrong.append(f"architecture {manifest.source.architecture} (expected {e.architecture})")
    for key in ("expert_count", "expert_used_count", "expert_shared_count", "block_count"):
        want = getattr(e, key)
        if want is not None and probe.get(key) != want:
            wrong.append(f"{key} {probe.get(key)} (expected {want})")
    if wrong:
        raise MoeprepError(f"{recipe.path}: the converted file does not match the recipe: {'; '.join(wrong)}",
                           "check the source revision, or correct the recipe's expect section")


def _smoke_current(manifest: mf.Manifest, settings: dict) -> bool:
    s = manifest.smoke
    if not s or any(s["settings"].get(k) != v for k, v in settings.items()):
        return False
    results = s.get("artifacts", {})
    return all(a.path in results and results[a.path].get("sha256") == a.sha256 for a in manifest.artifacts)


def run(path: Path, *, stages: list[str] | None = None, out: Path | None = None, status=lambda line: None) -> dict:
    from . import card as card_stage
    from . import download as download_stage
    from . import smoke as smoke_stage
    from .pipeline import ImatrixSpec, prepare
    from .plan import parse_size
    from .push import push

    r = load_recipe(path)
    stages = stages or list(STAGES)
    out = Path(out) if out else default_out(r)
    report: dict = {"recipe": str(r.path), "out": str(out), "stages": {}}
    did = report["stages"]
    with locked(out):
        if stages == ["download"]:
            snap = download_stage.resolve(r.source.repo, r.source.revision)
            download_stage.check_cache_space(snap)
            download_stage.download(snap)
            did["download"] = f"verified {len(snap.files)} files at {snap.commit}"
        elif {"download", "convert", "quantize"} & set(stages):
            spec = None
            if r.imatrix:
                spec = ImatrixSpec(r.relative(r.imatrix.calibration), r.imatrix.quants, r.imatrix.ctx, r.imatrix.chunks)
            result = prepare(r.source.repo, out=out, outtype=r.outtype,
                             quants=r.quants if "quantize" in stages else [], revision=r.source.revision,
                             imatrix=spec, status=status)
            for stage in ("download", "convert", "quantize"):
                if stage in stages:
                    did[stage] = f"made {', '.join(result.made)}" if result.made else "up to date"
            did["files"] = {"made": result.made, "kept": result.kept}
        manifest = mf.load(out)
        if "probe" in stages:
            check_expectations(r, manifest)
            did["probe"] = "matches the recipe"
        if "smoke" in stages:
            settings = smoke_stage.Settings(runs=r.smoke.runs, ctx=r.smoke.ctx, new_tokens=r.smoke.tokens)
            wanted = {"runs": settings.runs, "ctx": settings.ctx, "new_tokens": settings.new_tokens,
                      "placements": r.smoke.placements}
            if _smoke_current(manifest, wanted):
                did["smoke"] = "up to date"
            else:
                status("smoke: measuring every file")
                smoke = smoke_stage.run(out, [smoke_stage.parse_placement(p) for p in r.smoke.placements], settings,
                                        status=status)
                failed = [n for n, a in smoke["artifacts"].items() if not a["ok"]]
                if failed:
                    first = smoke["artifacts"][failed[0]]["failures"][0]
                    raise MoeprepError(f"smoke failed for {', '.join(failed)}: {first}", f"see {out / 'manifest.json'}")
                did["smoke"] = "done"
        if "card" in stages:
            readme = out / "README.md"
            before = readme.read_text(encoding="utf-8") if readme.is_file() else None
            card_stage.write(out, r.hub.repo_id, template=r.relative(r.card.template) if r.card.template else None,
                             quantized_by=r.card.quantized_by, base_model=r.card.base_model)
            problems = card_stage.lint(readme, check_files=False)  # push re-checks every file's sha256
            if problems:
                raise MoeprepError(f"card lint failed: {problems[0]}", f"run `moeprep card {out} --check {readme}`")
            did["card"] = "up to date" if readme.read_text(encoding="utf-8") == before else "done"
        if "push" in stages:
            pushed = push(out, r.hub.repo_id, private=r.hub.private, layout=r.hub.layout,
                          max_shard=parse_size(r.hub.max_shard), quantized_by=r.card.quantized_by,
                          base_model=r.card.base_model,
                          template=r.relative(r.card.template) if r.card.template else None, status=status)
            did["push"] = f"uploaded {pushed.uploaded} files" if pushed.uploaded else "up to date"
    report["did_work"] = any(not str(v).startswith(("up to date", "matches", "verified"))
                             for k, v in did.items() if k != "files")
    return report


def plan(path: Path, *, stages: list[str] | None = None, out: Path | None = None) -> dict:
    """What a release would do, with sizes where the Hub answers and 'unknown' where it does not."""
    from . import download as download_stage
    from .pipeline import artifact_name
    from .plan import parse_size
    from .quantize import planned_size

    r = load_recipe(path)
    stages = stages or list(STAGES)
    out = Path(out) if out else default_out(r)
    unknown: list[str] = []
    try:
        snap = download_stage.resolve(r.source.repo, r.source.revision)
        source = {"commit": snap.commit, "files": len(snap.files), "bytes": snap.size}
        n_params = sum(f.size for f in snap.files if f.path.endswith(".safetensors")) // 2
    except MoeprepError as e:
        source = {"commit": None, "files": None, "bytes": None, "why": e.message}
        unknown.append(f"source size and commit: {e.message}")
        n_params = None
    files = []
    for q in [r.outtype.upper(), *r.quants]:
        size = (n_params * 2 if q == r.outtype.upper() else planned_size(n_params, q) / 1.1) if n_params else None
        shards = int(size // parse_size(r.hub.max_shard)) + 1 if size else None
        files.append({"file": artifact_name(r.name, q), "estimated_bytes": int(size) if size else None,
                      "shards": shards, "imatrix": bool(r.imatrix and q in r.imatrix.quants)})
    if not n_params:
        unknown.append("output sizes (they follow from the source size)")
    existing = mf.load_or_none(out)
    free = shutil.disk_usage(out if out.exists() else Path(".")).free
    needed = (source["bytes"] or 0) + sum(f["estimated_bytes"] or 0 for f in files) if n_params else None
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    largest = max((f["estimated_bytes"] or 0 for f in files), default=0) or None
    return {
        "recipe": str(r.path), "out": str(out), "stages": stages, "source": {"repo": r.source.repo,
                                                                              "revision": r.source.revision, **source},
        "files": files,
        "already_made": [a.path for a in existing.artifacts] if existing else [],
        "preflight": {
            "disk_free": free,
            "disk_needed": needed,
            "disk_ok": (free >= needed) if needed is not None else None,
            "ram": ram,
            "largest_file": largest,
            "ram_ok_for_cpu_smoke": (ram >= largest) if largest else None,
        },
        "hub": {"repo_id": r.hub.repo_id, "layout": r.hub.layout, "max_shard": r.hub.max_shard},
        "unknown": unknown,
        "estimates": "sizes of files not yet made are estimates from the parameter count (bits per weight per type)",
    }


def describe(p: dict) -> list[str]:
    def size(n):
        return human_bytes(n) if n is not None else "unknown"

    lines = [f"release {p['recipe']} into {p['out']}: stages {', '.join(p['stages'])}",
             f"source {p['source']['repo']}@{p['source']['revision']}: commit {p['source']['commit'] or 'unknown'}, "
             f"{p['source']['files'] if p['source']['files'] is not None else 'unknown'} files, {size(p['source']['bytes'])}"]
    for f in p["files"]:
        state = "made" if f["file"] in p["already_made"] else "to make"
        shards = f", {f['shards']} shards" if f["shards"] and f["shards"] > 1 else ""
        lines.append(f"  {f['file']}: {state}, about {size(f['estimated_bytes'])}{shards}" + (" (imatrix)" if f["imatrix"] else ""))
    pf = p["preflight"]
    ok = {True: "enough", False: "NOT enough", None: "unknown"}
    lines.append(f"disk: {size(pf['disk_needed'])} needed, {size(pf['disk_free'])} free: {ok[pf['disk_ok']]}")
    lines.append(f"RAM: {size(pf['ram'])}; largest file {size(pf['largest_file'])} (a CPU smoke loads it): {ok[pf['ram_ok_for_cpu_smoke']]}")
    lines.append(f"push to {p['hub']['repo_id']} ({p['hub']['layout']}, shards over {p['hub']['max_shard']})")
    for u in p["unknown"]:
        lines.append(f"unknown: {u}")
    return lines


def matrix(folder: Path, group: str | None = None) -> dict:
    """The GitHub Actions matrix for scheduled releases: recipe x stage group."""
    from .recipe import discover

    groups = [group] if group else list(GROUPS)
    for g in groups:
        if g not in GROUPS:
            raise MoeprepError(f"unknown stage group {g!r}", f"groups: {', '.join(GROUPS)}")
    include = []
    for path in discover(folder):
        r = load_recipe(path)
        for g in groups:
            include.append({"recipe": str(path), "name": r.name, "group": g, "stages": ",".join(GROUPS[g]),
                            "runner": "gpu" if g == "smoke" else "cpu"})
    return {"include": include}
