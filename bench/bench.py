"""The harness's own costs on this machine, as figures and ratios.

  python bench/bench.py                  cached build, boot-to-agent per level, probe overhead (quick cells:
                                           root over 9p / virtiofs, L1 RAM preallocated or not)
  python bench/bench.py --repeat 3       the same, each quick cell 3 times (medians and ranges)
  python bench/bench.py --cold           + a cold build and the patched build after it, in a fresh cache
  python bench/bench.py --experiment     + the whole default experiment (warm build cache)
  python bench/bench.py --nested         + how far an L2 gets under the `nested` topology in --nested-s
                                           seconds, and the exit rates into the kernel under test's KVM

Nothing here is asserted; the numbers go into issue notes and the README. Timing claims stay
out of the unit tests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import REPO_ROOT  # noqa: E402
from harness.build import Builder  # noqa: E402
from harness.config import load  # noqa: E402
from harness.guest.probe import calibrate  # noqa: E402
from harness.host import decide_accel, decide_rootfs  # noqa: E402
from harness.util import default_cache  # noqa: E402

QUICK = ["repetitions=1", "variants=[{name: baseline}]", "workload.probe.size_mb=512",
         "phases=[{name: steady, duration_s: 5}]"]


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<44} {value:>24}  {note}")


def bench_builds(cold: bool) -> float | None:
    """Seconds of the cold baseline + patched builds (with --cold), in a fresh cache removed afterwards."""
    print("builds (configs/shrinker-ab.yaml: tinyconfig + configs/kernel/kvm-host.config, Debian 6.1)")
    exp = load("shrinker-ab").experiment
    if cold:
        cache = Path(tempfile.mkdtemp(prefix="nestpress-bench-cache-"))
        try:
            b = Builder(exp, cache)
            base, t_cold = timed(lambda: b.build(exp.variants[0]))
            pat, t_pat = timed(lambda: b.build(exp.variants[1]))
            row("cold build (baseline, empty cache)", f"{t_cold:.0f} s", f"{base.metadata['compiles']} compiles")
            row("patched build after baseline", f"{t_pat:.0f} s",
                f"{pat.metadata['compiles']} compiles, {t_pat / t_cold:.1%} of cold")
            _, t_hit = timed(lambda: Builder(exp, cache).build_all())
            row("cached re-run (both variants)", f"{t_hit:.1f} s", f"{t_hit / t_cold:.2%} of cold, 0 compiles")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        Builder(exp, default_cache()).build_all()     # what the runs below use
        return t_cold + t_pat
    else:
        _, t_hit = timed(lambda: Builder(exp, default_cache()).build_all())
        metas = [json.loads((d / "metadata.json").read_text()) for d in (default_cache() / "builds").iterdir()
                 if (d / "metadata.json").exists()]
        for m in metas:
            row(f"recorded build of {m['variant']} ({m['key'][:8]})", f"{m['duration_s']:.0f} s",
                f"{m['compiles']} compiles")
        row("cached re-run (both variants)", f"{t_hit:.1f} s", "0 compiles")
    return None


def bench_boot_and_probe(repeat: int) -> None:
    """Quick cells per way of sharing the root (9p, and virtiofs where it can be served), `repeat` times
    each: boot figures under TCG vary by a third from one cell to the next, so medians and ranges."""
    accel = decide_accel("auto").accel
    kinds = ["9p"] + (["virtiofs"] if decide_rootfs().kind == "virtiofs" else [])
    l1_overhead = []
    for rootfs, prealloc in [(k, True) for k in kinds] + [(kinds[-1], False)]:
        print(f"boot and probe ({accel.upper()}, root over {rootfs}, L1 RAM "
              f"{'preallocated' if prealloc else 'faulted in on demand'}, {repeat} quick cell(s) of shrinker-ab)")
        cells = [quick_cell([f"boot.rootfs={rootfs}", f"topology.l1.prealloc={str(prealloc).lower()}"])
                 for _ in range(repeat)]
        for key, label in (("kut", "kernel under test: QEMU start -> agent ready"),
                           ("kut_before", "  of which before its kernel ran"),
                           ("l1", "L1: QEMU start -> agent ready"),
                           ("l1_before", "  of which before its kernel ran"), ("cell", "whole quick cell")):
            row(label, spread([c[key] for c in cells], "s"),
                "QEMU, firmware, RAM prealloc" if key.endswith("before") else "")
        row("probe overhead per sample in L1", spread([c["probe_ns"] / 1e3 for c in cells], "us", 2))
        l1_overhead += [c["probe_ns"] for c in cells]
    host = calibrate()
    row("probe overhead per sample on this host", f"{host['loop_overhead_ns'] / 1e3:.2f} us",
        f"ratio L1/host {statistics.median(l1_overhead) / host['loop_overhead_ns']:.1f}x (median)")


def spread(values: list[float], unit: str, digits: int = 1) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}] {unit}"


def quick_cell(sets: list[str]) -> dict:
    """Seconds from QEMU start to agent ready per level, and how much of it came before the guest kernel
    ran; the probe's per-sample cost in L1; the whole cell."""
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
        cmd = [sys.executable, "-m", "harness", "run", "--config", "shrinker-ab", "--output", out, "--run-id", "bench",
               *[a for s in [*QUICK, *sets] for a in ("--set", s)]]
        _, t = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True))
        cell = Path(out) / "shrinker-ab" / "bench" / "cells" / "baseline.r1"
        info = json.loads((cell / "cell.json").read_text())
        l1 = next(e for e in jsonl(cell / "events.jsonl") if e["kind"] == "boot_ready" and e["guest"] == "l1-0")
        header = json.loads((cell / "l1-0" / "probe.jsonl").open().readline())
        return {"kut": info["kut_ready_s"], "kut_before": info["kut_ready_s"] - info["kut_kernel_s"],
                "l1": l1["seconds"], "l1_before": l1["seconds"] - l1["kernel_s"],
                "probe_ns": header["loop_overhead_ns"], "cell": t}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_printk_s(console: Path) -> float:
    stamps = re.findall(r"^\[\s*(\d+\.\d+)\]", console.read_text(errors="replace"), re.M) if console.exists() else []
    return float(stamps[-1]) if stamps else 0.0


def exit_rates(counters: list[dict], t0_ns: int, t1_ns: int) -> dict[str, float]:
    """Per-second rates of the KVM exit counters of the kernel under test between two instants."""
    inside = [c for c in counters if t0_ns <= c["t"] <= t1_ns]
    # KVM's debugfs sums cover live VMs only: a guest that died takes its counts with it
    alive = next((i for i in range(1, len(inside)) if inside[i]["v"].get("kvm.exits", 0)
                  < inside[i - 1]["v"].get("kvm.exits", 0)), len(inside))
    inside = inside[:alive]
    if len(inside) < 2:
        return {}
    a, b = inside[0], inside[-1]
    secs = (b["t"] - a["t"]) / 1e9
    return {k: (b["v"].get(k, 0) - a["v"].get(k, 0)) / secs for k in ("kvm.exits", "kvm.nested_run", "kvm.pf_fixed",
                                                                      "kvm.insn_emulation", "kvm.io_exits")}


def bench_nested(limit_s: int) -> None:
    """One nested cell with a small L2: boot times per level, and how fast L2 runs relative to L1."""
    print(f"nested topology ({decide_accel('auto').accel.upper()}): L2 boot, at most {limit_s} s")
    sets = ["repetitions=1", "variants=[{name: baseline}]", "topology.kind=nested", "topology.l2.memory_mb=256",
            "workload.probe.levels=[l2]", "workload.probe.size_mb=128", f"boot.timeout_s.l2={limit_s}",
            "boot.retries=0", "phases=[{name: steady, duration_s: 5}]"]
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
        cmd = [sys.executable, "-m", "harness", "run", "--config", "shrinker-ab", "--output", out, "--run-id", "nested",
               *[a for s in sets for a in ("--set", s)]]
        r, t = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True))
        cell = Path(out) / "shrinker-ab" / "nested" / "cells" / "baseline.r1"
        kut_ev, l1_ev = jsonl(cell / "events.jsonl"), jsonl(cell / "l1-0" / "events.jsonl")
        l1_start = next(e for e in kut_ev if e["kind"] == "boot_start")
        l1_ready = next(e for e in kut_ev if e["kind"] == "boot_ready")
        l2_start = next(e for e in l1_ev if e["kind"] == "boot_start")
        l2_end = next((e for e in l1_ev if e["kind"] in ("boot_ready", "boot_failed")), None)
        row("L1: QEMU start -> agent ready", f"{l1_ready['seconds']:.1f} s",
            f"its kernel's clock reached {last_printk_s(cell / 'l1-0' / 'console.log'):.1f} s by the end")
        l2_wall = ((l2_end["t"] if l2_end else time.time_ns()) - l2_start["t"]) / 1e9
        l2_clock = last_printk_s(cell / "l1-0" / "l2-0" / "console.log")
        row("L2: QEMU start -> agent ready", f"{l2_end['seconds']:.1f} s" if l2_end and "seconds" in l2_end
            else "not ready", f"after {l2_wall:.0f} s wall its kernel's clock read {l2_clock:.1f} s")
        for e in (e for e in kut_ev if e["kind"] == "guest_died"):
            row(f"{e['guest']} died", f"{(e['t'] - l2_start['t']) / 1e9:.0f} s", f"after L2's QEMU started: {e['error']}")
        counters = jsonl(cell / "counters.jsonl")
        for label, a, b in (("L1 booting", l1_start["t"], l1_ready["t"]),
                            ("L2 booting", l2_start["t"], l2_end["t"] if l2_end else time.time_ns())):
            rates = exit_rates(counters, a, b)
            if rates:
                row(f"exits into the kernel under test, {label}", f"{rates['kvm.exits']:.0f} /s",
                    ", ".join(f"{k.split('.')[1]} {v:.0f}/s" for k, v in rates.items() if k != "kvm.exits"))
        row("whole nested cell", f"{t:.0f} s", f"harness exit status {r.returncode}")


def bench_experiment(cold_builds_s: float | None) -> None:
    print("default experiment (configs/shrinker-ab.yaml, warm build cache)")
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
        cmd = [sys.executable, "-m", "harness", "experiment", "--config", "shrinker-ab", "--output", out]
        _, t = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True))
        row("default experiment, warm build cache", f"{t / 60:.1f} min", "target <= 20 min on 2 cores/TCG")
    if cold_builds_s is not None:
        row("default experiment, cold build cache", f"{(t + cold_builds_s) / 60:.1f} min",
            "the cold builds above + the run; packages not included; target <= 45 min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--experiment", action="store_true")
    ap.add_argument("--nested", action="store_true")
    ap.add_argument("--nested-s", type=int, default=600, help="how long L2 may take to boot")
    ap.add_argument("--repeat", type=int, default=1, help="quick cells per boot configuration")
    a = ap.parse_args()
    print(f"nestpress bench on {os.uname().nodename}: {os.cpu_count()} CPUs, cache {default_cache()}")
    cold_builds_s = bench_builds(a.cold)
    bench_boot_and_probe(a.repeat)
    if a.nested:
        bench_nested(a.nested_s)
    if a.experiment:
        bench_experiment(cold_builds_s)


if __name__ == "__main__":
    main()
