"""The `moeprep` command: thin Click commands over one module per stage.

A command parses its options, makes one library call and hands the result to output.py. Every
MoeprepError is shown here, as one line, with exit code 1; --debug (or MOEPREP_DEBUG) shows the traceback.
The commands live in stages.py and publish.py; this module holds the group and what they share.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import click

from moeprep import __version__
from moeprep.errors import MoeprepError
from moeprep.lock import locked


class Group(click.Group):
    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends a run as Ctrl-C does
        try:
            return super().invoke(ctx)
        except MoeprepError as e:
            if ctx.params.get("debug") or os.environ.get("MOEPREP_DEBUG"):
                raise
            click.echo(f"Error: {e.message}" + (f" ({e.hint})" if e.hint else ""), err=True)
            ctx.exit(1)
        except click.BadParameter as e:  # a value out of its range: a user error, said on one line like the others
            if ctx.params.get("debug") or os.environ.get("MOEPREP_DEBUG"):
                raise
            where = f"moeprep {e.ctx.info_name}" if e.ctx and e.ctx.parent else "moeprep"
            click.echo(f"Error: {e.format_message().rstrip('.')} (see `{where} --help`)", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted: finished outputs are kept; run the same command again to continue.", err=True)
            ctx.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def writing(directory: Path, what: str, dry_run: bool = False):
    """Hold the directory's lock while the command writes into it; one that does not exist is the stage's to refuse."""
    if dry_run or not Path(directory).is_dir():
        yield
        return
    with locked(directory, what):
        yield


def _version(ctx: click.Context, param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from moeprep.llama.build import versions

    v = versions()
    click.echo(f"moeprep {__version__} (llama.cpp {v['llama_cpp_commit']}, llama-cpp-python {v['llama_cpp_python']})")
    ctx.exit()


@click.group(cls=Group)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show moeprep's version and the llama.cpp commit it runs, and exit.")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def main(debug: bool, quiet: bool) -> None:
    """Prepare Mixture-of-Experts models as GGUF files people can trust.

    \b
    Example:
      moeprep convert microsoft/Phi-3.5-MoE-instruct
    """
    if quiet:
        from moeprep import progress

        progress.disable()


# The commands register themselves on `main` when their modules are imported.
from moeprep.cli import publish, stages  # noqa: E402,F401
