"""`python -m harness <command>`: the library as a program. fabfile.py runs these locally or on lab hosts."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from . import REPO_ROOT
from .errors import ConfigError, HarnessError
from .util import SETUP_PACKAGES, console, debian_packages, default_cache, log


def _matrix(args):
    from .config import load

    return load(args.config, args.set)


def cmd_doctor(args) -> int:
    from .machine.host import doctor

    d = doctor(default_cache())
    print(json.dumps(d.as_dict(), indent=2) if args.json else d.text())
    return 0 if d.ready or not args.strict else 1


def cmd_validate(args) -> int:
    from .config import describe
    from .kernel.build import check_inputs
    from .machine.host import decide_environment
    from .run.schedule import check

    matrix = _matrix(args)
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


def cmd_build(args) -> int:
    from .kernel.build import Builder

    matrix = _matrix(args)
    for name, b in Builder(matrix.experiment, default_cache()).build_all().items():
        print(
            f"{name}: {b.metadata.get('kernelrelease')} {'(cached)' if b.cached else ''}\n  {b.bzimage}\n"
            f"  metadata: {b.dir / 'metadata.json'}"
        )
    return 0


def _reproduce(args) -> str:
    return (
        "fab experiment --config "
        + shlex.quote(str(args.config))
        + "".join(f" --set {shlex.quote(s)}" for s in args.set or [])
    )


MAX_CELLS_UNASKED = 100
EXIT_INCONCLUSIVE = 3  # every cell complete, but a phase did not deliver its pressure or a variant measured nothing


def check_size(matrix, yes: bool) -> None:
    """A matrix that would run for days is said before it starts, and run only when confirmed."""
    n = len(matrix.cells)
    if n > MAX_CELLS_UNASKED and not yes:
        hours = sum(120 + sum(p.duration_s for p in c.config.phases) for c in matrix.cells) / 3600
        raise ConfigError(f"{n} cells, roughly {hours:.0f} h under TCG or less with KVM: pass --yes to run them")


def cmd_run(args, report: bool = False) -> int:
    from .analysis import analyze
    from .analysis.stats import VALIDITY
    from .report import generate, render
    from .results.manifest import Manifest

    matrix = _matrix(args)
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        matrix.cells = matrix.shard(i, n)
        log(f"shard {i}/{n}: {len(matrix.cells)} cell(s) on this host")
    from .config import check_output, describe
    from .run.runner import Runner, find_run_dir

    console.print(describe(matrix))
    check_size(matrix, args.yes)
    if args.output:
        try:
            check_output(args.output)
        except ValueError as e:
            raise ConfigError(f"--output {e}") from None
    run_dir = find_run_dir(matrix, args.run_id, args.resume, Path(args.output) if args.output else None)
    try:
        Runner(matrix, run_dir, default_cache(), _reproduce(args)).run()
    except (HarnessError, KeyboardInterrupt):
        if report and (run_dir / "manifest.json").exists():  # an interrupted run still gets its report
            console.print(f"report of what was measured (incomplete): {generate(run_dir).html}")
        raise
    if report:
        written = generate(run_dir)
        print(f"verdict ({VALIDITY[written.manifest.tcg]}):\n\n{render.verdict_markdown(written.ab)}\n")
        print(f"report: {written.html}")
    result = written if report else analyze(run_dir, rebuild_tables=True)
    print(f"run directory: {run_dir}")
    status = Manifest.load(run_dir / "manifest.json").status
    if status != "complete":
        console.print(f"[bold red]run {status}[/bold red]: some cells failed; the report lists them", markup=True)
        return 1
    return conclusion(result)


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


def cmd_report(args) -> int:
    from .report import generate

    print(f"report: {generate(Path(args.run), repetition=args.repetition).html}")
    return 0


def cmd_compare(args) -> int:
    from .report import compare_runs

    out = Path(args.out or Path(args.run_a).parent / f"compare-{Path(args.run_a).name}-{Path(args.run_b).name}")
    print(f"comparison: {compare_runs(Path(args.run_a), Path(args.run_b), out)}")
    return 0


def cmd_setup(args) -> int:
    """Install what the harness needs on this host (Debian/Ubuntu): system packages and kernel sources."""
    from .config import load, resolve_config_path
    from .kernel.distro import packages_for

    needs = packages_for(load(resolve_config_path(args.config)).experiment) if args.config else []
    pkgs = SETUP_PACKAGES + debian_packages(list(dict.fromkeys([*(args.extra or []), *needs])))
    if os.geteuid() != 0:
        raise HarnessError("setup installs Debian packages: run it as root (or with sudo)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs], check=True, env=env)
    subprocess.run(["bash", str(REPO_ROOT / "harness" / "setup_qemu.sh")], check=True, env=env)
    print("installed: " + " ".join(pkgs) + " (and QEMU >= 10 where the distribution has it: harness/setup_qemu.sh)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestpress", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp):
        sp.add_argument("--config", required=True, help="experiment YAML (path, or name under configs/)")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value (YAML), e.g. repetitions=1 or phases.global.duration_s=5",
        )
        return sp

    d = sub.add_parser("doctor", help="host readiness: accel decision and reasons, nested, QEMU, tools")
    d.add_argument("--json", action="store_true")
    d.add_argument("--strict", action="store_true", help="exit 1 when the host is not ready")
    with_config(sub.add_parser("validate", help="validate a config and print the expanded plan"))
    with_config(sub.add_parser("build", help="build every variant (cached)"))
    for name, helptext in (
        ("run", "run the cells of an experiment (builds first, cached)"),
        ("experiment", "build + run + report"),
    ):
        r = with_config(sub.add_parser(name, help=helptext))
        r.add_argument("--run-id", help="run directory name; an existing one is resumed")
        r.add_argument("--resume", action="store_true", help="resume the newest run of this config")
        r.add_argument("--shard", help="I/N: run only every N-th repetition block, starting at I (fleet runs)")
        r.add_argument("--output", help="results root (default: the config's output)")
        r.add_argument("--yes", action="store_true", help=f"run a matrix of more than {MAX_CELLS_UNASKED} cells")
    rp = sub.add_parser("report", help="regenerate tables, plots and report from a run directory")
    rp.add_argument("--run", required=True)
    rp.add_argument("--repetition", type=int, help="timeline and counters of this repetition only (default: all)")
    c = sub.add_parser("compare", help="two runs side by side")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out")
    s = sub.add_parser("setup", help="apt-get install what the harness needs (root)")
    s.add_argument("--extra", nargs="*", help="more packages, e.g. linux-source-6.1")
    s.add_argument("--config", help="also what this config needs (its sources; a distro_kernel's packages)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {
        "doctor": cmd_doctor,
        "validate": cmd_validate,
        "build": cmd_build,
        "run": cmd_run,
        "experiment": lambda a: cmd_run(a, report=True),
        "report": cmd_report,
        "compare": cmd_compare,
        "setup": cmd_setup,
    }
    try:
        return handlers[args.cmd](args)
    except HarnessError as e:
        console.print(f"[bold red]error:[/bold red] {e}", markup=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/bold red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
