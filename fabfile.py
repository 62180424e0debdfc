"""nestpress tasks. `fab --list`; `fab <task> --help`. With -H they run on those hosts over SSH,
without -H on this machine (the first line of output always says which)."""
from __future__ import annotations

from fabric import task
from invoke.exceptions import Exit

from harness import fleet

HOST_HELP = {"accept_new_host": "trust an unknown SSH host key on first use (default: reject)",
             "remote_dir": "where the harness lives on the host (default ~/.nestpress; {host} becomes host-port, "
                           "for homes shared between hosts)",
             "cache": "build cache directory on the host (default ~/.cache/nestpress)"}
CONFIG_HELP = {"config": "experiment YAML (a path, or a name under configs/, e.g. shrinker-ab)",
               "set_": "override a config value, repeatable: --set repetitions=1 --set phases.global.duration_s=5"}
RUN_HELP = {**CONFIG_HELP, **HOST_HELP, "run_id": "run directory name; an existing one is resumed (complete cells "
                                                   "are skipped)", "resume": "resume the newest run of this config"}


def _go(c, task_name: str, args: list[str], **kw) -> None:
    rc = fleet.dispatch(c, task_name, args, **kw)
    if rc:
        raise Exit(code=rc)


def _sets(set_) -> list[str]:
    return [a for s in set_ or [] for a in ("--set", s)]


@task(help={"json": "print JSON (keys include accel and reasons)", **HOST_HELP})
def doctor(c, json=False, accept_new_host=False, remote_dir="~/.nestpress", cache=None):
    """Host readiness: accelerator decision with its reasons, nested KVM, QEMU, tools, memory, disk."""
    _go(c, "doctor", ["doctor"] + (["--json"] if json else []), accept_new_host=accept_new_host,
        remote_dir=remote_dir, cache=cache)


@task(help={**CONFIG_HELP, **HOST_HELP}, iterable=["set_"])
def validate(c, config, set_=None, accept_new_host=False, remote_dir="~/.nestpress", cache=None):
    """Validate an experiment config and print the expanded plan (nothing runs on a bad config)."""
    _go(c, "validate", ["validate", "--config", config, *_sets(set_)], config=config,
        accept_new_host=accept_new_host, remote_dir=remote_dir, cache=cache)


@task(help={"sources": "also install these kernel source packages (default: linux-source-6.1)", **HOST_HELP},
      iterable=["sources"])
def setup(c, sources=None, accept_new_host=False, remote_dir="~/.nestpress", cache=None):
    """Install the Debian/Ubuntu packages the harness needs, kernel sources, and the harness itself."""
    _go(c, "setup", ["setup", "--extra", *(sources or ["linux-source-6.1"])], accept_new_host=accept_new_host,
        remote_dir=remote_dir, cache=cache)


@task(help={**CONFIG_HELP, **HOST_HELP}, iterable=["set_"])
def build(c, config, set_=None, accept_new_host=False, remote_dir="~/.nestpress", cache=None):
    """Build every variant the config names (cached: an unchanged input is never rebuilt)."""
    _go(c, "build", ["build", "--config", config, *_sets(set_)], config=config, accept_new_host=accept_new_host,
        remote_dir=remote_dir, cache=cache)


@task(help=RUN_HELP, iterable=["set_"])
def run(c, config, set_=None, run_id=None, resume=False, accept_new_host=False, remote_dir="~/.nestpress",
        cache=None):
    """Run the experiment's cells (builds first if needed); remote results are fetched into results/."""
    _go(c, "run", ["run", "--config", config, *_sets(set_)], config=config, run_id=run_id, resume=resume,
        accept_new_host=accept_new_host, remote_dir=remote_dir, cache=cache)


@task(help=RUN_HELP, iterable=["set_"])
def experiment(c, config="shrinker-ab", set_=None, run_id=None, resume=False, accept_new_host=False,
               remote_dir="~/.nestpress", cache=None):
    """Build + run + fetch + report. With several -H hosts the cells are sharded across them in parallel."""
    _go(c, "experiment", ["experiment", "--config", config, *_sets(set_)], config=config, run_id=run_id,
        resume=resume, accept_new_host=accept_new_host, remote_dir=remote_dir, cache=cache)


@task(help={"experiment": "experiment name", "run_id": "run id to fetch", **HOST_HELP})
def fetch(c, experiment, run_id, accept_new_host=False, remote_dir="~/.nestpress", cache=None):
    """Bring a run's results from the host(s) into the local results/ tree and regenerate its report."""
    _go(c, "fetch", [], experiment=experiment, run_id=run_id, accept_new_host=accept_new_host,
        remote_dir=remote_dir, cache=cache)


@task(help={"run": "run directory, results/<experiment>/<run-id>"})
def report(c, run):
    """Regenerate tables, plots, report.md and report.html from a run directory (no rerun)."""
    _go(c, "report", ["report", "--run", run], local_only=True)


@task(help={"run_a": "first run directory", "run_b": "second run directory"})
def compare(c, run_a, run_b):
    """Put two runs side by side (verdicts and p99s)."""
    _go(c, "compare", ["compare", run_a, run_b], local_only=True)
