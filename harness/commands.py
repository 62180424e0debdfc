"""The one command table: every command and its options, declared once. The command line (cli.py), the fab tasks
(fabfile.py) and the requests a lab host is sent (lab/fleet.py) are all made from it; a command runs as one
function of one typed Request (tasks.py), here, and on a lab host from the argv the table makes of it.

Each Option names its Request field, its flag, its kind and what it means; `lab` options say where a fab task
runs (hosts, keys) and never reach the command itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError

Where = Literal["anywhere", "local", "hosts"]  # hosts: only meaningful with lab hosts (fetch)


@dataclass(frozen=True)
class Option:
    field: str  # the Request's field
    help: str
    kind: type = str  # str, int, bool (a switch) or list (repeatable)
    default: Any = None
    required: bool = False
    positional: bool = False
    flag: str | None = None  # the command line's spelling, when not the field's with dashes

    @property
    def name(self) -> str:
        return self.flag or self.field.replace("_", "-")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: tuple[Option, ...]
    where: Where = "anywhere"
    detached: bool = False  # on lab hosts: runs detached, sharded across them (run, experiment)


@dataclass
class Request:
    """One command with its options' values, as typed as the table declares them."""

    task: str
    config: str | None = None
    sets: list[str] = field(default_factory=list)
    run_id: str | None = None
    resume: bool = False
    shard: str | None = None
    output: str | None = None
    parallel: str | None = None
    yes: bool = False
    json: bool = False
    strict: bool = False
    extra: list[str] = field(default_factory=list)
    experiment: str | None = None
    run: str | None = None
    repetition: int | None = None
    good: str | None = None
    bad: str | None = None
    criterion: str | None = None
    on_crash: str | None = None
    run_a: str | None = None
    run_b: str | None = None
    out: str | None = None

    @property
    def command(self) -> Command:
        return COMMANDS[self.task]

    def argv(self) -> list[str]:
        """The request as `python -m harness` takes it (what a lab host is sent)."""
        args = [self.task]
        for opt in self.command.options:
            value = getattr(self, opt.field)
            if opt.positional:
                args.append(str(value))
            elif opt.kind is bool:
                args += [f"--{opt.name}"] if value else []
            elif opt.kind is list:
                args += [a for v in value for a in (f"--{opt.name}", str(v))]
            elif value is not None:
                args += [f"--{opt.name}", str(value)]
        return args

    @classmethod
    def of(cls, task: str, values: dict[str, Any]) -> Request:
        """A request from option values by field (unknown fields are a programming error, not input)."""
        if task not in COMMANDS:
            raise ConfigError(f"no command {task!r} (commands: {', '.join(COMMANDS)})")
        known = {f.name for f in fields(cls)}
        return cls(task=task, **{k: v for k, v in values.items() if k in known})


CONFIG = Option("config", "experiment YAML (a path, or a name under configs/, e.g. shrinker-ab)", required=True)
SETS = Option(
    "sets",
    "override a config value (YAML), repeatable: --set repetitions=1 --set phases.global.duration_s=5",
    kind=list,
    flag="set",
)
RUN = (
    Option("run_id", "run directory name; an existing one is resumed (complete cells are skipped)"),
    Option("resume", "resume the newest run of this config", kind=bool),
    Option("shard", "I/N: run only every N-th repetition block, starting at I (fleet runs)"),
    Option("output", "results root (default: the config's output)"),
    Option("parallel", "cells at once here: auto or N (the config's parallel; a repetition's variants together)"),
    Option("yes", "run a matrix of more than 100 cells (otherwise its size and time are said, and nothing runs)", bool),
)

COMMANDS = {
    c.name: c
    for c in (
        Command(
            "doctor",
            "host readiness: accelerator and topology decisions with their reasons, QEMUs, tools, memory, disk",
            (
                Option("json", "print JSON (keys include accel, topologies and qemu)", bool),
                Option("strict", "exit 1 when the host is not ready", bool),
            ),
        ),
        Command(
            "setup",
            "install what the harness needs (harness/packages.txt), the QEMUs, and what a config needs (as root)",
            (
                Option("extra", "more Debian packages, repeatable (e.g. linux-source-6.12)", kind=list),
                Option(
                    "config",
                    "also what this config needs: its source packages; a distro_kernel's image, headers and busybox",
                    default="shrinker-ab",
                ),
            ),
        ),
        Command("validate", "validate an experiment config and print the expanded matrix", (CONFIG, SETS)),
        Command("build", "build every variant the config names (cached)", (CONFIG, SETS)),
        Command("run", "run the cells of an experiment (builds first, cached)", (CONFIG, SETS, *RUN), detached=True),
        Command(
            "experiment",
            "build + run + report",
            (Option("config", CONFIG.help, default="shrinker-ab"), SETS, *RUN),
            detached=True,
        ),
        Command(
            "bisect",
            "find the first commit between --good and --bad that changed the criterion (a git source); the same "
            "command resumes it",
            (
                CONFIG,
                Option("good", "a commit (ref) where the criterion is as it was", required=True),
                Option("bad", "a later commit (ref) where it changed", required=True),
                SETS,
                Option(
                    "criterion",
                    "what a commit is judged by (default: the config's bisect.criterion): hypothesis, "
                    "metric:PHASE:LEVEL:METRIC (metric:global:l1:touch p99.9) or evidence:PHASE:COUNTER[>N]",
                ),
                Option("on_crash", "a commit whose kernel under test crashes: skip or bad (default: bisect.on_crash)"),
                Option("run_id", "the bisection's directory name (default: bisect-<good>-<bad>)"),
                Option("output", "results root (default: the config's output)"),
            ),
            detached=True,
        ),
        Command(
            "fetch",
            "bring a run's results from the host(s) into the local results/ tree and regenerate its report",
            (Option("experiment", "experiment name", required=True), Option("run_id", "run id", required=True)),
            where="hosts",
        ),
        Command(
            "report",
            "regenerate tables, plots, report.md and report.html from a run directory (no rerun; always local)",
            (
                Option("run", "run directory, results/<experiment>/<run-id>", required=True),
                Option("repetition", "timeline and counters of this repetition only (default: every one)", int),
            ),
            where="local",
        ),
        Command(
            "compare",
            "put two runs side by side: verdicts and p99s (always local)",
            (
                Option("run_a", "first run directory", positional=True, required=True),
                Option("run_b", "second run directory", positional=True, required=True),
                Option("out", "where the comparison goes (default: beside the first run)"),
            ),
            where="local",
        ),
    )
}
