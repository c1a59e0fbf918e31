"""The `moeprep` command: thin Click commands over one module per stage.

This is the only module that prints for humans. Status goes to stderr, results to stdout, so
`--json` output can be piped. Every MoeprepError is shown here, as one line, with exit code 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import MoeprepError


class Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoeprepError as e:
            if ctx.params.get("debug") or os.environ.get("MOEPREP_DEBUG"):
                raise
            click.echo(f"Error: {e.message}" + (f" ({e.hint})" if e.hint else ""), err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted: finished outputs are kept; run the same command again to continue.", err=True)
            ctx.exit(130)


def status(line: str) -> None:
    click.echo(f"moeprep: {line}", err=True)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(fn)


def quant_options(fn):
    fn = click.option("--threads", type=int, default=0, help="Quantizer threads (0: all cores).")(fn)
    return click.option("--quant", "quants", multiple=True, metavar="TYPE",
                        help="Quant to make; repeat for more. [default: Q8_0, Q4_K_M, Q2_K]")(fn)


def emit(data, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=_jsonable))
    else:
        human()


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def quant_help() -> str:
    from .libllama import file_types

    return "Quant types (llama.cpp file types): " + ", ".join(file_types()) + "."


class QuantHelpCommand(click.Command):
    """Lists llama.cpp's file types in --help; built when help is shown so `moeprep --help` stays instant."""

    def format_epilog(self, ctx, formatter):
        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(quant_help())


@click.group(cls=Group)
@click.version_option(__version__, prog_name="moeprep")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def main(debug: bool, quiet: bool) -> None:
    """Prepare Mixture-of-Experts models as GGUF files people can trust.

    \b
    Example:
      moeprep convert microsoft/Phi-3.5-MoE-instruct
    """
    if quiet:
        from . import progress

        progress.disable()


@main.command()
@click.argument("source")
@click.option("--revision", help="Branch, tag or commit; recorded as the commit it resolves to. [default: main]")
@json_option
def download(source: str, revision: str | None, as_json: bool) -> None:
    """Download a model's safetensors, config and tokenizer, checking every sha256.

    Files go to the Hugging Face cache (HF_HOME); HF_TOKEN and HF_ENDPOINT are honoured.

    \b
    Example:
      moeprep download microsoft/Phi-3.5-MoE-instruct --revision main
    """
    from . import download as stage

    snap = stage.resolve(source, revision)
    status(f"{source}@{snap.revision} is commit {snap.commit}")
    stage.check_cache_space(snap)
    folder, src = stage.download(snap)
    data = {"folder": str(folder), "source": dataclasses.asdict(src)}

    def human():
        for f in src.files:
            click.echo(f"{f.sha256}  {f.path}")
        click.echo(f"verified {len(src.files)} files of {source}@{snap.commit} in {folder}")

    emit(data, as_json, human)


@main.command(cls=QuantHelpCommand)
@click.argument("source")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory. [default: ./<Model>-GGUF]")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), default="f16", show_default=True,
              help="Type of the converted file that the quants are made from.")
@quant_options
@click.option("--revision", help="Hub branch, tag or commit. [default: main]")
@click.option("--imatrix-text", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Calibration text: compute an importance matrix from the F16 and make every quant with it.")
@json_option
def convert(source, out, outtype, quants, revision, threads, imatrix_text, as_json) -> None:
    """Download (for a repo id), convert to GGUF, quantize, probe, and write manifest.json.

    SOURCE is a Hub repo id or a local model directory. A rerun keeps every output whose
    sha256 matches the manifest and redoes the rest.

    \b
    Example:
      moeprep convert microsoft/Phi-3.5-MoE-instruct --quant Q8_0 --quant Q4_K_M
    """
    from .pipeline import ImatrixSpec, prepare
    from .quantize import DEFAULT_QUANTS

    chosen = list(quants) or list(DEFAULT_QUANTS)
    spec = ImatrixSpec(imatrix_text, chosen) if imatrix_text else None
    result = prepare(source, out=out, outtype=outtype, quants=chosen, revision=revision, nthread=threads,
                     imatrix=spec, status=status)
    m = result.manifest
    data = {"out": str(result.out), "made": result.made, "kept": result.kept, "manifest": m.to_dict()}

    def human():
        for a in m.artifacts:
            click.echo(f"{a.sha256}  {a.size:>14,}  {result.out / a.path}")
        click.echo(f"made {len(result.made)}, kept {len(result.kept)}; manifest: {result.out / 'manifest.json'}")

    emit(data, as_json, human)


@main.command(cls=QuantHelpCommand)
@click.argument("file", type=click.Path(path_type=Path))
@quant_options
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix (from `moeprep imatrix`).")
@json_option
def quantize(file: Path, quants, threads: int, imatrix: Path | None, as_json: bool) -> None:
    """Quantize one F16/BF16 GGUF with libllama's quantizer, beside the input.

    If the input's directory has a manifest.json, the new files are recorded in it.

    \b
    Example:
      moeprep quantize Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-F16.gguf --quant Q5_K_M
    """
    from .pipeline import quantize_file
    from .quantize import DEFAULT_QUANTS

    made = quantize_file(file, list(quants) or list(DEFAULT_QUANTS), threads, status, imatrix)

    def human():
        for a in made:
            click.echo(f"{a.sha256}  {a.size:>14,}  {file.parent / a.path}")

    emit([dataclasses.asdict(a) for a in made], as_json, human)


@main.command()
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--text", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Calibration text.")
@click.option("--out", type=click.Path(path_type=Path), help="Where to write it. [default: imatrix.gguf beside FILE]")
@click.option("--ctx", type=click.IntRange(32), default=512, show_default=True, help="Context per chunk.")
@click.option("--chunks", type=click.IntRange(0), default=0, show_default=True, help="Chunks to process (0: all).")
@json_option
def imatrix(file: Path, text: Path, out: Path | None, ctx: int, chunks: int, as_json: bool) -> None:
    """Compute an importance matrix with llama.cpp's llama-imatrix on a calibration text.

    Quants that llama.cpp refuses without one (IQ1_*, IQ2_XXS/XS/S, Q2_K_S) need it:
    `moeprep quantize F16.gguf --quant IQ2_XS --imatrix imatrix.gguf`.

    \b
    Example:
      moeprep imatrix Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-F16.gguf --text recipes/calibration/general-en.txt
    """
    from . import imatrix as stage
    from .files import sha256_file

    out = out or file.parent / "imatrix.gguf"
    stage.compute(file, text, out, out.with_name(out.stem + ".log"), ctx, chunks)
    data = {"imatrix": str(out), "sha256": sha256_file(out), "text": text.name, "text_sha256": sha256_file(text),
            "tool": stage.version()}
    emit(data, as_json, lambda: click.echo(f"{data['sha256']}  {out} (from {text.name}, {data['tool']})"))


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--stages", help="Stages or groups, comma-separated: download,convert,quantize,probe,smoke,card,push; "
                               "prepare, smoke, publish. [default: all]")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory. [default: releases/<name>]")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, files, sizes, disk and RAM preflight); do nothing.")
@json_option
def release(recipe: Path, stages: str | None, out: Path | None, dry_run: bool, as_json: bool) -> None:
    """Run a recipe: download, convert, quantize, probe, smoke, card, push, skipping what is up to date.

    Up to date: the same sha256 from the same inputs and settings. Killed and rerun, it finishes
    the same artifacts; with nothing changed it does no work and says so. Two releases into the
    same directory at once: the second refuses, naming the lock.

    \b
    Example:
      moeprep release recipes/phi-3.5-moe-instruct.yaml --dry-run
    """
    from . import release as stage

    chosen = stage.parse_stages(stages)
    if dry_run:
        p = stage.plan(recipe, stages=chosen, out=out)
        emit(p, as_json, lambda: [click.echo(line) for line in stage.describe(p)])
        return
    report = stage.run(recipe, stages=chosen, out=out, status=status)

    def human():
        for name, what in report["stages"].items():
            if name != "files":
                click.echo(f"{name}: {what}")
        click.echo("done" if report["did_work"] else "nothing to do: every stage was up to date")

    emit(report, as_json, human)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path), default=Path("recipes"))
@click.option("--group", type=click.Choice(["prepare", "smoke", "publish"]), help="Only this stage group.")
def matrix(folder: Path, group: str | None) -> None:
    """Print the GitHub Actions matrix (JSON) for scheduled releases: recipe x stage group.

    \b
    Example:
      moeprep matrix recipes/ --group prepare
    """
    from .release import matrix as build

    click.echo(json.dumps(build(folder, group)))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--all-n", is_flag=True, help="Show every --n-cpu-moe N, not a few.")
@json_option
def probe(file: Path, all_n: bool, as_json: bool) -> None:
    """Report a GGUF's experts, shared experts and routers, and what --cpu-moe would move.

    \b
    Example:
      moeprep probe Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-Q4_K_M.gguf --json
    """
    from .probe import probe as run

    report = run(file)
    emit(report.to_dict(), as_json, lambda: _print_probe(report, all_n))


def _print_probe(report, all_n: bool) -> None:
    from .files import human_bytes as hb

    r = report
    click.echo(f"{r.file}: {r.architecture}, {r.file_type}, {r.n_params / 1e6:,.1f}M parameters, {r.block_count} blocks")
    if r.is_moe:
        click.echo(f"experts: {r.expert_count}, used per token: {r.expert_used_count}, shared: "
                   f"{r.expert_shared_count}, leading dense blocks: {r.leading_dense_block_count}")
    click.echo(f"layout: {r.layout}" + ("" if r.loadable else " (current llama.cpp cannot load it)"))
    for note in r.notes:
        click.echo(f"note: {note}")
    b = r.bytes
    click.echo(f"bytes: experts {hb(b['expert'])}, shared experts {hb(b['shared_expert'])}, "
               f"routers {hb(b['router'])}, other {hb(b['other'])}, total {hb(b['total'])}")
    for layer in r.layers:
        names = ", ".join(t.name.split(".", 2)[2] for t in layer.experts)
        keep = ", ".join(t.name.split(".", 2)[2] for t in layer.shared + layer.router)
        click.echo(f"  blk.{layer.block}: experts {hb(layer.expert_bytes)} [{names}]" + (f"; stays on GPU: {keep}" if keep else ""))
    shown = r.placements if all_n else [p for p in r.placements if not p.name.startswith("n-cpu-moe")] + \
        [p for p in r.placements if p.name.startswith("n-cpu-moe")][:4]
    click.echo("placement          tensors to CPU   bytes to CPU    weights on GPU   override")
    for p in shown:
        click.echo(f"  {p.name:<16} {p.tensors_moved:>8}   {hb(p.bytes_moved):>14}   {hb(p.bytes_on_gpu):>14}   "
                   + (" ".join(p.patterns[:1]) + (" …" if len(p.patterns) > 1 else "") if p.patterns else "(none)"))


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--placement", "placements", multiple=True, metavar="gpu|cpu-moe|n-cpu-moe=N",
              help="Placement to measure; repeat for more. [default: gpu and cpu-moe]")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Timed runs after one warm-up.")
@click.option("--ctx", type=click.IntRange(64), default=512, show_default=True, help="Context size.")
@click.option("--tokens", "new_tokens", type=click.IntRange(2), default=32, show_default=True,
              help="Tokens to generate per run.")
@click.option("--threads", type=int, default=None, help="CPU threads. [default: llama-cpp-python's]")
@click.option("--reference", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="F16 file for KL divergence. [default: the manifest's converted file]")
@json_option
def smoke(target, placements, runs, ctx, new_tokens, threads, reference, as_json) -> None:
    """Load every GGUF with llama.cpp in each placement; measure speed, memory and quality.

    TARGET is a GGUF file or an output directory with a manifest; results go into the manifest.
    Placements: gpu (every layer offloaded), cpu-moe (llama.cpp's --cpu-moe: expert tensors in CPU
    memory), n-cpu-moe=N (the experts of the first N blocks). Exit code 1 if any file fails.

    \b
    Example:
      moeprep smoke Phi-3.5-MoE-instruct-GGUF --placement gpu --placement n-cpu-moe=8 --json
    """
    from . import smoke as stage

    chosen = [stage.parse_placement(p) for p in placements] or None
    report = stage.run(target, chosen, stage.Settings(runs=runs, ctx=ctx, new_tokens=new_tokens, threads=threads),
                       reference, status)
    emit(report, as_json, lambda: _print_smoke(report))
    failed = {name: r["failures"] for name, r in report["artifacts"].items() if not r["ok"]}
    if failed:
        name, reasons = next(iter(failed.items()))
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise MoeprepError(f"smoke failed for {name}{more}: {reasons[0]}", "the full results are in the output above")


def _fmt(s: dict | None, digits: int = 1) -> str:
    if not s or s.get("mean") is None:
        return "not measured"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} (N={s['n']})"


def _print_smoke(report: dict) -> None:
    click.echo(f"backend {report['backend']}; {report['hardware']['cpu']}; NVML: {report['nvml']}")
    for name, r in report["artifacts"].items():
        q = r["quality"]
        quality = f"KLD vs {q['reference']} {q['kld_mean']:.6f}, top-1 {q['top1_agreement']:.3f}" \
            if q and q.get("finite") else "KLD not measured" if not q else "non-finite logits"
        click.echo(f"{name}: {'ok' if r['ok'] else 'FAILED'}; {quality}")
        for p in r["placements"].values():
            vram = _fmt(p["vram_mib"]["peak_generation"], 0) + " MiB peak" if p["vram_mib"] else "VRAM not measured"
            click.echo(f"  {p['placement']:<14} decode {_fmt(p['decode_tps'])} tok/s, TTFT {_fmt(p['ttft_s'], 4)} s, "
                       f"prompt {_fmt(p['prompt_tps'])} tok/s, load {_fmt(p['load_s'], 3)} s; "
                       f"{len(p['overridden'])} tensors overridden ({'= probe' if p['overrides_match_probe'] else 'MISMATCH'}); {vram}")
        for failure in r["failures"]:
            click.echo(f"  failure: {failure}")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--ctx", type=click.IntRange(1), default=4096, show_default=True, help="Context size for the KV cache.")
@click.option("--vram", help="GPU memory to fit, e.g. 24GiB; names the smallest --n-cpu-moe that fits.")
@json_option
def plan(file: Path, ctx: int, vram: str | None, as_json: bool) -> None:
    """Predict GPU memory for each placement from the GGUF alone (no GPU needed).

    Predictions are labelled as such; the compute buffer is not included. Where a GPU smoke of
    this file is in its manifest, measured values are shown beside the prediction.

    \b
    Example:
      moeprep plan Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-Q4_K_M.gguf --ctx 8192 --vram 24GiB
    """
    from . import manifest as mf
    from .plan import parse_size, plan as predict

    m = mf.load_or_none(file.parent) if file.is_file() else None
    art = next((a for a in m.artifacts if a.path == file.name), None) if m else None
    result = predict(file, ctx, parse_size(vram) if vram else None, m.smoke if m else None, art.sha256 if art else None)
    emit(result, as_json, lambda: _print_plan(result))


def _print_plan(r: dict) -> None:
    from .files import human_bytes as hb

    click.echo(f"{r['file']}: PREDICTED from the GGUF alone, ctx {r['ctx']}; compute buffer not included")
    click.echo(f"KV cache {r['placements'][0]['kv_cache'] and hb(r['placements'][0]['kv_cache'])}: {r['kv_cache_method']}")
    click.echo(f"token_embd ({hb(r['token_embd_on_cpu'])}) stays in host memory in every placement")
    click.echo("placement        weights on GPU   + KV cache   predicted   measured (GPU model buffer)")
    for p in r["placements"]:
        measured = f"{hb(p['measured']['model'])} ({p['weights_error_pct']:+.1f} %)" if p.get("measured") else "no GPU smoke recorded"
        fits = "" if p["fits"] is None else ("  fits" if p["fits"] else "  too big")
        click.echo(f"  {p['placement']:<14} {hb(p['weights_on_gpu']):>14} {hb(p['kv_cache']):>12} {hb(p['predicted_total']):>11}   {measured}{fits}")
    if r["vram"]:
        click.echo(f"smallest placement predicted to fit {hb(r['vram'])}: {r['recommended'] or 'none'}")


@main.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--template", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Jinja template for the card. [default: templates/model_card.md.j2]")
@click.option("--check", "check", type=click.Path(path_type=Path), help="Lint this card file instead of writing one.")
@click.option("--push", is_flag=True, help="Lint, then upload GGUFs, card, plot and manifest to the Hub.")
@click.option("--repo-id", help="Hub repo ORG/NAME (needed with --push; named in the card's usage).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--dry-run", is_flag=True, help="With --push: print what would be uploaded, and where; upload nothing.")
@click.option("--layout", type=click.Choice(["single", "per-quant"]), default="single", show_default=True,
              help="One repo for all quants, or one repo per quant (ORG/NAME-QUANT) linking each other.")
@click.option("--max-shard", default="50GB", show_default=True, help="Split GGUFs larger than this before upload.")
@click.option("--quantized-by", default="moeprep", show_default=True, help="The card's quantized_by.")
@click.option("--base-model", help="Base model repo id, for a model converted from a local directory.")
@json_option
def card(directory, template, check, push, repo_id, private, dry_run, layout, max_shard, quantized_by, base_model,
         as_json) -> None:
    """Write DIR/README.md from DIR/manifest.json; lint a card; push everything to the Hub.

    The card is rendered in a Jinja sandbox from the manifest's records. --check lints a card:
    front matter, merge markers, unrendered template syntax, empty cells, figures equal to the
    manifest's, files present with their sha256, absolute links to other repos. --push always lints
    first and stops if the lint fails. The token (HF_TOKEN or `hf auth login`) is never printed.

    \b
    Example:
      moeprep card Phi-3.5-MoE-instruct-GGUF --push --repo-id me/Phi-3.5-MoE-instruct-GGUF
    """
    from . import card as stage
    from . import manifest as mf
    from .plan import parse_size

    if check:
        folder = directory or check.parent
        problems = stage.lint(check, mf.load_or_none(folder))
        emit({"card": str(check), "problems": problems}, as_json,
             lambda: [click.echo(p) for p in problems] or click.echo(f"{check}: no problems"))
        if problems:
            raise MoeprepError(f"card lint failed: {len(problems)} problem{'s' * (len(problems) != 1)} in {check}", "fix them, or render the card again")
        return
    if directory is None:
        raise MoeprepError("no output directory given", "moeprep card DIR, or moeprep card --check FILE")
    if push:
        from .push import push as upload

        if not repo_id:
            raise MoeprepError("--push needs --repo-id ORG/NAME", "name the Hub repo to push to")
        result = upload(directory, repo_id, private=private, dry_run=dry_run, layout=layout,
                        max_shard=parse_size(max_shard), quantized_by=quantized_by, base_model=base_model,
                        template=template, status=status)

        def human():
            for r in result.repos:
                click.echo(f"{r.url}" + (f" (commit {r.commit})" if r.commit else ""))
                for i in r.items:
                    click.echo(f"  {i.action:<30} {i.size:>14,}  {i.local} -> {r.repo_id}/{i.path_in_repo}")
            click.echo(("dry run: nothing uploaded; " if result.dry_run else "") + f"{result.uploaded} files to upload")

        emit(dataclasses.asdict(result), as_json, human)
        return
    path = stage.write(directory, repo_id, template=template, quantized_by=quantized_by, base_model=base_model)
    problems = stage.lint(path)
    emit({"card": str(path), "problems": problems}, as_json, lambda: click.echo(f"wrote {path}"))
    if problems:
        raise MoeprepError(f"the card written to {path} fails its own lint: {problems[0]}", "report this as a moeprep bug")


@main.command()
@json_option
def doctor(as_json: bool) -> None:
    """Show what this machine can do: llama.cpp backends, GPUs, NVML, versions.

    \b
    Example:
      moeprep doctor --json
    """
    from .gpu import hardware, nvml
    from .libllama import backends, devices
    from .tools import gguf_origin, versions

    source, nvml_status = nvml()
    devs = devices()
    data = {
        "backends": backends(devs),
        "devices": devs,
        "nvml": nvml_status,
        "hardware": hardware(source),
        "tools": versions(),
        "gguf": gguf_origin(),
    }

    def human():
        from .files import human_bytes as hb

        t = data["tools"]
        click.echo(f"llama.cpp {t['llama_cpp_commit']} via llama-cpp-python {t['llama_cpp_python']}; "
                   f"backends: {', '.join(data['backends'])}; GPU offload {'yes' if t['gpu_offload'] else 'no'}")
        for d in devs:
            click.echo(f"  {d['name']}: {d['description']} ({d['type']}), {hb(d['memory_total'])} total, {hb(d['memory_free'])} free")
        click.echo(f"NVML: {nvml_status}")
        for g in data["hardware"]["gpus"]:
            click.echo(f"  GPU {g['index']}: {g['name']}, {g['memory_total_mib']:.0f} MiB, driver {g['driver']}, CUDA {g['cuda']}")
        click.echo(f"CPU: {data['hardware']['cpu']} ({data['hardware']['cpu_cores']} cores), RAM {data['hardware']['ram_gib']} GiB")
        click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in t.items()))
        g = data["gguf"]
        click.echo(f"gguf module: {g['distribution']} {g['version']}, {g['files_checked']} files checked, "
                   f"{len(g['files_changed'])} changed")

    emit(data, as_json, human)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True,
              help="Where the tiny model and its GGUFs go.")
@click.option("--kind", type=click.Choice(["phimoe", "mixtral", "llama"]), default="phimoe", show_default=True)
@json_option
@click.pass_context
def demo(ctx: click.Context, out: Path, kind: str, as_json: bool) -> None:
    """Run the whole convert job on a tiny MoE model generated here (no network).

    It builds a random-weight checkpoint whose config mirrors Phi-3.5-MoE (16 experts, top-2,
    longrope, biases), then converts, quantizes and probes it like `moeprep convert`.

    \b
    Example:
      moeprep demo --out demo
    """
    from .demo import build

    name = f"tiny-{kind}"
    source = out / name
    if not (source / "config.json").exists():
        status(f"building a tiny {kind} checkpoint in {source}")
        build(kind, source)
    ctx.invoke(convert, source=str(source), out=out / f"{name}-GGUF", outtype="f16", quants=(), revision=None,
               threads=0, imatrix_text=None, as_json=as_json)
    if not as_json:
        click.echo(f"next: moeprep probe {out / f'{name}-GGUF' / f'{name}-Q4_K_M.gguf'}")



if __name__ == "__main__":
    main()
