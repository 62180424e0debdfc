"""nestpress tasks. `fab --list`; `fab <task> --help`. Without hosts they run on this machine; with
`-H host` (one host) or `--hosts h1,h2,...` (a fleet: the cells are sharded across the hosts) over SSH.
The first line of output always says where. Each task only turns its options into a fleet.Request."""

from __future__ import annotations

import functools
import inspect

from fabric import Connection, task
from invoke.exceptions import Exit

from harness.config import load, resolve_config_path
from harness.distro import packages_for
from harness.errors import HarnessError
from harness.fleet import Lab, Request, execute
from harness.util import console

LAB_OPTIONS = {  # name: (default, help) - declared once, added to every task that can run on lab hosts
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
CONFIG_HELP = {
    "config": "experiment YAML (a path, or a name under configs/, e.g. shrinker-ab)",
    "set_": "override a config value, repeatable: --set repetitions=1 --set phases.global.duration_s=5",
}
RUN_HELP = {
    **CONFIG_HELP,
    "run_id": "run directory name; an existing one is resumed (complete cells are skipped)",
    "resume": "resume the newest run of this config",
    "yes": "run a matrix of more than 100 cells (otherwise its size and time are said, and nothing runs)",
}


def lab_task(help: dict | None = None, iterable: list[str] | None = None):
    """@task with the lab options; the body gets a Lab instead of them and returns a Request to execute."""

    def wrap(body):
        @functools.wraps(body)
        def call(c, *args, hosts="", accept_new_host=False, remote_dir="~/.nestpress", cache=None, **kwargs):
            names = [h for h in hosts.split(",") if h] or (
                [f"{c.user}@{c.host}:{c.port}"] if isinstance(c, Connection) else []
            )
            lab = Lab(names, accept_new_host, remote_dir, cache, config=c.config)
            try:
                rc = execute(body(c, *args, **kwargs), lab)
            except HarnessError as e:  # a request the library refuses: one line, not a traceback
                console.print(f"[bold red]error:[/bold red] {e}")
                rc = 2
            if rc:
                raise Exit(code=rc)

        sig = inspect.signature(body)
        extra = [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
            for n, (d, _) in LAB_OPTIONS.items()
        ]
        call.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
        return task(
            help={**(help or {}), **{n: h for n, (_, h) in LAB_OPTIONS.items()}},
            iterable=iterable or [],
            auto_shortflags=False,
        )(call)

    return wrap


@lab_task(help={"json": "print JSON (keys include accel, topologies and qemu)"})
def doctor(c, json=False):
    """Host readiness: accelerator and topology decisions with their reasons, QEMUs, tools, memory, disk."""
    return Request("doctor", json=json)


@lab_task(help=CONFIG_HELP, iterable=["set_"])
def validate(c, config, set_=None):
    """Validate an experiment config and print the expanded matrix (nothing runs on a bad config)."""
    return Request("validate", config=config, sets=set_ or [])


@lab_task(
    help={
        "sources": "also install these kernel source packages (default: linux-source-6.1)",
        "config": "also what this config needs: its source packages; a distro_kernel's image, headers and busybox",
    },
    iterable=["sources"],
)
def setup(c, sources=None, config=None):
    """Install the packages the harness needs, the QEMUs (harness/setup_qemu.sh), kernel sources, the harness."""
    needs = packages_for(load(resolve_config_path(config)).experiment) if config else []
    return Request("setup", packages=list(dict.fromkeys([*(sources or ["linux-source-6.1"]), *needs])))


@lab_task(help=CONFIG_HELP, iterable=["set_"])
def build(c, config, set_=None):
    """Build every variant the config names (cached: an unchanged input is never rebuilt)."""
    return Request("build", config=config, sets=set_ or [])


@lab_task(help=RUN_HELP, iterable=["set_"])
def run(c, config, set_=None, run_id=None, resume=False, yes=False):
    """Run the experiment's cells (builds first if needed); remote results are fetched into results/."""
    return Request("run", config=config, sets=set_ or [], run_id=run_id, resume=resume, yes=yes)


@lab_task(help=RUN_HELP, iterable=["set_"])
def experiment(c, config="shrinker-ab", set_=None, run_id=None, resume=False, yes=False):
    """Build + run + fetch + report. With several hosts (--hosts) the cells are sharded across them in parallel."""
    return Request("experiment", config=config, sets=set_ or [], run_id=run_id, resume=resume, yes=yes)


@lab_task(help={"experiment": "experiment name", "run_id": "run id to fetch"})
def fetch(c, experiment, run_id):
    """Bring a run's results from the host(s) into the local results/ tree and regenerate its report."""
    return Request("fetch", experiment=experiment, run_id=run_id)


@task(
    help={
        "run": "run directory, results/<experiment>/<run-id>",
        "repetition": "timeline and counter plots of this repetition only (default: every repetition)",
    }
)
def report(c, run, repetition=None):
    """Regenerate tables, plots, report.md and report.html from a run directory (no rerun; always local)."""
    if rc := execute(Request("report", run=run, repetition=int(repetition) if repetition else None), Lab()):
        raise Exit(code=rc)


@task(help={"run_a": "first run directory", "run_b": "second run directory"})
def compare(c, run_a, run_b):
    """Put two runs side by side: verdicts and p99s (always local)."""
    if rc := execute(Request("compare", runs=[run_a, run_b]), Lab()):
        raise Exit(code=rc)
