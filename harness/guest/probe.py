"""Guest latency probe: touch a working set page by page and time every touch.

Why a histogram and not raw samples: one pass over 1 GiB is 262 144 touches; raw
samples for a few minutes would be tens of millions of rows. Instead every interval
(default 1 s) writes a log-linear histogram (16 sub-buckets per power of two: at most
6.25 % relative error, exact below 32 ns), plus every touch slower than OUTLIER_NS as a
raw (time, latency) pair so that single spikes keep their exact timestamps (from the second
pass on: the first pass populates the working set, every touch of it is a fault).

Each pass record also carries the guest's own view of that pass, read between passes (never inside the
timed loop): its kernel's major faults (/proc/vmstat pgmajfault) and the steal time of its vCPUs
(/proc/stat; what its hypervisor took, where the hypervisor reports it).

Resolution and overhead are measured at start and written in the header: the clock's
resolution (time.perf_counter_ns, CLOCK_MONOTONIC) and the cost of one timed loop
iteration with no memory touch, which is the floor under every sample.
Standard library only.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import queue
import sys
import threading
import time

try:
    from .contract import ProbeJob  # imported by the host as harness.guest.*
    from .records import ProbeHeader, ProbeHist, ProbePass
except ImportError:  # run as a script in a guest: its directory is sys.path[0]
    from contract import ProbeJob  # type: ignore[no-redef]
    from records import ProbeHeader, ProbeHist, ProbePass  # type: ignore[no-redef]

SUB_BITS = 4  # 16 sub-buckets per power of two
OUTLIER_NS = 1_000_000  # touches >= 1 ms are also kept raw
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; older Pythons do not export it
PROBE_RECORDS = {ProbeHeader: "header", ProbeHist: "hist", ProbePass: "pass"}  # each record's "type" in probe.jsonl


def bucket(v: int) -> int:
    """Index of the log-linear bucket holding v nanoseconds (monotonic in v)."""
    b = v.bit_length()
    if b <= SUB_BITS + 1:
        return v
    return ((b - SUB_BITS) << SUB_BITS) + ((v >> (b - SUB_BITS - 1)) & ((1 << SUB_BITS) - 1))


def bucket_bounds(i: int) -> tuple[int, int]:
    """[low, high) nanoseconds of bucket i (the inverse of bucket())."""
    if i < (1 << (SUB_BITS + 1)):
        return i, i + 1
    b = (i >> SUB_BITS) + SUB_BITS
    sub = i & ((1 << SUB_BITS) - 1)
    low = (1 << (b - 1)) + (sub << (b - SUB_BITS - 1))
    return low, low + (1 << (b - SUB_BITS - 1))


def calibrate(n: int = 20_000) -> dict:
    """Cost of one sample with no memory touch: the probe's own floor."""
    clock = time.perf_counter_ns
    hist: dict[int, int] = {}
    t0 = prev = clock()
    for _ in range(n):
        now = clock()
        k = bucket(now - prev)
        hist[k] = hist.get(k, 0) + 1
        prev = now
    loop_ns = (prev - t0) / n
    info = time.get_clock_info("perf_counter")
    return {"clock": info.implementation, "clock_resolution_ns": info.resolution * 1e9, "loop_overhead_ns": loop_ns}


def permuted(items: list) -> list:
    """A fixed scattered order without the random module, whose import blocks in getrandom()
    until the guest's entropy pool is ready (minutes in a nested guest under TCG): stepping
    through the list by a stride coprime with its length visits every item once."""
    n = len(items)
    step = max(1, int(n * 0.618))
    while math.gcd(step, n) != 1:
        step += 1
    return [items[(i * step) % n] for i in range(n)]


class Writer:
    """Appends records from a thread, and replaces the status file from it: the export is 9p (over 9p
    for L2), where one write can take seconds under TCG; the touch loop must never wait for it. (It
    did for the status file, between passes: an L2 once paused 6 s there, and the phase it paused in
    got one histogram, failing its cell's health check.) Flushed every record, so a crash loses at
    most what is still queued."""

    def __init__(self, path: str):
        self.q: queue.Queue = queue.Queue()
        self.f = open(path, "a", buffering=1)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        """Whatever is queued, in one go: its records in one write, then the newest status of it only (a
        status write is several round trips: one per pass of a small probe would starve the records)."""
        done = False
        while not done:
            batch = [self.q.get()]
            while not self.q.empty():
                batch.append(self.q.get())
            done = None in batch
            lines = [item for item in batch if isinstance(item, str)]
            if lines:
                self.f.write("".join(lines))
            if statuses := [item for item in batch if isinstance(item, tuple)]:
                try:
                    replace(*statuses[-1])
                except OSError:  # the next pass says it again; the records go on either way
                    pass

    def __call__(self, rec: ProbeHeader | ProbeHist | ProbePass) -> None:
        self.q.put(json.dumps({"type": PROBE_RECORDS[type(rec)], **rec.to_dict()}) + "\n")

    def status(self, path: str, rec: dict) -> None:
        """path replaced by rec as JSON after the records queued before it (a newer status may replace it
        first: only the newest one counts)."""
        self.q.put((path, rec))

    def close(self) -> None:
        self.q.put(None)
        self.t.join(timeout=30)
        self.f.close()


def replace(path: str, rec: dict) -> None:
    """path holds rec as JSON, whole: written beside it, then renamed over it (a reader never sees half)."""
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(path + ".tmp", path)


USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def guest_view() -> tuple[int, float]:
    """(this kernel's major faults so far, its vCPUs' steal time so far in ms); -1 / nan where unreadable."""
    majflt, steal = -1, math.nan
    try:
        with open("/proc/vmstat") as f:
            majflt = next((int(line.split()[1]) for line in f if line.startswith("pgmajfault ")), -1)
        with open("/proc/stat") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        steal = int(fields[8]) * 1000 / USER_HZ if fields[0] == "cpu" and len(fields) > 8 else math.nan
    except (OSError, ValueError, IndexError):
        pass
    return majflt, steal


def run(job: ProbeJob) -> None:
    spec = job.spec
    size = spec.size_mb << 20
    stride = spec.stride
    offsets = list(range(0, size, stride))
    if spec.pattern == "random":
        offsets = permuted(offsets)
    write = spec.access == "write"
    interval = int(spec.interval_s * 1e9)
    out = Writer(job.out)
    out(
        ProbeHeader(
            t=time.time_ns(),
            pid=os.getpid(),
            size_mb=spec.size_mb,
            stride=stride,
            touches_per_pass=len(offsets),
            pattern=spec.pattern,
            access=spec.access,
            sub_bits=SUB_BITS,
            outlier_ns=OUTLIER_NS,
            **calibrate(),
        )
    )
    # the span may exceed the guest's RAM (only size * 4096 / stride is touched): no overcommit accounting
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    clock = time.perf_counter_ns
    wall = time.time_ns
    passes = 0
    hist: dict[int, int] = {}
    outliers: list[tuple[int, int]] = []
    n = total = worst = 0
    # interval boundaries on the monotonic clock, reported on the wall clock
    mono0, wall0 = clock(), wall()
    t_int = mono0
    seen = guest_view()
    try:
        while not os.path.exists(job.stop):
            p_start = clock()
            prev = p_start
            for off in offsets:
                if write:
                    mem[off] = 1
                else:
                    mem[off]
                now = clock()
                d = now - prev
                prev = now
                k = bucket(d)
                hist[k] = hist.get(k, 0) + 1
                n += 1
                total += d
                if d > worst:
                    worst = d
                if d >= OUTLIER_NS and passes:  # the first pass is page population: histogram only
                    outliers.append((now - mono0 + wall0, d))
                if now - t_int >= interval:
                    out(
                        ProbeHist(
                            t0=t_int - mono0 + wall0,
                            t1=now - mono0 + wall0,
                            n=n,
                            sum_ns=total,
                            max_ns=worst,
                            number=passes,
                            counts={str(k): v for k, v in hist.items()},
                            outliers=[[t, ns] for t, ns in outliers],
                        )
                    )
                    hist, outliers, n, total, worst = {}, [], 0, 0, 0
                    t_int = now
                    prev = clock()  # handing the record over is not the guest's latency
            passes += 1
            now_view = guest_view()
            out(
                ProbePass(
                    t0=p_start - mono0 + wall0,
                    t1=prev - mono0 + wall0,
                    number=passes,
                    touches=len(offsets),
                    majflt=now_view[0] - seen[0] if min(now_view[0], seen[0]) >= 0 else None,
                    steal_ms=now_view[1] - seen[1],
                )
            )
            seen = now_view
            out.status(job.status, {"passes": passes, "t": wall()})
            time.sleep(job.pause_s)
    finally:
        out.close()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(ProbeJob.from_dict(json.loads(sys.argv[1])))
