"""The fab tasks, made from the command table (commands.py): one task per command, its options as the command
line's, plus where it runs (the lab options) for every command that can run on lab hosts. Each task only turns
its options into a Request and hands it to fleet.execute."""

from __future__ import annotations

import inspect
import keyword
from typing import Any

from fabric import Connection, task
from invoke.exceptions import Exit

from ..commands import COMMANDS, Command, Option, Request
from ..errors import HarnessError
from ..util import console
from .fleet import Lab, execute

LAB_OPTIONS = {  # name: (default, help) - added to every task that can run on lab hosts
    "hosts": (
        "",
        "lab hosts, comma-separated (user@host:port): one sharded run across all of them; "
        "Fabric's -H instead runs the task once per host",
    ),
    "accept_new_host": (False, "trust an unknown SSH host key on first use (default: reject)"),
    "remote_dir": (
        "~/.nestpress",
        "where the harness lives on the host ({host} becomes host-port, for homes shared between hosts)",
    ),
    "cache": (None, "build cache directory (default ~/.cache/nestpress)"),
}


def param(opt: Option) -> str:
    """The task function's parameter for an option (invoke turns it back into the same flag)."""
    name = opt.name.replace("-", "_")
    return name + "_" if keyword.iskeyword(name) or name in ("set", "run") else name


def _value(opt: Option, given: Any) -> Any:
    if opt.kind is list:
        return list(given or [])
    if opt.kind is int and given is not None:
        try:
            return int(given)
        except ValueError:
            raise HarnessError(f"--{opt.name} {given!r}: a whole number") from None
    return given


def fab_task(command: Command):
    lab = command.where != "local"
    params = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for opt in command.options:
        required = opt.required and opt.default is None
        default = inspect.Parameter.empty if required else False if opt.kind is bool else opt.default
        params.append(inspect.Parameter(param(opt), inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    for name, (default, _) in LAB_OPTIONS.items() if lab else ():
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    signature = inspect.Signature(params)

    def call(*args, **kwargs):
        given = signature.bind(*args, **kwargs)
        given.apply_defaults()
        a = given.arguments
        names = [h for h in (a.get("hosts") or "").split(",") if h] or (
            [f"{a['c'].user}@{a['c'].host}:{a['c'].port}"] if lab and isinstance(a["c"], Connection) else []
        )
        where = Lab(names, bool(a.get("accept_new_host")), a.get("remote_dir") or "~/.nestpress", a.get("cache"))
        where.config = a["c"].config
        try:
            values = {opt.field: _value(opt, a[param(opt)]) for opt in command.options}
            rc = execute(Request.of(command.name, values), where)
        except HarnessError as e:  # a request the library refuses: one line, not a traceback
            console.print(f"[bold red]error:[/bold red] {e}")
            rc = 2
        if rc:
            raise Exit(code=rc)

    call.__signature__ = signature  # type: ignore[attr-defined]
    call.__name__ = call.__qualname__ = command.name
    call.__doc__ = command.help[0].upper() + command.help[1:] + "."
    helps = {param(o): o.help for o in command.options} | ({n: h for n, (_, h) in LAB_OPTIONS.items()} if lab else {})
    iterable = [param(o) for o in command.options if o.kind is list]
    return task(help=helps, iterable=iterable, auto_shortflags=False)(call)


def fab_tasks() -> dict[str, Any]:
    return {name: fab_task(command) for name, command in COMMANDS.items()}
