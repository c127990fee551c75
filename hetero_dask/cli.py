"""The ``hetero-dask`` command: one sub-command per module (cryoDRGN style).

Each module listed in ``COMMANDS`` defines ``add_arguments(parser)`` and
``main(args)``, and a one-line module docstring used as the help text.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hetero_dask.runtime.progress import close_bars
from hetero_dask.runtime.signals import Terminated, sigterm_raises

# command name -> module implementing it
COMMANDS: dict[str, str] = {
    "info": "hetero_dask.commands.info",
    "refine": "hetero_dask.commands.refine",
    "cluster": "hetero_dask.commands.cluster",
    "status": "hetero_dask.commands.status",
    "import": "hetero_dask.commands.import_",
    "simulate": "hetero_dask.commands.simulate",
    "regroup": "hetero_dask.commands.regroup",
    "reconstruct": "hetero_dask.commands.reconstruct",
    "demo": "hetero_dask.commands.demo",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of the command ``only`` alone (the others' modules,
    and the jobs they import, are then not imported: a command starts faster)."""
    parser = argparse.ArgumentParser(
        prog="hetero-dask",
        description="Heterogeneous refinement, heterogeneous reconstruction and regrouping "
        "of cryo-EM particles on Dask.",
    )
    from hetero_dask import __version__

    parser.add_argument("--version", action="version", version=f"hetero-dask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            continue
        mod = importlib.import_module(modname)
        doc = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
        p = sub.add_parser(name, help=doc, description=(mod.__doc__ or "").strip())
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A command's own parser only; ``--version`` needs none; help lists every command.
    first = argv[0] if argv else None
    parser = build_parser(first if first in COMMANDS else "" if first == "--version" else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv
    try:
        with sigterm_raises():
            rc = args._module.main(args)
    except KeyboardInterrupt as exc:
        close_bars()
        print(f"hetero-dask {args.command}: {_stopped(args, exc)}", file=sys.stderr, flush=True)
        return 143 if isinstance(exc, Terminated) else 130
    except (ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        close_bars()
        print(f"hetero-dask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


def _stopped(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    """One line for Ctrl-C or SIGTERM: where the command stopped and how to go on.

    A command module may say it with ``interrupted(args)``; the others leave
    nothing half-written and are simply run again.
    """
    say = getattr(args._module, "interrupted", None)
    line = say(args) if say is not None else "interrupted; nothing is left half-written: run the same command again"
    if isinstance(exc, Terminated):
        line = line.replace("interrupted", "terminated (SIGTERM)", 1)
    return line


if __name__ == "__main__":
    sys.exit(main())
