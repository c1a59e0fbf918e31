"""The `moeprep` command: thin Click commands over one module per stage.

A command parses its options, makes one library call and hands the result to output.py. Every
MoeprepError is shown here, as one line, with exit code 1; --debug (or MOEPREP_DEBUG) shows the traceback.
The commands live in stages.py and publish.py; this module holds the group and what they share.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from moeprep import __version__
from moeprep.errors import MoeprepError
from moeprep.inputs import short
from moeprep.lock import locked

MAX_LINE = 2000  # characters of an error line: every value in it is quoted short, this bounds the rest


def _debug(ctx: click.Context | None = None) -> bool:
    return bool((ctx and ctx.params.get("debug")) or os.environ.get("MOEPREP_DEBUG"))


def one_line(text: str) -> str:
    """A message as one line: a newline or an escape in a path the user gave must not start a line of its own (one
    that could read `Error: ...`) or drive the terminal."""
    line = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…"


def _usage(e: click.UsageError) -> None:
    where = f"moeprep {e.ctx.info_name}" if e.ctx and e.ctx.parent else "moeprep"
    click.echo(one_line(f"Error: {e.format_message().rstrip('.')} (see `{where} --help`)"), err=True)


class Group(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):
        """The group's own options: an unknown one is a user error like the others, one line and exit code 1."""
        given = list(args)  # click's parser consumes the list it is given
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            if _debug() or "--debug" in given or not given:  # no arguments: click shows the help
                raise
            _usage(e)
            sys.exit(1)

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends a run as Ctrl-C does
        try:
            return super().invoke(ctx)
        except MoeprepError as e:
            if _debug(ctx):
                raise
            click.echo(one_line(f"Error: {e.message}" + (f" ({e.hint})" if e.hint else "")), err=True)
            ctx.exit(1)
        except click.UsageError as e:  # an unknown option, a value out of its range: one line like the others
            if _debug(ctx):
                raise
            _usage(e)
            ctx.exit(1)
        except OSError as e:  # the system refused a path the user gave (too long, not a directory, ...)
            if _debug(ctx):
                raise
            where = f": {short(str(e.filename), 80)}" if e.filename else ""
            click.echo(one_line(f"Error: {e.strerror or e}{where} (check the path; --debug shows where)"), err=True)
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
