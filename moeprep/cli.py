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
@click.option("--quant", "quants", multiple=True, metavar="TYPE",
              help="Quant to make; repeat for more. [default: Q8_0, Q4_K_M, Q2_K]")
@click.option("--revision", help="Hub branch, tag or commit. [default: main]")
@click.option("--threads", type=int, default=0, help="Quantizer threads (0: all cores).")
@json_option
def convert(source, out, outtype, quants, revision, threads, as_json) -> None:
    """Download (for a repo id), convert to GGUF, quantize, probe, and write manifest.json.

    SOURCE is a Hub repo id or a local model directory. A rerun keeps every output whose
    sha256 matches the manifest and redoes the rest.

    \b
    Example:
      moeprep convert microsoft/Phi-3.5-MoE-instruct --quant Q8_0 --quant Q4_K_M
    """
    from .pipeline import prepare
    from .quantize import DEFAULT_QUANTS

    result = prepare(source, out=out, outtype=outtype, quants=list(quants) or list(DEFAULT_QUANTS),
                     revision=revision, nthread=threads, status=status)
    m = result.manifest
    data = {"out": str(result.out), "made": result.made, "kept": result.kept, "manifest": m.to_dict()}

    def human():
        for a in m.artifacts:
            click.echo(f"{a.sha256}  {a.size:>14,}  {result.out / a.path}")
        click.echo(f"made {len(result.made)}, kept {len(result.kept)}; manifest: {result.out / 'manifest.json'}")

    emit(data, as_json, human)


@main.command(cls=QuantHelpCommand)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--quant", "quants", multiple=True, metavar="TYPE",
              help="Quant to make; repeat for more. [default: Q8_0, Q4_K_M, Q2_K]")
@click.option("--threads", type=int, default=0, help="Quantizer threads (0: all cores).")
@json_option
def quantize(file: Path, quants, threads: int, as_json: bool) -> None:
    """Quantize one F16/BF16 GGUF with libllama's quantizer, beside the input.

    If the input's directory has a manifest.json, the new files are recorded in it.

    \b
    Example:
      moeprep quantize Phi-3.5-MoE-instruct-GGUF/Phi-3.5-MoE-instruct-F16.gguf --quant Q5_K_M
    """
    from .pipeline import quantize_file
    from .quantize import DEFAULT_QUANTS

    made = quantize_file(file, list(quants) or list(DEFAULT_QUANTS), threads, status)

    def human():
        for a in made:
            click.echo(f"{a.sha256}  {a.size:>14,}  {file.parent / a.path}")

    emit([dataclasses.asdict(a) for a in made], as_json, human)


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
               threads=0, as_json=as_json)
    if not as_json:
        click.echo(f"next: moeprep probe {out / f'{name}-GGUF' / f'{name}-Q4_K_M.gguf'}")



if __name__ == "__main__":
    main()
