"""What a fab task does, decided in one place: here or on lab hosts, one host or a sharded fleet.

A task is a Request (what to do: commands.py) and a Lab (where). Without hosts it runs on this machine and says so
first. With hosts it runs on every host over SSH; `run`/`experiment` with several hosts shard the cells
(whole repetitions, so each host interleaves baseline and patched itself, Matrix.shard) across them in
parallel; each host runs its shard detached under one run id, results are fetched into one local run
directory with the host recorded per cell, and a host that fails leaves the others' results intact.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric import Connection

from ..commands import Request
from ..config import resolve_config_path
from ..errors import HarnessError, RemoteError
from ..results.manifest import Manifest, cell_complete
from ..run.run_dir import RUN_ID, check_run_id, new_run_id
from ..tasks import EXIT_INCONCLUSIVE, conclusion, matrix_of, perform, setup_packages
from ..util import console, log, warn
from .remote import Remote, run_on_hosts


@dataclass
class Lab:
    """Where a task runs: this machine (no hosts) or these lab hosts over SSH, and how to reach them."""

    hosts: list[str] = field(default_factory=list)
    accept_new_host: bool = False
    remote_dir: str = "~/.nestpress"
    cache: str | None = None
    config: Any = None  # Fabric's config (keys from -i, ssh_config), for our Connections


def execute(request: Request, lab: Lab) -> int:
    """The request here (no hosts, or a command that is always local) or on the lab's hosts, said first."""
    command = request.command
    if not lab.hosts or command.where == "local":
        why = "it reads local results" if lab.hosts else "no hosts given"
        console.print(f"[bold]nestpress {request.task}: running on THIS MACHINE ({platform.node()}) - {why}[/bold]")
        if lab.cache:
            os.environ["NESTPRESS_CACHE"] = lab.cache
        return perform(request)
    remotes = [
        Remote(Connection(h, config=lab.config), lab.remote_dir, lab.accept_new_host, lab.cache) for h in lab.hosts
    ]
    console.print(
        f"[bold]nestpress {request.task}: running on {', '.join(r.name for r in remotes)} over SSH"
        + (" (one host; --hosts h1,h2 shards one run across several)" if len(remotes) == 1 else "")
        + "[/bold]"
    )
    try:
        if request.task == "bisect":
            return bisect_on_host(remotes, request)
        if command.detached:
            return run_fleet(remotes, request)
        if request.task == "fetch":
            return fetch_fleet(remotes, str(request.experiment), str(request.run_id))
        if request.task == "setup":
            extra = setup_packages(request)
            return max(_setup(r, extra) for r in remotes)
        return max(_simple(r, request) for r in remotes)
    except RemoteError as e:
        console.print(f"[bold red]error:[/bold red] {e}", markup=True)
        return 2


def _setup(r: Remote, extra: list[str]) -> int:
    """The host set up by the same script as this machine (harness/setup.sh), shipped first, as root."""
    r.ship(None)
    as_root = [] if r.sh("id -u").stdout.strip() == "0" else ["sudo", "-n"]
    try:
        r.sh(shlex.join([*as_root, "bash", f"{r.app}/harness/setup.sh", *extra]), timeout=1800, hide=False)
    except RemoteError as e:
        if "password is required" in str(e):
            raise RemoteError(
                f"{r.name}: setup installs packages as root: log in as root, or give this user sudo without "
                "a password (sudo -n asked for one)"
            ) from None
        raise
    r.ensure_env()
    log(f"{r.name}: ready")
    return 0


def _simple(r: Remote, request: Request) -> int:
    remote_config = r.ship(resolve_config_path(request.config) if request.config else None)
    r.ensure_env()
    return r.python(dataclasses.replace(request, config=remote_config).argv(), timeout=3600).exited


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


def _start_or_reattach(r: Remote, experiment: str, job: str, argv: list[str]) -> None:
    """The host's job of this run: refused beside another run of the experiment, reattached while it still runs
    (after a lost connection or a Ctrl-C here), else started detached."""
    r.refuse_concurrent(experiment, job)
    r.ensure_env()
    if r.job_state(job) == "running":
        log(f"{r.name}: job {job} is still running - reattaching")
        r.job = job
    else:
        r.start_job(job, argv)


def run_fleet(remotes: list[Remote], request: Request) -> int:
    config = str(request.config)
    matrix = matrix_of(request)  # validated here, counted and confirmed, before any host is touched
    exp = matrix.experiment
    run_id = check_run_id(request.run_id) if request.run_id is not None else new_run_id()
    local_run = Path(exp.output).resolve() / exp.name / run_id
    n = len(remotes)
    hosts_by_cell = {c.id: r.name for i, r in enumerate(remotes) for c in matrix.shard(i, n)}

    def one(r: Remote, i: int) -> int:
        remote_config = r.ship(resolve_config_path(config))
        shard = dataclasses.replace(
            request,
            task="run",
            config=remote_config,
            run_id=run_id,
            resume=False,
            output=r.results,
            shard=f"{i}/{n}" if n > 1 else None,
        )
        job = f"{exp.name}-{run_id}-{i}of{n}"
        _start_or_reattach(r, exp.name, job, shard.argv())
        rc = r.follow(job, prefix=f"[{r.c.host}:{r.c.port}] " if n > 1 else "")
        r.fetch(f"{r.results}/{exp.name}/{run_id}", local_run.parent.parent, host_tag=f"{r.c.host}-{r.c.port}")
        return rc

    outcomes = run_on_hosts(remotes, one)
    _merge_manifests(local_run, hosts_by_cell)
    failed = {h: o for h, o in outcomes.items() if o not in (0, EXIT_INCONCLUSIVE)}  # judged on the merged run
    for h, o in failed.items():
        warn(
            f"{h}: "
            + (f"failed: {o}" if isinstance(o, BaseException) else f"exited {o}")
            + " - its cells are reported as missing"
        )
    if not (local_run / "manifest.json").exists():
        return 1
    from ..analysis import Analysis, analyze
    from ..report import generate

    result: Analysis
    if request.task == "experiment" or failed:
        report = generate(local_run)
        print(f"report: {report.html}")
        result = report
    else:
        result = analyze(local_run, rebuild_tables=True)
    print(f"run directory: {local_run}")
    return 1 if failed else conclusion(result)


def bisect_on_host(remotes: list[Remote], request: Request) -> int:
    """A bisection's steps depend on each other: it runs on one host, detached (the same command reattaches or
    resumes it), and its directory comes back here. source.url names the clone on that host."""
    if len(remotes) > 1:
        raise HarnessError("bisect runs on one host (each step depends on the last): give one with -H or --hosts")
    from ..bisect.driver import default_run_id

    exp = matrix_of(request).experiment  # the config validated here before the host is touched
    run_id = check_run_id(request.run_id) if request.run_id else default_run_id(str(request.good), str(request.bad))

    def one(r: Remote, i: int) -> int:
        remote_config = r.ship(resolve_config_path(str(request.config)))
        asked = dataclasses.replace(request, config=remote_config, run_id=run_id, output=r.results)
        job = f"{exp.name}-{run_id}-bisect"
        _start_or_reattach(r, exp.name, job, asked.argv())
        rc = r.follow(job)
        r.fetch(f"{r.results}/{exp.name}/{run_id}", Path(request.output or exp.output).resolve(), r.name)
        return rc

    outcome = run_on_hosts(remotes, one)[remotes[0].name]
    if isinstance(outcome, BaseException):
        raise outcome
    return int(outcome)  # type: ignore[call-overload]


def fetch_fleet(remotes: list[Remote], experiment: str, run_id: str) -> int:
    """One run's results from every host into results/<experiment>/<run_id> here (both names, never paths)."""
    check_run_id(run_id)
    if not RUN_ID.fullmatch(experiment) or ".." in experiment:
        raise HarnessError(f"--experiment {experiment!r}: an experiment's name (letters, digits, '_', '.', '-')")
    local_root = Path("results").resolve()

    def one(r: Remote, i: int) -> int:
        r.connect()
        r.fetch(f"{r.results}/{experiment}/{run_id}", local_root, host_tag=f"{r.c.host}-{r.c.port}")
        return 0

    outcomes = run_on_hosts(remotes, one)
    run_dir = local_root / experiment / run_id
    _merge_manifests(run_dir, {})
    for h, o in outcomes.items():
        if o != 0:
            warn(f"{h}: fetch failed: {o}")
    if (run_dir / "manifest.json").exists():
        from ..report import generate

        print(f"report: {generate(run_dir).html}")
    return 0 if all(o == 0 for o in outcomes.values()) else 1
