"""`python -m harness <command>`: the command table (commands.py) as a command line. fabfile.py runs the same
commands locally or on lab hosts."""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS, Command, Request
from .errors import HarnessError
from .tasks import perform
from .util import console


def _add(sub: argparse._SubParsersAction, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help, description=command.help)
    for opt in command.options:
        if opt.positional:
            p.add_argument(opt.field, help=opt.help)
        elif opt.kind is bool:
            p.add_argument(f"--{opt.name}", dest=opt.field, action="store_true", help=opt.help)
        elif opt.kind is list:
            p.add_argument(f"--{opt.name}", dest=opt.field, action="append", default=[], help=opt.help)
        else:
            required = opt.required and opt.default is None
            kind = int if opt.kind is int else str
            p.add_argument(
                f"--{opt.name}", dest=opt.field, type=kind, default=opt.default, required=required, help=opt.help
            )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestpress", description=__doc__)
    sub = p.add_subparsers(dest="task", required=True)
    for command in COMMANDS.values():
        _add(sub, command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    try:
        return perform(Request.of(args.pop("task"), args))
    except HarnessError as e:
        console.print(f"[bold red]error:[/bold red] {e}", markup=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/bold red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
