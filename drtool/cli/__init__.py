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
from drtool.errors import DrtoolError, interrupted
from drtool.memory import pin_mmap_threshold

log = logging.getLogger("drtool")
_stopped_by: list[int] = []  # SIGTERM once it arrived: it decides the exit code (ADR 0008)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every cleanup (servers, uploads, locks) runs."""
    _stopped_by.append(signum)
    raise KeyboardInterrupt


def _interrupted(message: str) -> None:
    """Exit as an interruption: 143 after SIGTERM, 130 after Ctrl-C (ADR 0008)."""
    error = interrupted(_stopped_by[0] if _stopped_by else None, message)
    click.echo(f"error: {error.message}", err=True)
    sys.exit(error.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command and turn every failure into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    _stopped_by.clear()
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
        _interrupted("interrupted" if isinstance(exc.__cause__, KeyboardInterrupt) else "aborted")
    except KeyboardInterrupt:
        _interrupted("interrupted")
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
