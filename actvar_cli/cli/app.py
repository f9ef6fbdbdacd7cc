"""The Typer application, its root options, and how every command runs and shows its result.

Command modules here only parse options and build a request; ``execute`` runs the command with
progress bars, turns a typed error into one line and exit code 2 (``--debug`` shows the
traceback), and ``show`` prints the result as JSON or as Rich tables. Imports of the command
layer stay inside the command functions, so that ``actvar --help`` is fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer

from .. import __version__
from ..errors import ActvarError
from . import render
from .render import err, out

app = typer.Typer(
    name="actvar",
    help="Turn a pretrained VAR image generator into a cheaper ActVAR model, and use it.\n\n"
    "Try it at once on the built-in reference model: `actvar demo`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
STATE = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"actvar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE["debug"] = debug


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Typed library errors become one line on stderr and exit code 2."""
    try:
        yield
    except (ActvarError, OSError, MemoryError) as e:
        if STATE["debug"]:
            raise
        err.print(f"[bold red]error:[/] {render.escape(one_line(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: outputs written so far are complete; run again to continue")
        raise typer.Exit(130) from None


def one_line(e: BaseException) -> str:
    """A typed error's own message; for what the operating system refused, what and where."""
    if isinstance(e, ActvarError):
        return str(e)
    if isinstance(e, MemoryError):
        return "not enough memory for this run (ask for a smaller --batch-size or --num)"
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where} (check the path, the disk space and the permissions)"


def execute(run: Callable[..., Any], request: Any, *, progress: bool = True, transient: bool = False) -> Any:
    """``run(request, progress)`` under progress bars (``run(request)`` without them)."""
    if not progress:
        return run(request)
    with render.progress_bars(transient=transient) as bar:
        return run(request, bar)


def show(result: Any, as_json: bool, table: Callable[[dict], None]) -> None:
    """The result as JSON (``--json``) or through ``table``."""
    if result is None:  # not the main process of a multi-process run
        return
    data = result.to_dict()
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        table(data)


def main() -> None:
    app()
