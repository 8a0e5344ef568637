"""The ``drtool`` command line: parse, call one service function, render.

This package is the only place that imports click, prints errors and exits.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from types import FrameType

import click

from drtool.cli.context import root
from drtool.errors import DrtoolError
from drtool.memory import pin_mmap_threshold

log = logging.getLogger("drtool")


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every cleanup (servers, uploads, locks) runs."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command and turn every failure into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    signal.signal(signal.SIGTERM, _terminate)
    pin_mmap_threshold()
    try:
        root.main(args=args, prog_name="drtool", standalone_mode=False)
    except DrtoolError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C and SIGTERM (a KeyboardInterrupt here) into Abort
        interrupted = isinstance(exc.__cause__, KeyboardInterrupt)
        click.echo(f"error: {'interrupted' if interrupted else 'aborted'}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line, the traceback only with --debug
        if debug:
            traceback.print_exc()
        click.echo(
            f"error: internal error: {type(exc).__name__}: {exc} (run with --debug and report it)",
            err=True,
        )
        sys.exit(1)
    sys.exit(0)
