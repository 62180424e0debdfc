"""What a fab task does, decided in one place: here or on hosts, one host or a sharded fleet.

Without -H a task runs on this machine and says so first. With -H it runs on every host
over SSH. `run`/`experiment` with several hosts shard the cells (whole repetitions, so each
host interleaves baseline and patched itself) across them in parallel; each host runs its
shard detached under one run id, results are fetched into one local run directory with
the host recorded per cell, and a host that fails leaves the others' results intact.
"""
from __future__ import annotations

import platform
import shlex
from pathlib import Path

from fabric import Connection

from . import cli
from .config import load, resolve_config_path
from .errors import HarnessError, RemoteError
from .manifest import Manifest, cell_complete
from .remote import Remote, run_on_hosts
from .run import new_run_id
from .util import SETUP_PACKAGES, console, log, warn

_fleet_results: dict[tuple, int] = {}


def cli_hosts() -> list[str]:
    """All hosts given with -H (Fabric calls a task once per host; a fleet needs them all at once)."""
    try:
        from fabric.main import program
        value = program.core[0].args.hosts.value
        return [h for h in value.split(",") if h] if value else []
    except Exception:
        return []


def _flags(run_id: str | None, resume: bool) -> list[str]:
    return (["--run-id", run_id] if run_id else []) + (["--resume"] if resume else [])


def dispatch(c, task: str, args: list[str], *, config: str | None = None, run_id: str | None = None,
             resume: bool = False, experiment: str | None = None, accept_new_host: bool = False,
             remote_dir: str = "~/.nestpress", cache: str | None = None, local_only: bool = False) -> int:
    if not isinstance(c, Connection) or local_only:
        where = "no -H given" if not isinstance(c, Connection) else "it reads local results; -H is not used"
        console.print(f"[bold]nestpress {task}: running on THIS MACHINE ({platform.node()}) - {where}[/bold]")
        if task == "fetch":
            raise HarnessError("fetch brings results from hosts: give them with -H")
        if cache:
            import os
            os.environ["NESTPRESS_CACHE"] = cache
        return cli.main(args + (_flags(run_id, resume) if task in ("run", "experiment") else []))
    hosts = cli_hosts() or [f"{c.user}@{c.host}:{c.port}"]
    key = (task, tuple(hosts))
    if key in _fleet_results:
        log(f"{c.host}: handled in the fleet run above")
        return _fleet_results[key]
    remotes = [Remote(Connection(h, config=c.config) if len(hosts) > 1 else c, remote_dir, accept_new_host, cache)
               for h in hosts]
    console.print(f"[bold]nestpress {task}: running on {', '.join(r.name for r in remotes)} over SSH[/bold]")
    try:
        if task in ("run", "experiment"):
            rc = run_fleet(remotes, config, [a for a in args[3:]], run_id, resume, report=task == "experiment")
        elif task == "fetch":
            rc = fetch_fleet(remotes, experiment, run_id)
        else:
            rc = max(_simple(r, task, args, config) for r in remotes)
    except RemoteError as e:
        console.print(f"[bold red]error:[/bold red] {e}", markup=True)
        rc = 2
    _fleet_results[key] = rc
    return rc


def _simple(r: Remote, task: str, args: list[str], config: str | None) -> int:
    if task == "setup":
        r.connect()
        extra = args[2:]
        r.sh("export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq "
             "--no-install-recommends " + " ".join(SETUP_PACKAGES + extra), timeout=1800, hide=False)
    remote_config = r.ship(resolve_config_path(config) if config else None)
    if task == "setup":        # the QEMUs each topology needs (QEMU >= 10 for nested under TCG; README)
        r.sh(f"bash {shlex.quote(r.app)}/harness/setup_qemu.sh", timeout=1800, hide=False)
    r.ensure_env()
    if task == "setup":
        log(f"{r.name}: ready")
        return 0
    if remote_config:
        args = [remote_config if a == config else a for a in args]
    return r.python(args, timeout=3600).exited


def _merge_manifests(run_dir: Path, hosts_by_cell: dict[str, str]) -> None:
    """One manifest for the local run directory: the first host's, plus which host ran which cell."""
    host_manifests = sorted((run_dir / "hosts").glob("*.manifest.json"))
    if not host_manifests:
        return
    manifests = [Manifest.load(p) for p in host_manifests]
    m = manifests[0]
    m.hosts = {p.name.removesuffix(".manifest.json"): h.status for p, h in zip(host_manifests, manifests)}
    # each host's manifest lists its own shard: the run is the union, in plan order
    cells = {c.id: c for h in manifests for c in h.cells}
    m.cells = sorted(cells.values(), key=lambda c: c.order)
    m.cell_hosts = hosts_by_cell
    m.status = "complete" if all(cell_complete(run_dir, c.id) for c in m.cells) else "incomplete"
    m.save(run_dir / "manifest.json")


def run_fleet(remotes: list[Remote], config: str, sets: list[str], run_id: str | None, resume: bool,
              report: bool) -> int:
    plan = load(config, [s for s in sets if s != "--set"])      # validate here, before any host is touched
    exp = plan.experiment
    run_id = run_id or new_run_id()
    local_run = Path(exp.output).resolve() / exp.name / run_id
    n = len(remotes)
    per_rep = len(exp.variants)
    hosts_by_cell = {c.id: remotes[(c.order // per_rep) % n].name for c in plan.cells}

    def one(r: Remote, i: int) -> int:
        remote_config = r.ship(resolve_config_path(config))
        r.ensure_env()
        job = f"{exp.name}-{run_id}-{i}of{n}"
        state = r.job_state(job)
        if state == "running":
            log(f"{r.name}: job {job} is still running - reattaching")
        else:
            r.start_job(job, ["run", "--config", remote_config, *sets, "--run-id", run_id, "--output", "results",
                              *(["--shard", f"{i}/{n}"] if n > 1 else [])])
        rc = r.follow(job, prefix=f"[{r.c.host}:{r.c.port}] " if n > 1 else "")
        r.fetch(f"{r.app}/results/{exp.name}/{run_id}", local_run.parent.parent, host_tag=f"{r.c.host}-{r.c.port}")
        return rc

    outcomes = run_on_hosts(remotes, one)
    _merge_manifests(local_run, hosts_by_cell)
    failed = {h: o for h, o in outcomes.items() if o != 0}
    for h, o in failed.items():
        warn(f"{h}: " + (f"failed: {o}" if isinstance(o, BaseException) else f"exited {o}")
             + " - its cells are reported as missing")
    if local_run.exists() and (local_run / "manifest.json").exists():
        from .report import generate
        if report or failed:
            print(f"report: {generate(local_run).html}")
        print(f"run directory: {local_run}")
    return 1 if failed else 0


def fetch_fleet(remotes: list[Remote], experiment: str, run_id: str) -> int:
    local_root = Path("results").resolve()

    def one(r: Remote, i: int) -> int:
        r.connect()
        r.fetch(f"{r.app}/results/{experiment}/{run_id}", local_root, host_tag=f"{r.c.host}-{r.c.port}")
        return 0

    outcomes = run_on_hosts(remotes, one)
    run_dir = local_root / experiment / run_id
    _merge_manifests(run_dir, {})
    for h, o in outcomes.items():
        if o != 0:
            warn(f"{h}: fetch failed: {o}")
    if (run_dir / "manifest.json").exists():
        from .report import generate
        print(f"report: {generate(run_dir).html}")
    return 0 if all(o == 0 for o in outcomes.values()) else 1
