"""The harness's own costs on this machine, as figures and ratios.

  python bench/bench.py                  cached build, boot-to-agent per level, probe overhead (quick cells:
                                           root over 9p / virtiofs, L1 RAM preallocated or not)
  python bench/bench.py --repeat 3       the same, each quick cell 3 times (medians and ranges)
  python bench/bench.py --cold           + a cold build and the patched build after it, in a fresh cache
  python bench/bench.py --experiment     + the whole default experiment (warm build cache)
  python bench/bench.py --nested         + the nested A/B (configs/shrinker-ab-nested.yaml, 1 repetition): ready
                                           time per level, exits per L2 entry, A/B wall time
  python bench/bench.py --tracing        + what the sampler's tracing costs the probe (quick cells, on and off)
  python bench/bench.py --parallel [N] --config shrinker-ab-nested --repetitions 3
                                         only: the config run serially and with parallel N (auto): wall times, per cell
                                           boot and wall times and the probe's floor side by side, a 64-core host
  python bench/bench.py --analysis DIR   only: the tables, attribution and the whole report of a finished run (a copy
                                           of DIR), and its clock measurements per level
  python bench/bench.py --config shrinker-ab-distro --packages --cold
                                         the same for another config (here: Debian's kernel, KVM modules built),
                                           + its packages installed again from the archive (apt-get clean first)

Nothing here is asserted; the numbers go into issue notes and the README. Timing claims stay
out of the unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import REPO_ROOT
from harness.config import load
from harness.errors import AccelError
from harness.guest.probe import calibrate
from harness.kernel.build import Builder
from harness.kernel.distro import packages_for
from harness.machine.host import decide_accel, decide_rootfs
from harness.results.manifest import record_path
from harness.util import default_cache

QUICK = [
    "repetitions=1",
    "variants=[{name: baseline}]",
    "workload.probe.size_mb=512",
    "phases=[{name: steady, duration_s: 5}]",
]


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<44} {value:>24}  {note}")


def bench_packages(config: str) -> float:
    """Seconds to download and install the config's packages again (its sources; a distro kernel's image, headers
    and busybox), as a fresh machine would."""
    exp = load(config).experiment
    pkgs = packages_for(exp)
    if exp.distro_kernel:  # the packages themselves, not the metapackages naming them, and what they bring
        img = Builder(exp).image()
        assert img is not None
        r, mm = img.release, f"{img.version.major}.{img.version.minor}"
        pkgs = [p for p in pkgs if not p.endswith("-amd64")]
        pkgs += [f"linux-image-{r}", f"linux-headers-{r}", f"linux-headers-{r.rsplit('-', 1)[0]}-common"]
        pkgs += [f"linux-kbuild-{mm}"]
    print(f"packages of {config}: {' '.join(pkgs)}")
    subprocess.run(["apt-get", "clean"], check=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "install", "-y", "-qq", "--reinstall", "--no-install-recommends", *pkgs]
    _, t = timed(lambda: subprocess.run(apt, check=True, capture_output=True, env=env))
    row("download + install (apt-get --reinstall)", f"{t:.0f} s")
    return t


def bench_builds(cold: bool, config: str) -> float | None:
    """Seconds of the cold baseline + patched builds (with --cold), in a fresh cache removed afterwards."""
    exp = load(config).experiment
    how = (
        f"{exp.distro_kernel.distro} kernel {exp.distro_kernel.release}, KVM modules built"
        if exp.distro_kernel
        else f"{exp.kernel_config.base} + {', '.join(exp.kernel_config.fragments)}"
    )
    print(f"builds ({config}: {how}, {exp.source.path or exp.source.url})")
    if cold:
        cache = Path(tempfile.mkdtemp(prefix="nestpress-bench-cache-"))
        try:
            b = Builder(exp, cache)
            _, t_src = timed(lambda: b.prepare(exp.source))
            row("source unpacked (empty cache)", f"{t_src:.0f} s")
            base, t_cold = timed(lambda: b.build(exp.variants[0]))
            pat, t_pat = timed(lambda: b.build(exp.variants[1]))
            row("cold build (baseline, empty cache)", f"{t_cold:.0f} s", f"{base.metadata.compiles} compiles")
            row(
                "patched build after baseline",
                f"{t_pat:.0f} s",
                f"{pat.metadata.compiles} compiles, {t_pat / t_cold:.1%} of cold",
            )
            _, t_hit = timed(lambda: Builder(exp, cache).build_all())
            row("cached re-run (both variants)", f"{t_hit:.1f} s", f"{t_hit / t_cold:.2%} of cold, 0 compiles")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        Builder(exp, default_cache()).build_all()  # what the runs below use
        return t_src + t_cold + t_pat
    else:
        _, t_hit = timed(lambda: Builder(exp, default_cache()).build_all())
        metas = [
            json.loads((d / "metadata.json").read_text())
            for d in (default_cache() / "builds").iterdir()
            if (d / "metadata.json").exists()
        ]
        for m in metas:
            row(
                f"recorded build of {m['variant']} ({m['key'][:8]})",
                f"{m['duration_s']:.0f} s",
                f"{m['compiles']} compiles",
            )
        row("cached re-run (both variants)", f"{t_hit:.1f} s", "0 compiles")
    return None


def bench_boot_and_probe(repeat: int, config: str) -> None:
    """Quick cells per way of sharing the root (9p, and virtiofs where it can be served), `repeat` times
    each: boot figures under TCG vary by a third from one cell to the next, so medians and ranges."""
    accel = decide_accel("auto").accel
    try:
        kinds = ["9p", decide_rootfs("virtiofs", accel).kind]
    except AccelError:
        kinds = ["9p"]
    l1_overhead = []
    for rootfs, prealloc in [(k, True) for k in kinds] + [(kinds[-1], False)]:
        print(
            f"boot and probe ({accel.upper()}, root over {rootfs}, L1 RAM "
            f"{'preallocated' if prealloc else 'faulted in on demand'}, {repeat} quick cell(s) of {config})"
        )
        cells = [
            quick_cell(config, [f"boot.rootfs={rootfs}", f"topology.l1.prealloc={str(prealloc).lower()}"])
            for _ in range(repeat)
        ]
        for key, label in (
            ("kut", "kernel under test: QEMU start -> agent ready"),
            ("kut_before", "  of which before its kernel ran"),
            ("l1", "L1: QEMU start -> agent ready"),
            ("l1_before", "  of which before its kernel ran"),
            ("cell", "whole quick cell"),
        ):
            row(
                label,
                spread([c[key] for c in cells], "s"),
                "QEMU, firmware, RAM prealloc" if key.endswith("before") else "",
            )
        row("probe overhead per sample in L1", spread([c["probe_ns"] / 1e3 for c in cells], "us", 2))
        l1_overhead += [c["probe_ns"] for c in cells]
    host = calibrate()
    row(
        "probe overhead per sample on this host",
        f"{host['loop_overhead_ns'] / 1e3:.2f} us",
        f"ratio L1/host {statistics.median(l1_overhead) / host['loop_overhead_ns']:.1f}x (median)",
    )


def spread(values: list[float], unit: str, digits: int = 1) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}] {unit}"


def quick_cell(config: str, sets: list[str]) -> dict:
    """Seconds from QEMU start to agent ready per level, and how much of it came before the guest kernel
    ran; the probe's per-sample cost in L1; the whole cell."""
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
        cmd = [sys.executable, "-m", "harness", "run", "--config", config, "--run-id", "bench", "--output", out]
        cmd += [a for s in [*QUICK, *sets] for a in ("--set", s)]
        _, t = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True))
        cell = Path(out) / load(config).experiment.name / "bench" / "cells" / "baseline.r1"
        info = json.loads(record_path(cell.parent.parent, cell.name).read_text())
        l1 = next(e for e in jsonl(cell / "events.jsonl") if e["kind"] == "boot_ready" and e["guest"] == "l1-0")
        header = json.loads((cell / "l1-0" / "probe.jsonl").open().readline())
        passes = [r for r in jsonl(cell / "l1-0" / "probe.jsonl") if r.get("type") == "pass"][1:]  # after warm-up
        return {
            "pass_ms": statistics.median((r["t1"] - r["t0"]) / 1e6 for r in passes) if passes else float("nan"),
            "kut": info["kut_ready_s"],
            "kut_before": info["kut_ready_s"] - info["kut_kernel_s"],
            "l1": l1["seconds"],
            "l1_before": l1["seconds"] - l1["kernel_s"],
            "probe_ns": header["loop_overhead_ns"],
            "cell": t,
        }


def bench_tracing(repeat: int, config: str) -> None:
    """What the sampler's tracing costs the probe: quick cells with a drop-caches phase (so the traced shrinker
    runs on the baseline), tracing on and off, interleaved; the probe's median pass time in L1 after warm-up."""
    print(f"tracing overhead ({config}, {repeat} quick cell(s) each way, steady 6 s + drop-caches 10 s)")
    phases = "phases=[{name: steady, duration_s: 6}, {name: drop-caches, duration_s: 10, pressure: drop-caches}]"
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeat):
        for trace in (True, False):
            runs[trace].append(quick_cell(config, [phases, f"sampler.trace_shrinker={str(trace).lower()}"])["pass_ms"])
    row("L1 probe pass, tracing on", spread(runs[True], "ms"))
    row("L1 probe pass, tracing off", spread(runs[False], "ms"))
    ratio = statistics.median(runs[True]) / statistics.median(runs[False])
    row("tracing on / off", f"{ratio:.3f}", "target <= 1.05 (issue 14)")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def counter_rate(counters: list[dict], name: str, t0_ns: int, t1_ns: int) -> float | None:
    """Per-second rise of one KVM counter of the kernel under test between two instants (debugfs sums cover live
    VMs only, so the window must lie inside one VM's life)."""
    inside = [c for c in counters if t0_ns <= c["t"] <= t1_ns and name in c["v"]]
    if len(inside) < 2:
        return None
    return (inside[-1]["v"][name] - inside[0]["v"][name]) / ((inside[-1]["t"] - inside[0]["t"]) / 1e9)


def bench_nested() -> None:
    """The nested A/B (configs/shrinker-ab-nested.yaml, one repetition per variant): ready time per level, what
    one L2 entry costs the kernel under test's KVM, and the wall time of the whole A/B."""
    print(f"nested A/B ({decide_accel('auto').accel.upper()}, configs/shrinker-ab-nested.yaml, 1 repetition)")
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
        cmd = [sys.executable, "-m", "harness", *"run --config shrinker-ab-nested --run-id nested".split()]
        cmd += ["--output", out, "--set", "repetitions=1"]
        r, t = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True))
        for cell in sorted((Path(out) / "shrinker-ab-nested" / "nested" / "cells").iterdir()):
            info = json.loads(record_path(cell.parent.parent, cell.name).read_text())
            kut_ev, l1_ev = jsonl(cell / "events.jsonl"), jsonl(cell / "l1-0" / "events.jsonl")
            ready = {e["guest"]: e for e in kut_ev + l1_ev if e["kind"] == "boot_ready"}
            row(f"{cell.name}: kernel under test ready", f"{info.get('kut_ready_s', 0):.1f} s", info["status"])
            for guest, label in (("l1-0", "L1"), ("l1-0.l2-0", "L2")):
                e = ready.get(guest)
                row(
                    f"{cell.name}: {label} QEMU start -> agent ready",
                    f"{e['seconds']:.1f} s" if e else "not ready",
                    f"its kernel's share {e['kernel_s']:.1f} s" if e and e.get("kernel_s") else "",
                )
            steady = next((e for e in kut_ev if e["kind"] == "phase_start" and e["phase"] == "steady"), None)
            if steady:
                t0, t1 = steady["t"], steady["t"] + int(steady["duration_s"] * 1e9)
                counters = jsonl(cell / "counters.jsonl")
                rates = {
                    k: counter_rate(counters, f"kvm.{k}", t0, t1) for k in ("exits", "nested_run", "insn_emulation")
                }
                if rates["nested_run"] and rates["exits"] is not None:
                    row(
                        f"{cell.name}: exits per L2 entry (steady)",
                        f"{rates['exits'] / rates['nested_run']:.1f}",
                        f"{rates['nested_run']:.0f} L2 entries/s, {rates['insn_emulation']:.0f} emulated "
                        "instructions/s",
                    )
        row("nested A/B wall time", f"{t / 60:.1f} min", f"harness exit status {r.returncode}; target <= 25 min")


def cell_figures(run_dir: Path) -> list[dict]:
    """Per cell of a finished run: its wall time, its kernel under test's boot, and the probe's floor (the
    median pass after warm-up, at the first probed level that has one)."""
    out = []
    for cell in sorted((run_dir / "cells").iterdir()):
        info = json.loads(record_path(run_dir, cell.name).read_text())
        floor = None
        for probe in sorted(cell.glob("**/probe.jsonl")):
            passes = [r for r in jsonl(probe) if r.get("type") == "pass"][1:]
            if passes:
                floor = statistics.median((r["t1"] - r["t0"]) / 1e6 for r in passes)
                break
        wall = (info["finished"] - info["started"]) if info.get("finished") and info.get("started") else None
        out.append({"cell": cell.name, "wall": wall, "boot": info.get("kut_ready_s"), "floor": floor})
    return out


def bench_parallel(config: str, repetitions: int, side_by_side: str = "auto") -> None:
    """The same run serially and side by side (`side_by_side`: auto or N): what sharing the host costs each
    cell, what it saves the run, and what a 64-core, 256 GiB host would hold."""
    from harness.run.slots import decide

    matrix = load(config, [f"repetitions={repetitions}"])
    print(f"serial vs parallel ({config}, {repetitions} repetition(s), {len(matrix.cells)} cells)")
    walls: dict[str, float] = {}
    figures: dict[str, list[dict]] = {}
    for parallel in ("1", side_by_side):
        with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
            cmd = [sys.executable, "-m", "harness", "run", "--config", config, "--run-id", "par", "--output", out]
            cmd += ["--set", f"repetitions={repetitions}", "--parallel", parallel]
            r, walls[parallel] = timed(lambda c=cmd: subprocess.run(c, cwd=REPO_ROOT, capture_output=True, text=True))
            run_dir = Path(out) / matrix.experiment.name / "par"
            said = json.loads((run_dir / "manifest.json").read_text())["parallel"]
            figures[parallel] = cell_figures(run_dir)
            row(f"parallel {parallel}: wall time", f"{walls[parallel] / 60:.1f} min", f"exit {r.returncode}; {said}")
    for key, label, unit in (
        ("wall", "cell wall", "s"),
        ("boot", "kernel under test boot", "s"),
        ("floor", "probe floor", "ms"),
    ):
        one = [c[key] for c in figures["1"] if c[key] is not None]
        par = [c[key] for c in figures[side_by_side] if c[key] is not None]
        if one and par:
            ratio = statistics.median(par) / statistics.median(one)
            row(f"{label}: serial | parallel", f"{spread(one, unit)} | {spread(par, unit)}", f"ratio {ratio:.2f}")
    row("run: parallel / serial", f"{walls[side_by_side] / walls['1']:.2f}")
    big = decide("auto", matrix.cells, list(range(64)), 256 << 10)  # a lab host
    shared = [c["wall"] for c in figures[side_by_side] if c["wall"]]
    cell_s = statistics.median(shared) if shared else 0.0
    waves = -(-len(matrix.cells) // big.n)
    row(
        "a 64-core, 256 GiB host (estimate)",
        f"{waves * cell_s / 60:.1f} min",
        f"{big.n} cells at a time, {waves} wave(s) at this host's shared per-cell time",
    )


def bench_analysis(run_dir: Path) -> None:
    """What a finished run costs to analyse (target: attribution < 30 s), and how well its clocks agreed."""
    from harness.analysis.attribution import attribute, clock_summary
    from harness.config import Experiment
    from harness.report import generate
    from harness.results import tables as results
    from harness.results.manifest import Manifest

    print(f"analysis of {run_dir}")
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run_dir, copy)
        frames, t_tables = timed(lambda: results.collect(copy))
        m = Manifest.load(copy / "manifest.json")
        exp = Experiment.model_validate(m.expanded)
        a, t_attr = timed(lambda: attribute(frames, exp, m.baseline))
        _, t_report = timed(lambda: generate(copy, rebuild_tables=False))
    row("tables from the raw outputs", f"{t_tables:.1f} s", f"{len(frames['events'])} events")
    row("attribution", f"{t_attr:.2f} s", f"{len(a.spikes)} spikes, {len(a.windows)} cause windows; target < 30 s")
    row("whole report (plots included)", f"{t_report:.1f} s")
    for _, c in clock_summary(frames["clocks"]).iterrows():
        row(
            f"clock of {c['level']} vs the kernel under test",
            f"worst ±{c['worst_uncertainty_ms']:.3f} ms",
            f"{c['samples']} measurements",
        )


def bench_experiment(cold_builds_s: float | None, config: str) -> None:
    print(f"whole experiment ({config}, warm build cache)")
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
        cmd = [sys.executable, "-m", "harness", "experiment", "--config", config, "--output", out]
        _, t = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True))
        row("default experiment, warm build cache", f"{t / 60:.1f} min", "target <= 20 min on 2 cores/TCG")
    if cold_builds_s is not None:
        row(
            "default experiment, cold build cache",
            f"{(t + cold_builds_s) / 60:.1f} min",
            "the cold builds above + the run; packages not included",
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--experiment", action="store_true")
    ap.add_argument("--nested", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="quick cells per boot configuration")
    ap.add_argument("--config", default="shrinker-ab", help="the experiment whose builds, boots and run are timed")
    ap.add_argument("--packages", action="store_true", help="+ its packages downloaded and installed again (root)")
    ap.add_argument("--tracing", action="store_true", help="+ the sampler's tracing on and off: the probe's cost")
    ap.add_argument(
        "--parallel", nargs="?", const="auto", metavar="N", help="only: the config serially and with parallel N (auto)"
    )
    ap.add_argument("--repetitions", type=int, default=2, help="repetitions of --parallel's runs")
    ap.add_argument("--analysis", type=Path, metavar="RUN_DIR", help="only: analysis costs of a finished run")
    a = ap.parse_args()
    if a.analysis:
        bench_analysis(a.analysis)
        return
    if a.parallel:
        bench_parallel(a.config, a.repetitions, a.parallel)
        return
    print(f"nestpress bench on {os.uname().nodename}: {os.cpu_count()} CPUs, cache {default_cache()}")
    if a.packages:
        bench_packages(a.config)
    cold_builds_s = bench_builds(a.cold, a.config)
    bench_boot_and_probe(a.repeat, a.config)
    if a.tracing:
        bench_tracing(a.repeat, a.config)
    if a.nested:
        bench_nested()
    if a.experiment:
        bench_experiment(cold_builds_s, a.config)


if __name__ == "__main__":
    main()
