"""Each guest's clock against its parent's: by a KVM hypercall where the guest has ptp_kvm, else by round trips
over a virtio-serial port.

Aligning CLOCK_REALTIME from the RTC at boot (agent.set_clock) leaves it off by up to a second (measured: an
L1 0.5-0.9 s behind its kernel under test); attributing a latency spike to a cause event in the kernel under
test needs ~1 ms, and needs to know how good. So every parent (the host for the kernel under test, each agent
for its children) asks its child's agent for the time: it sends a sequence number at t1 (its clock), the child
answers with its own CLOCK_REALTIME t2, the answer arrives at t3. Then the child's clock minus the parent's lies
within [t2 - t3, t2 - t1], whatever the delays each way were. A burst of EXCHANGES tries is intersected
(Peer.measure): the offset is the middle of what all of them allow, the uncertainty half its width. The parent
measures once the agent is ready, every PERIOD_S after, and when the guest is stopped, and appends each
measurement (contract.ClockSample) to <export>/clock.jsonl; results.py corrects the guest's timestamps by them
and attribution uses the uncertainty as its matching window.

The port is a virtserialport named PORT (qemu.py adds it); the guest finds it by that name in sysfs.

Where the guest has a KVM virtual PTP clock (ptp_kvm: the parent's KVM answers KVM_HC_CLOCK_PAIRING with its
CLOCK_REALTIME, which it can only do when its own clocksource is the TSC), the guest measures itself instead
(Ptp): PTP_SYS_OFFSET reads the parent's clock by hypercall between two reads of the guest's own, in the
guest's kernel, so each sample bounds the offset to the hypercall's round trip - an exit into the parent's
KVM, no device, no interrupt, no Python on the way. (Measured under TCG: an L1 within 0.02-0.04 ms of its
kernel under test, an L2 within 0.17-0.35 ms of its L1, where the round trips allowed 0.5-1.2 and 1.4-2.0 ms.)
The guest's agent then writes the same ClockSample records itself (own_clock) and says so in ready.json
(READY_METHOD), and the parent does not measure it.
Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

try:
    from .contract import ClockSample  # imported by the host as harness.guest.*
    from .export import export_file
except ImportError:  # in a guest: its directory is sys.path[0]
    from contract import ClockSample  # type: ignore[no-redef]
    from export import export_file  # type: ignore[no-redef]

PORT = "nestpress.clock"
EXCHANGES = 32
TARGET_NS = 1_000_000  # a burst less certain than this is followed by another, up to BURSTS in all
BURSTS = 4
PERIOD_S = 10.0
REPLY_TIMEOUT_S = 2.0
MAX_LATE = 3  # answers missed in a burst before it is given up
MAX_LINE = 64  # "<seq> <ns>" is ~30 bytes
VIRTIO_SERIAL, PTP_KVM = "virtio-serial", "ptp_kvm"  # ClockSample.method
READY_METHOD = "clock_method"  # the field of ready.json where a guest says which of them measures its clock
PTP_CLOCK_NAME = "KVM virtual PTP"  # drivers/ptp/ptp_kvm_common.c
PTP_SAMPLES = 25  # PTP_MAX_SAMPLES: hypercalls per PTP_SYS_OFFSET
# _IOW('=', 5, struct ptp_sys_offset): n_samples, 3 reserved words, then 2 * 25 + 1 struct ptp_clock_time
# {s64 sec; u32 nsec; u32 reserved} - the guest's clock, the parent's, the guest's, ... the guest's
PTP_SYS_OFFSET_SIZE = 16 + 16 * (2 * PTP_SAMPLES + 1)
PTP_SYS_OFFSET = (1 << 30) | (PTP_SYS_OFFSET_SIZE << 16) | (ord("=") << 8) | 5


def device_named(pattern: str, name: str) -> str | None:
    """/dev/<dir> of the first sysfs directory matching pattern (a glob of name files) whose file says name."""
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path) as f:
                if f.read().strip() == name:
                    return "/dev/" + path.split("/")[-2]
        except OSError:
            continue
    return None


def find_port() -> str | None:
    """The device of the clock port in this guest (/dev/vportNpM), or None where its parent gave none."""
    return device_named("/sys/class/virtio-ports/*/name", PORT)


def serve(fd: int, clock=time.time_ns) -> None:
    """Answer every request line "<seq>" with "<seq> <this clock, ns>", as soon as it arrives; until EOF."""
    pending = b""
    while True:
        data = os.read(fd, 4096)
        if not data:
            return
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip().isdigit():
                os.write(fd, b"%s %d\n" % (line.strip(), clock()))


def serve_port(on_error) -> threading.Thread | None:
    """In a guest: answer the parent on the clock port from a thread; on_error(why) the first time it cannot
    (it retries every half second)."""
    port = find_port()
    if port is None:
        on_error("no virtio-serial port named " + PORT)
        return None

    failed: list[OSError] = []

    def run() -> None:
        while True:  # reopened after a parent closed it (a port reads EOF while the host side is gone)
            try:
                fd = os.open(port, os.O_RDWR)
                try:
                    serve(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                if not failed:
                    on_error(f"{port}: {e.strerror}")
                failed.append(e)
            time.sleep(0.5)

    t = threading.Thread(target=run, name="clock", daemon=True)
    t.start()
    return t


class Peer:
    """The parent's side: exchanges over a connected stream socket, best of `exchanges`."""

    def __init__(self, sock: socket.socket, exchanges: int = EXCHANGES):
        self.sock, self.exchanges, self.seq, self.pending = sock, exchanges, 0, b""
        sock.settimeout(REPLY_TIMEOUT_S)

    @classmethod
    def connect(cls, socket_path: str) -> Peer:
        """The parent's side of a child's clock port (QEMU's chardev listens there)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def _reply(self, seq: int) -> int:
        """The child's time in the answer to request seq (older answers, of timed-out requests, skipped). The
        child is untrusted: a line longer than MAX_LINE or answers that never match within the timeout end it."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            while b"\n" not in self.pending:
                if len(self.pending) > MAX_LINE or time.monotonic() > deadline:
                    self.pending = b""
                    raise TimeoutError("no well-formed answer")
                data = self.sock.recv(4096)
                if not data:
                    raise ConnectionError("the guest closed the clock port")
                self.pending += data
            line, self.pending = self.pending.split(b"\n", 1)
            parts = line.split()
            if len(parts) == 2 and parts[0] == b"%d" % seq and parts[1].lstrip(b"-").isdigit():
                return int(parts[1])
            if time.monotonic() > deadline:
                raise TimeoutError("no answer to this request")

    def measure(self) -> ClockSample:
        """One burst of exchanges. Each bounds the offset to [t2 - t3, t2 - t1]; within a burst (tens of ms)
        the offset does not move, so the bounds of all of them hold at once: their intersection, which is at
        most as wide as the shortest round trip, and narrower where the fastest request and the fastest answer
        were in different exchanges."""
        lo, hi, shortest = None, None, None
        late = 0
        for _ in range(self.exchanges):
            self.seq += 1
            t1 = time.time_ns()
            self.sock.sendall(b"%d\n" % self.seq)
            try:
                t2 = self._reply(self.seq)
            except TimeoutError:
                late += 1
                if late >= MAX_LATE:  # the guest is not answering now: no burst of 2 s waits
                    break
                continue
            t3 = time.time_ns()
            lo = t2 - t3 if lo is None else max(lo, t2 - t3)
            hi = t2 - t1 if hi is None else min(hi, t2 - t1)
            shortest = t3 - t1 if shortest is None else min(shortest, t3 - t1)
        if lo is None or hi is None or shortest is None:
            raise TimeoutError(f"no answer on the clock port within {REPLY_TIMEOUT_S:g}s, {self.exchanges} tries")
        return bounded(lo, hi, t=time.time_ns(), exchanges=self.exchanges, shortest=shortest, method=VIRTIO_SERIAL)


def bounded(lo: int, hi: int, *, t: int, exchanges: int, shortest: int, method: str) -> ClockSample:
    """The measurement that the offset lies within [lo, hi] (ns) makes; bounds that cannot all hold mean a clock
    was stepped while they were taken."""
    if lo > hi:
        raise ValueError(f"clock bounds do not meet ({lo} > {hi} ns): a clock stepped during the measurement")
    return ClockSample(
        t=t,
        offset_ns=(lo + hi) // 2,
        uncertainty_ns=(hi - lo + 1) // 2,
        exchanges=exchanges,
        round_trip_ns=shortest,
        method=method,
    )


def offset_bounds(stamps: list[int]) -> tuple[int, int, int, int]:
    """PTP_SYS_OFFSET's stamps (guest, parent, guest, ..., guest; ns) -> (lo, hi, shortest, t): the guest's clock
    minus the parent's lies within [lo, hi] - each parent reading was taken between the guest readings around
    it, and within one ioctl (a few ms at most) the offset does not move, so all of them hold at once -; the
    shortest bracket, and the parent's clock at the middle reading."""
    lo = max(stamps[i] - stamps[i + 1] for i in range(0, len(stamps) - 1, 2))
    hi = min(stamps[i + 2] - stamps[i + 1] for i in range(0, len(stamps) - 1, 2))
    shortest = min(stamps[i + 2] - stamps[i] for i in range(0, len(stamps) - 1, 2))
    return lo, hi, shortest, stamps[len(stamps) // 2 | 1]


class Ptp:
    """The guest's side with ptp_kvm: its own clock against its parent's, read by hypercall (PTP_SYS_OFFSET)."""

    def __init__(self, device: str, samples: int = PTP_SAMPLES):
        self.fd, self.samples = os.open(device, os.O_RDONLY), samples

    def stamps(self) -> list[int]:
        buf = bytearray(PTP_SYS_OFFSET_SIZE)
        struct.pack_into("I", buf, 0, self.samples)
        try:
            fcntl.ioctl(self.fd, PTP_SYS_OFFSET, buf, True)
        except OSError as e:  # the parent's KVM refused the pairing (its clocksource is no longer the TSC)
            raise ValueError(f"PTP_SYS_OFFSET: {e.strerror}") from None
        return [sec * 1_000_000_000 + nsec for sec, nsec, _ in struct.iter_unpack("qII", buf[16:])][
            : 2 * self.samples + 1
        ]

    def measure(self) -> ClockSample:
        lo, hi, shortest, t = offset_bounds(self.stamps())
        return bounded(lo, hi, t=t, exchanges=self.samples, shortest=shortest, method=PTP_KVM)

    def close(self) -> None:
        os.close(self.fd)


def find_ptp() -> str | None:
    """The device of this guest's KVM virtual PTP clock (/dev/ptpN), or None: no ptp_kvm, or its parent's KVM
    could not pair clocks when it loaded (the device is only made when the first hypercall worked)."""
    return device_named("/sys/class/ptp/ptp*/clock_name", PTP_CLOCK_NAME)


class Meter(Protocol):
    def measure(self) -> ClockSample: ...

    def close(self) -> None: ...


def best_of_bursts(meter: Meter, target_ns: int = TARGET_NS, bursts: int = BURSTS) -> ClockSample:
    """The most certain of up to `bursts` measurements, stopping at the first within target_ns: a parent or a
    child busy under memory pressure answers late now and then, a few ms later it may not."""
    best = meter.measure()
    for _ in range(bursts - 1):
        if best.uncertainty_ns <= target_ns:
            break
        again = meter.measure()
        best = again if again.uncertainty_ns < best.uncertainty_ns else best
    return best


class Watch:
    """A thread that measures a guest's clock with the meter open_meter() gives (a parent's Peer on the child's
    port, or a guest's own Ptp) into out (the guest's clock.jsonl): now, every period_s, and once more at stop()."""

    def __init__(self, open_meter: Callable[[], Meter], out: str, period_s: float = PERIOD_S):
        self.open_meter, self.out, self.period_s = open_meter, out, period_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="clock-watch", daemon=True)

    @classmethod
    def port(cls, socket_path: str, out: str, period_s: float = PERIOD_S) -> Watch:
        """The parent's watch of a child over its clock port (socket_path: the port's host side)."""
        return cls(lambda: Peer.connect(socket_path), out, period_s)

    def start(self) -> None:
        self.thread.start()

    def _write(self, rec: dict) -> None:
        with export_file(self.out, "a") as f:  # the child's export: never through a link it made
            f.write(json.dumps(rec) + "\n")

    def _measurement(self, meter: Meter) -> dict:
        """A measurement, or what kept it from being one (a late or inconsistent burst: said, and tried again
        at the next period)."""
        try:
            return best_of_bursts(meter).to_dict()
        except (TimeoutError, ValueError) as e:
            return {"t": time.time_ns(), "error": f"{type(e).__name__}: {e}"}

    def _run(self) -> None:
        measured = 0
        meter: Meter | None = None
        try:
            meter = self.open_meter()
            while True:
                self._write(self._measurement(meter))
                measured += 1
                if self.stopping.wait(self.period_s):
                    self._write(self._measurement(meter))
                    return
        except OSError as e:  # the port closed: after a first measurement, normally the guest ended (said all
            # the same, apart from the errors: what ended the measurements is worth knowing when it was early)
            said = f"{type(e).__name__}: {e}"
            with contextlib.suppress(OSError):  # clock.jsonl itself may be what failed (a guest's link there)
                self._write({"t": time.time_ns(), "ended" if measured else "error": said})
        finally:
            if meter is not None:
                meter.close()

    def stop(self, timeout: float = 3 * REPLY_TIMEOUT_S) -> None:
        """The last measurement, before the guest is stopped (bounded: a hung guest does not hold anyone up)."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)


def own_clock(out: str) -> tuple[Watch | None, str]:
    """In a guest: a started Watch of its own clock against its parent's by ptp_kvm, into out (its clock.jsonl),
    when the device is there and a first reading works; else None (its parent measures it over the clock port).
    And what was decided, in words."""
    device = find_ptp()
    if device is None:
        return None, f"no {PTP_CLOCK_NAME} clock (ptp_kvm absent, or the parent's KVM cannot pair clocks)"
    try:
        ptp = Ptp(device)
    except OSError as e:
        return None, f"{device}: {e.strerror}"
    try:
        first = ptp.measure()
    except ValueError as e:
        ptp.close()
        return None, f"{device}: {e}"
    watch = Watch(lambda: ptp, out)
    watch.start()
    return watch, f"{device}: first reading ±{first.uncertainty_ns / 1e3:.0f} us"
