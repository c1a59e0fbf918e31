"""The commands of one stage each: download, convert, quantize, imatrix, probe, smoke, plan; doctor, demo."""

from __future__ import annotations

from pathlib import Path

import click

from moeprep.cli import main, output, writing
from moeprep.cli.options import QuantHelpCommand, json_option, quant_options
from moeprep.cli.output import emit, status
from moeprep.errors import MoeprepError
from moeprep.limits import (
    MAX_BATCH,
    MAX_CHUNKS,
    MAX_CTX,
    MAX_RUNS,
    MAX_THREADS,
    MAX_TOKENS,
)
from moeprep.lock import locked
from moeprep.predict import TIERS_GIB


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
    from moeprep.stages import download as stage

    folder, src = stage.fetch(source, revision, status=status)
    emit({"folder": folder, "source": src}, as_json, lambda r: [f"{f.sha256}  {f.path}" for f in src.files] + [
        f"verified {len(src.files)} files of {source}@{src.commit} in {folder}"])


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
def convert(source, out, outtype, quants, mixes, tensor_types, revision, threads, imatrix_text, as_json) -> None:
    """Download (for a repo id), convert to GGUF, quantize, probe, and write manifest.json.

    SOURCE is a Hub repo id or a local model directory. A rerun keeps every output whose
    sha256 matches the manifest and redoes the rest.

    \b
    Example:
      moeprep convert microsoft/Phi-3.5-MoE-instruct --quant Q8_0 --quant Q4_K_M --mix moe-q4
    """
    from moeprep.quants import DEFAULT_QUANTS
    from moeprep.release.pipeline import prepare
    from moeprep.stages.convert import default_out, model_name

    chosen = list(quants) or ([] if mixes else list(DEFAULT_QUANTS))
    folder = Path(out) if out else default_out(model_name(source))
    with locked(folder, f"convert {source}"):
        outcome = prepare(source, out=folder, outtype=outtype, quants=chosen, mixes=list(mixes),
                          tensor_types=list(tensor_types), revision=revision, nthread=threads,
                          imatrix_text=imatrix_text, status=status)
    output.notes(outcome)
    emit({"out": folder, "made": outcome.made, "kept": outcome.kept, "notes": outcome.notes,
          "manifest": outcome.result.to_dict() if outcome.result else None}, as_json, lambda r: output.outcome_lines(outcome, folder))


@main.command(cls=QuantHelpCommand)
@click.argument("file", type=click.Path(path_type=Path))
@quant_options
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix (from `moeprep imatrix`).")
@click.option("--dry-run", is_flag=True, help="Print each output's size from llama.cpp's own dry run; write nothing.")
@json_option
def quantize(file: Path, quants, mixes, tensor_types, threads: int, imatrix: Path | None, dry_run: bool,
             as_json: bool) -> None:
    """Quantize one F16/BF16 GGUF with libllama's quantizer, beside the input.

    If the input's directory has a manifest.json, the new files are recorded in it, with the
    importance matrix, mix and tensor-type rules each was made with. --dry-run sizes a mix
    against a plain quant without writing anything.

    \b
    Example:
      moeprep quantize Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-F16.gguf --quant Q4_K_M --mix moe-q4 --dry-run
    """
    from moeprep.llama.quantize import size_lines
    from moeprep.quants import DEFAULT_QUANTS
    from moeprep.stages.quantize import file_plan, quantize_file

    chosen = list(quants) or ([] if mixes else list(DEFAULT_QUANTS))
    plan = file_plan(file, chosen, list(mixes), list(tensor_types), imatrix, dry_run=dry_run)
    with writing(file.parent, f"quantize {file.name}", dry_run):
        outcome = quantize_file(file, plan, nthread=threads, dry_run=dry_run, status=status)
    output.notes(outcome)
    if dry_run:
        emit(outcome.result or [], as_json, size_lines)
    else:
        emit(outcome.result or [], as_json, lambda r: output.artifact_lines(r, file.parent))


@main.command()
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--text", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Calibration text.")
@click.option("--out", type=click.Path(path_type=Path), help="Where to write it. [default: imatrix.gguf beside FILE]")
@click.option("--ctx", type=click.IntRange(32, MAX_CTX), default=512, show_default=True, help="Context per chunk.")
@click.option("--chunks", type=click.IntRange(0, MAX_CHUNKS), default=0, show_default=True, help="Chunks to process (0: all).")
@json_option
def imatrix(file: Path, text: Path, out: Path | None, ctx: int, chunks: int, as_json: bool) -> None:
    """Compute an importance matrix with llama.cpp's llama-imatrix on a calibration text.

    Quants that llama.cpp refuses without one (IQ1_*, IQ2_XXS/XS/S, Q2_K_S) need it:
    `moeprep quantize F16.gguf --quant IQ2_XS --imatrix imatrix.gguf`.

    \b
    Example:
      moeprep imatrix Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-F16.gguf --text recipes/calibration/general-en.txt
    """
    from moeprep.stages import imatrix as stage

    out = out or file.parent / "imatrix.gguf"
    with writing(out.parent, "imatrix"):
        record = stage.make(file, text, out, ctx, chunks)
    from moeprep.llama.imatrix import coverage_lines

    if record.uncovered():
        status(f"warning: {record.uncovered()} experts received no calibration tokens; llama.cpp will quantize them "
               "without importance weights")
    emit({"imatrix": out, **vars(record)}, as_json,
         lambda r: [f"{record.sha256}  {out} (from {record.text}, {record.tool})", *coverage_lines(record.coverage or [])])


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
    from moeprep.ggufio.probe import probe as run

    emit(run(file), as_json, lambda r: output.probe_lines(r, all_n))


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--placement", "placements", multiple=True, metavar="gpu|cpu-moe|n-cpu-moe=N",
              help="Placement to measure; repeat for more. [default: gpu and cpu-moe]")
@click.option("--sweep", is_flag=True, help="The offload curve: gpu, n-cpu-moe=N for every N (about eight on a large "
                                          "model) and cpu-moe, instead of --placement.")
@click.option("--runs", type=click.IntRange(1, MAX_RUNS), default=3, show_default=True, help="Timed runs after one warm-up.")
@click.option("--ctx", type=click.IntRange(64, MAX_CTX), default=512, show_default=True,
              help="Context size; at most the model's trained context.")
@click.option("--tokens", "new_tokens", type=click.IntRange(2, MAX_TOKENS), default=32, show_default=True,
              help="Tokens to generate per run.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help="CPU threads. [default: one per physical core, as llama-server]")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Flash attention, as llama-server's --flash-attn.")
@click.option("--batch", "n_batch", type=click.IntRange(1, MAX_BATCH), default=2048, show_default=True,
              help="Logical batch size (llama-server's --batch-size).")
@click.option("--ubatch", "n_ubatch", type=click.IntRange(1, MAX_BATCH), default=512, show_default=True,
              help="Physical batch size (llama-server's --ubatch-size).")
@click.option("--reference", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="F16 file for perplexity and KL divergence. [default: the manifest's converted file]")
@click.option("--quality-text", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Text to measure quality on. [default: moeprep's own eval-en.txt]")
@click.option("--quality-ctx", type=click.IntRange(16, MAX_CTX), default=512, show_default=True,
              help="Tokens per chunk of the text, as llama-perplexity's -c; the second half of each is scored.")
@click.option("--quality-chunks", type=click.IntRange(0, MAX_CHUNKS), default=0, show_default=True,
              help="Chunks to score, as llama-perplexity's --chunks (0: every whole chunk of the text).")
@json_option
def smoke(target, placements, sweep, runs, ctx, new_tokens, threads, flash_attn, n_batch, n_ubatch, reference, quality_text,
          quality_ctx, quality_chunks, as_json) -> None:
    """Load every GGUF with llama.cpp in each placement; measure speed, memory and quality.

    TARGET is a GGUF file or an output directory with a manifest; results go into the manifest.
    Placements: gpu (every layer offloaded), cpu-moe (llama.cpp's --cpu-moe: expert tensors in CPU
    memory), n-cpu-moe=N (the experts of the first N blocks). Quality: perplexity and KL divergence
    against the F16, over the text in chunks as llama-perplexity --kl-divergence scores them (--batch
    and --ubatch as it uses them). Exit code 1 if any file fails.

    \b
    Example:
      moeprep smoke Phi-3.5-MoE-instruct-GGUF --placement gpu --placement n-cpu-moe=8 --json
      moeprep smoke Phi-3.5-MoE-instruct-GGUF --quality-ctx 512 --quality-chunks 8
      moeprep smoke Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-Q4_K_M.gguf --sweep
    """
    from moeprep import placement
    from moeprep.records.results import FlashAttn, SmokeSettings
    from moeprep.stages import smoke as stage

    settings = SmokeSettings(runs=runs, ctx=ctx, new_tokens=new_tokens, threads=threads, flash_attn=FlashAttn(flash_attn),
                             n_batch=n_batch, n_ubatch=n_ubatch, quality_ctx=quality_ctx, quality_chunks=quality_chunks)
    if placements and sweep:
        raise MoeprepError("--sweep chooses the placements itself", "give --sweep or --placement, not both")
    if placements:
        settings.placements = [placement.parse(p) for p in placements]
    settings.sweep = sweep
    with writing(target if target.is_dir() else target.parent, f"smoke {target}"):
        report = stage.run(target, settings, reference=reference, quality_text=quality_text, status=status).result
    emit(report, as_json, output.smoke_lines)
    if report and (failed := report.failed()):
        name, reasons = next(iter(failed.items()))
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise MoeprepError(f"smoke failed for {name}{more}: {reasons[0]}", "the full results are in the output above")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--ctx", type=click.IntRange(1, MAX_CTX), default=4096, show_default=True, help="Context size for the KV cache.")
@click.option("--ubatch", type=click.IntRange(1, MAX_BATCH), default=512, show_default=True,
              help="Physical batch (n_ubatch); the compute buffer grows with it. llama-server's default.")
@click.option("--batch", type=click.IntRange(1, MAX_BATCH), default=2048, show_default=True,
              help="Logical batch (n_batch); llama.cpp caps n_ubatch at it and it at --ctx. llama-server's default.")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Flash attention, as llama-server's -fa; auto predicts the larger of on and off where the build cannot tell.")
@click.option("--cache-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="K and V cache type, as llama-server's -ctk/-ctv (a quantized V cache needs flash attention).")
@click.option("--vram", help="GPU memory to fit, with a unit: 24GiB, 16GB; names the smallest --n-cpu-moe that fits.")
@click.option("--tiers", is_flag=False, flag_value=",".join(map(str, TIERS_GIB)), default=None, metavar="[GIB,...]",
              help="The tier table for FILE or every file of DIR: which placement fits each GPU size (GiB; "
                   f"default {', '.join(map(str, TIERS_GIB))}) at 4k, 16k, 32k and the trained context.")
@click.option("--headroom", help="With --tiers: memory kept free below each size for the CUDA runtime, e.g. 1GiB. "
                                 "[default: measured by a GPU smoke, else 1GiB]")
@json_option
def plan(file: Path, ctx: int, ubatch: int, batch: int, flash_attn: str, cache_type: str, vram: str | None,
         tiers: str | None, headroom: str | None, as_json: bool) -> None:
    """Predict GPU memory for each placement from the GGUF alone (no GPU needed).

    Weights, KV cache and compute buffer, each labelled a prediction with its method; llama.cpp's own
    allocator sizes the compute buffer without reading the weights. Where a GPU smoke of this file is in
    its manifest, measured values and the prediction's error are shown beside it. --tiers answers
    "which file, which offload, which context fit my GPU, and what do I type", with a command per cell.

    \b
    Example:
      moeprep plan Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-Q4_K_M.gguf --ctx 8192 --vram 24GiB
      moeprep plan Phi-3.5-MoE-instruct-GGUF --tiers 16,24,48
    """
    from moeprep.stages.plan import plan_file
    from moeprep.units import parse_size

    if tiers is not None:
        from moeprep.predict.tiers import parse_tiers
        from moeprep.stages.plan import tiers as table

        room = parse_size(headroom, "headroom") / 2**20 if headroom else None
        emit(table(file, tiers_gib=parse_tiers(tiers), flash_attn=flash_attn, headroom_mib=room,
                   cache_type=cache_type), as_json, output.tier_lines)
        return
    size = parse_size(vram, "GPU memory size") if vram else None
    emit(plan_file(file, ctx, size, ubatch=ubatch, batch=batch, flash_attn=flash_attn, cache_type=cache_type), as_json,
         output.plan_lines)


@main.command()
@json_option
def doctor(as_json: bool) -> None:
    """Show what this machine can do: llama.cpp backends, GPUs, NVML, versions.

    \b
    Example:
      moeprep doctor --json
    """
    from moeprep.stages.doctor import report

    emit(report(), as_json, output.doctor_lines)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True,
              help="Where the tiny model and its GGUFs go.")
@click.option("--kind", type=click.Choice(["phimoe", "mixtral", "llama"]), default="phimoe", show_default=True)
@click.option("--runs", type=click.IntRange(1, MAX_RUNS), default=3, show_default=True, help="Timed smoke runs per placement.")
@json_option
def demo(out: Path, kind: str, runs: int, as_json: bool) -> None:
    """Run the whole job on a tiny MoE model generated here (no network, no push).

    It trains a tiny checkpoint whose config mirrors Phi-3.5-MoE (16 experts, top-2, longrope,
    biases) on the shipped calibration text (under a minute on 2 cores, once: it is cached in
    ~/.cache/moeprep/demo, or $MOEPREP_CACHE), then converts, quantizes, probes, smokes, plans and
    writes the card (a local draft: it names no base model, so push refuses it).

    \b
    Example:
      moeprep demo --out demo
    """
    from moeprep.demo.run import run

    done = run(kind, out, runs=runs, status=status)
    output.notes(done.convert)
    emit({"out": done.out, "made": done.convert.made + done.smoke.made + done.card.made,
          "manifest": done.manifest.to_dict(), "plan": done.plan, "card": done.card.result},
         as_json, lambda r: output.demo_lines(done))
