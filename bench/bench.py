"""The harness's own costs on this machine, as figures and ratios.

  python bench/bench.py                  cached build, boot-to-agent per level, probe overhead (one quick cell)
  python bench/bench.py --cold           + a cold build and the patched build after it, in a fresh cache
  python bench/bench.py --experiment     + the whole default experiment (warm build cache)

Nothing here is asserted; the numbers go into issue notes and the README. Timing claims stay
out of the unit tests.
"""
from __future__ import annotations

import argparse
import json
import os
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
from harness.host import decide_accel  # noqa: E402
from harness.util import default_cache  # noqa: E402

QUICK = ["repetitions=1", "variants=[{name: baseline}]", "workload.probe.size_mb=512",
         "phases=[{name: steady, duration_s: 5}]"]


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<44} {value:>14}  {note}")


def bench_builds(cold: bool) -> None:
    print("builds (configs/shrinker-ab.yaml: tinyconfig + configs/kernel/kvm-host.config, Debian 6.1)")
    exp = load("shrinker-ab").experiment
    if cold:
        cache = Path(tempfile.mkdtemp(prefix="nestpress-bench-cache-"))
        b = Builder(exp, cache)
        base, t_cold = timed(lambda: b.build(exp.variants[0]))
        pat, t_pat = timed(lambda: b.build(exp.variants[1]))
        row("cold build (baseline, empty cache)", f"{t_cold:.0f} s", f"{base.metadata['compiles']} compiles")
        row("patched build after baseline", f"{t_pat:.0f} s",
            f"{pat.metadata['compiles']} compiles, {t_pat / t_cold:.1%} of cold")
        _, t_hit = timed(lambda: Builder(exp, cache).build_all())
        row("cached re-run (both variants)", f"{t_hit:.1f} s", f"{t_hit / t_cold:.2%} of cold, 0 compiles")
    else:
        _, t_hit = timed(lambda: Builder(exp, default_cache()).build_all())
        metas = [json.loads((d / "metadata.json").read_text()) for d in (default_cache() / "builds").iterdir()
                 if (d / "metadata.json").exists()]
        for m in metas:
            row(f"recorded build of {m['variant']} ({m['key'][:8]})", f"{m['duration_s']:.0f} s",
                f"{m['compiles']} compiles")
        row("cached re-run (both variants)", f"{t_hit:.1f} s", "0 compiles")


def bench_boot_and_probe() -> None:
    accel = decide_accel("auto").accel
    print(f"boot and probe ({accel.upper()}, one quick cell of shrinker-ab)")
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
        cmd = [sys.executable, "-m", "harness", "run", "--config", "shrinker-ab", "--output", out, "--run-id", "bench",
               *[a for s in QUICK for a in ("--set", s)]]
        _, t = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True))
        cell = Path(out) / "shrinker-ab" / "bench" / "cells" / "baseline.r1"
        info = json.loads((cell / "cell.json").read_text())
        row("kernel under test: QEMU start -> agent ready", f"{info['kut_ready_s']:.1f} s")
        for line in (cell / "events.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["kind"] == "boot_ready":
                row(f"{e['guest']}: QEMU start -> agent ready", f"{e['seconds']:.1f} s")
            if e["kind"] == "probes_warm":
                row("first probe pass done (working set populated)", "", "")
        header = json.loads((cell / "l1-0" / "probe.jsonl").open().readline())
        passes = [json.loads(l) for l in (cell / "l1-0" / "probe.jsonl").read_text().splitlines() if '"pass"' in l
                  and '"type": "pass"' in l]
        row("probe overhead per sample in L1", f"{header['loop_overhead_ns'] / 1e3:.2f} us",
            f"clock resolution {header['clock_resolution_ns']:.0f} ns")
        if len(passes) > 1:
            p = passes[-1]
            row("steady pass in L1", f"{(p['t1'] - p['t0']) / 1e9:.2f} s", f"{p['touches']} touches")
        row("whole quick cell", f"{t:.0f} s")
    host = calibrate()
    row("probe overhead per sample on this host", f"{host['loop_overhead_ns'] / 1e3:.2f} us",
        f"ratio L1/host {header['loop_overhead_ns'] / host['loop_overhead_ns']:.1f}x")


def bench_experiment() -> None:
    print("default experiment (configs/shrinker-ab.yaml, warm build cache)")
    with tempfile.TemporaryDirectory(prefix="nestpress-bench-") as out:
        cmd = [sys.executable, "-m", "harness", "experiment", "--config", "shrinker-ab", "--output", out]
        _, t = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True))
        row("default experiment, warm build cache", f"{t / 60:.1f} min", "target <= 20 min on 2 cores/TCG")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--experiment", action="store_true")
    a = ap.parse_args()
    print(f"nestpress bench on {os.uname().nodename}: {os.cpu_count()} CPUs, cache {default_cache()}")
    bench_builds(a.cold)
    bench_boot_and_probe()
    if a.experiment:
        bench_experiment()


if __name__ == "__main__":
    main()
