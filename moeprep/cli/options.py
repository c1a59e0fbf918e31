"""Option groups that several commands share, as decorators, and the help that lists llama.cpp's quant types."""

from __future__ import annotations

from pathlib import Path

import click


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(fn)


def quant_options(fn):
    fn = click.option("--threads", type=click.IntRange(0, 512), default=0, help="Quantizer threads (0: all cores).")(fn)
    fn = click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
                      help="Give tensors whose name matches the regular expression PATTERN the ggml type TYPE "
                           "(Q8_0, Q6_K, Q4_K, ...), as llama-quantize's --tensor-type; repeat for more, the first "
                           "match wins. Applies to every quant and mix made, before a mix's own rules.")(fn)
    fn = click.option("--mix", "mixes", multiple=True, metavar="NAME",
                      help="Also make this named mix, as <Model>-NAME.gguf; repeat for more (the mixes are listed below).")(fn)
    return click.option("--quant", "quants", multiple=True, metavar="TYPE",
                        help="Quant to make; repeat for more. [default: Q8_0, Q4_K_M, Q2_K, unless --mix is given]")(fn)


def card_options(fn):
    for option in reversed([
        click.option("--repo-id", help="Hub repo ORG/NAME the card is for (named in its usage lines)."),
        click.option("--layout", type=click.Choice(["single", "per-quant"]), default="single", show_default=True,
                     help="One repo for all quants, or one repo per quant (ORG/NAME-QUANT) linking each other."),
        click.option("--template", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     help="Jinja template for the card. [default: the one shipped with moeprep]"),
        click.option("--max-shard", default="50GB", show_default=True, help="Split GGUFs larger than this before upload."),
        click.option("--quantized-by", default="moeprep", show_default=True, help="The card's quantized_by."),
        click.option("--base-model", help="Base model repo id, for a model converted from a local directory."),
    ]):
        fn = option(fn)
    return fn


class QuantHelpCommand(click.Command):
    """Lists llama.cpp's file types and moeprep's mixes in --help; built when help is shown, so that `moeprep --help`
    stays instant."""

    def format_epilog(self, ctx, formatter):
        from moeprep.llama.build import file_types
        from moeprep.quants import MIXES

        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text("Quant types (llama.cpp file types): " + ", ".join(file_types()) + ".")
            formatter.write_paragraph()
            formatter.write_text("Mixes: " + "; ".join(f"{m.name}: {m.base} base, {m.about}" for m in MIXES.values())
                                 + ".")
