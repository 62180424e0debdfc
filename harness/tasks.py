"""What each command of the table (commands.py) does on this machine: one function of a Request per command. The
command line, the fab tasks and lab hosts all end here."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

from . import REPO_ROOT
from .commands import Request
from .errors import ConfigError, HarnessError
from .util import console, default_cache, log

MAX_CELLS_UNASKED = 100
EXIT_INCONCLUSIVE = 3  # every cell complete, but a phase did not deliver its pressure or a variant measured nothing
SETUP = REPO_ROOT / "harness" / "setup.sh"
PACKAGES = REPO_ROOT / "harness" / "packages.txt"
DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # Debian policy 5.6.1


def debian_packages(names: list[str]) -> list[str]:
    """Package names as Debian allows them, nothing else: they reach apt-get on this and on lab hosts."""
    bad = [n for n in names if not DEBIAN_PACKAGE.fullmatch(n)]
    if bad:
        raise HarnessError(f"setup: not Debian package names: {', '.join(map(repr, bad))}")
    return names


def harness_packages() -> list[str]:
    """What the harness itself needs on a host (harness/packages.txt, which bootstrap.sh reads too)."""
    return [w for line in PACKAGES.read_text().splitlines() for w in line.split("#", 1)[0].split()]


def setup_packages(request: Request) -> list[str]:
    """What `setup` installs besides harness_packages(): the request's extras and what its config needs."""
    from .config import load, resolve_config_path
    from .kernel.distro import packages_for

    needs = packages_for(load(resolve_config_path(request.config)).experiment) if request.config else []
    return debian_packages(list(dict.fromkeys([*request.extra, *needs])))


def matrix_of(request: Request):
    """The request's matrix; one of more than MAX_CELLS_UNASKED cells runs only with --yes (counted first)."""
    from .config import load
    from .config.matrix import MAX_CELLS

    asked = request.task not in ("run", "experiment") or request.yes
    sets = request.sets + ([f"parallel={request.parallel}"] if request.parallel is not None else [])
    return load(str(request.config), sets, limit=MAX_CELLS if asked else MAX_CELLS_UNASKED)


def doctor(request: Request) -> int:
    from .machine.doctor import doctor as host_doctor

    d = host_doctor(default_cache())
    print(json.dumps(d.as_dict(), indent=2) if request.json else d.text())
    return 0 if d.ready or not request.strict else 1


def setup(request: Request) -> int:
    """Install what the harness needs on this host (Debian/Ubuntu), with harness/setup.sh (as on lab hosts)."""
    extra = setup_packages(request)
    if os.geteuid() != 0:
        raise HarnessError("setup installs Debian packages: run it as root (or with sudo)")
    subprocess.run(["bash", str(SETUP), *extra], check=True)
    return 0


def validate(request: Request) -> int:
    from .config import describe
    from .kernel.build import check_inputs
    from .machine.host import decide_environment
    from .run.schedule import check

    matrix = matrix_of(request)
    resolved = check_inputs(matrix.experiment)
    env = decide_environment(matrix)
    for cell in matrix.cells:
        check(cell.config, env.topology(cell).kind)
    print(describe(matrix))
    for line in resolved:
        print(f"  {line}")
    if len(matrix.cells) > MAX_CELLS_UNASKED:
        print(f"  {len(matrix.cells)} cells: run and experiment will want --yes")
    for d in env.topologies.values():
        print(f"  topology on this host: {d.kind} with QEMU {d.qemu.version} ({'; '.join(d.reasons)})")
    print("config OK")
    return 0


def build(request: Request) -> int:
    from .kernel.build import Builder

    matrix = matrix_of(request)
    for name, b in Builder(matrix.experiment, default_cache()).build_all().items():
        print(
            f"{name}: {b.metadata.kernelrelease} {'(cached)' if b.cached else ''}\n  {b.bzimage}\n"
            f"  metadata: {b.dir / 'metadata.json'}"
        )
    return 0


def reproduce(request: Request) -> str:
    return (
        "fab experiment --config "
        + shlex.quote(str(request.config))
        + "".join(f" --set {shlex.quote(s)}" for s in request.sets)
    )


def shard(text: str) -> tuple[int, int]:
    """--shard I/N: host I of N (0 <= I < N)."""
    m = re.fullmatch(r"(\d{1,4})/(\d{1,4})", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard {text!r}: I/N with 0 <= I < N, e.g. 0/2")
    return int(m.group(1)), int(m.group(2))


def run(request: Request, report: bool = False) -> int:
    from .analysis import analyze
    from .config import check_output, describe
    from .report import generate
    from .results.manifest import Manifest
    from .run.run_dir import find_run_dir
    from .run.runner import Runner

    matrix = matrix_of(request)
    if request.shard is not None:
        i, n = shard(request.shard)
        matrix.cells = matrix.shard(i, n)
        log(f"shard {i}/{n}: {len(matrix.cells)} cell(s) on this host")
    console.print(describe(matrix))
    if request.output is not None:
        try:
            check_output(request.output)
        except ValueError as e:
            raise ConfigError(f"--output {e}") from None
    run_dir = find_run_dir(matrix, request.run_id, request.resume, Path(request.output) if request.output else None)
    try:
        Runner(matrix, run_dir, default_cache(), reproduce(request)).run()
    except (HarnessError, KeyboardInterrupt):
        if report and (run_dir / "manifest.json").exists():  # an interrupted run still gets its report
            console.print(f"report of what was measured (incomplete): {generate(run_dir).html}")
        raise
    if report:
        written = generate(run_dir)
        print((run_dir / "report.txt").read_text())
        print(f"report: {written.html}")
    result = written if report else analyze(run_dir, rebuild_tables=True)
    print(f"run directory: {run_dir}")
    status = Manifest.load(run_dir / "manifest.json").status
    if status != "complete":
        console.print(f"[bold red]run {status}[/bold red]: some cells failed; the report lists them", markup=True)
        return 1
    return conclusion(result)


def experiment(request: Request) -> int:
    return run(request, report=True)


def conclusion(result) -> int:
    """A complete run's exit status: 0, or EXIT_INCONCLUSIVE with one line that says where and why."""
    if result.conclusive:
        return 0
    said = [f"no latency samples from {v}" for v in result.unmeasured] + list(result.undelivered.values())
    console.print(
        f"[bold yellow]run complete, but INCONCLUSIVE where it says (exit status {EXIT_INCONCLUSIVE}):[/bold yellow] "
        + "; ".join(said),
        markup=True,
    )
    return EXIT_INCONCLUSIVE


def report(request: Request) -> int:
    from .report import generate

    written = generate(Path(str(request.run)), repetition=request.repetition)
    print((written.run_dir / "report.txt").read_text())
    print(f"report: {written.html}")
    return 0


def compare(request: Request) -> int:
    from .report import compare_runs

    a, b = Path(str(request.run_a)), Path(str(request.run_b))
    out = Path(request.out) if request.out else a.parent / f"compare-{a.name}-{b.name}"
    print(f"comparison: {compare_runs(a, b, out)}")
    return 0


def bisect(request: Request) -> int:
    """The first commit that changed the criterion: its full id and subject are the last line printed."""
    from .bisect.driver import bisect as walk
    from .bisect.driver import make_plan

    result = walk(make_plan(request), default_cache())
    print(result.report.read_text())
    print(f"bisection: {result.report.parent}")
    if result.answer.stopped:
        console.print(f"[bold yellow]nothing to bisect (exit status {EXIT_INCONCLUSIVE})[/bold yellow]", markup=True)
        return EXIT_INCONCLUSIVE
    first = result.answer.first
    print(f"{first[0].sha} {first[0].subject}" if len(first) == 1 else "first bad commit not found: skipped commits")
    return 0 if len(first) == 1 else 1


def fetch(request: Request) -> int:
    raise HarnessError("fetch brings results from lab hosts: give them with fab -H host or --hosts h1,h2")


def perform(request: Request) -> int:
    """Run the request's command here: the function of tasks.py named as the command."""
    task: Callable[[Request], int] = globals()[request.task]
    return task(request)
