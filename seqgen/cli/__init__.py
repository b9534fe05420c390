"""The ``seqgen`` command line: a click group; each command parses options and calls the library.

User errors (:class:`seqgen.errors.SeqgenError`) print one message without a traceback and exit with their
``exit_code`` (1, or a more specific code that the README's table lists).
"""

from __future__ import annotations

import logging
import sys

import click

from ..errors import SeqgenError
from ..version import __version__
from .output import err

__all__ = ["main", "cli"]


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SeqgenError as exc:
            err(f"error: {exc}", fg="red")
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="seqgen")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Trace a transformers model once, emit reviewable subgraph code, calibrate layer by layer."""
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from . import cache_cmds, calibrate_cmd, diff_cmd, emit_cmd, package_cmds, report_cmd

    cli.add_command(emit_cmd.emit)
    cli.add_command(calibrate_cmd.calibrate)
    cli.add_command(calibrate_cmd.evaluate)
    cli.add_command(cache_cmds.cache)
    cli.add_command(diff_cmd.diff)
    cli.add_command(report_cmd.report)
    for command in package_cmds.COMMANDS:
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="seqgen")
