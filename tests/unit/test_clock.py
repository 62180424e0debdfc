"""The clock exchange between a parent and its guest, over real sockets: the guest's side (serve) answers
with a clock set 5 s ahead; the parent's side finds that offset within the uncertainty it states. The e2e
tests measure it through QEMU's virtio-serial port at every level."""

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from harness.guest import clock


def serving(fd: int, now=time.time_ns) -> None:
    """The guest's side in a thread of the test: it ends, like the agent's, when the parent's side is gone. On a
    descriptor of its own: the test's socket object may be collected first, and its number reused by the next
    test's socket, which this thread would then answer."""
    own = os.dup(fd)
    try:
        clock.serve(own, now)
    except OSError:
        pass
    finally:
        os.close(own)


def ahead(seconds: float):
    return lambda: time.time_ns() + int(seconds * 1e9)


def test_the_offset_is_found_within_the_uncertainty_it_states():
    parent, guest = socket.socketpair()
    threading.Thread(target=serving, args=(guest.fileno(), ahead(5.0)), daemon=True).start()
    sample = clock.Peer(parent).measure()
    assert abs(sample.offset_ns - 5e9) <= sample.uncertainty_ns + 1000
    assert 0 < sample.uncertainty_ns < 50e6 and sample.exchanges == clock.EXCHANGES
    parent.close()


def test_a_late_answer_to_an_earlier_request_is_not_taken_for_the_current_one():
    parent, guest = socket.socketpair()
    guest.sendall(b"1 999\n0 5\ngarbage\n")  # stale and malformed lines before the real answer
    threading.Thread(target=serving, args=(guest.fileno(), ahead(0)), daemon=True).start()
    peer = clock.Peer(parent, exchanges=3)
    peer.seq = 1  # the next request is 2
    assert abs(peer.measure().offset_ns) < 50e6


def test_a_guest_that_never_answers_is_a_timeout_not_a_hang(monkeypatch):
    monkeypatch.setattr(clock, "REPLY_TIMEOUT_S", 0.05)
    parent, _guest = socket.socketpair()
    with pytest.raises(TimeoutError, match="no answer"):
        clock.Peer(parent, exchanges=2).measure()


def test_a_guest_that_floods_the_port_cannot_hold_the_parent(monkeypatch):
    monkeypatch.setattr(clock, "REPLY_TIMEOUT_S", 0.3)
    parent, guest = socket.socketpair()

    def flood() -> None:
        try:
            while True:
                guest.sendall(b"7" * 4096)  # never a newline
        except OSError:
            pass

    threading.Thread(target=flood, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        clock.Peer(parent, exchanges=2).measure()
    assert time.monotonic() - t0 < 2 and len(parent.recv(1)) == 1
    parent.close()


def watched(tmp_path, guest, period_s: float) -> tuple[clock.Watch, Path]:
    """A Watch on a listening socket, as QEMU's chardev (server=on) offers the port; guest(conn) is the guest."""
    path = str(tmp_path / "clock.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    threading.Thread(target=lambda: guest(server.accept()[0]), daemon=True).start()
    out = tmp_path / "clock.jsonl"
    watch = clock.Watch.port(path, str(out), period_s=period_s)
    watch.start()
    return watch, out


def test_watch_measures_at_start_periodically_and_at_stop_into_clock_jsonl(tmp_path):
    """The parent's Watch against a guest whose clock is 1.5 s behind."""
    watch, out = watched(tmp_path, lambda conn: serving(conn.fileno(), ahead(-1.5)), 0.2)
    time.sleep(0.5)
    watch.stop()
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) >= 3 and all(abs(s["offset_ns"] + 1.5e9) <= s["uncertainty_ns"] + 1000 for s in samples)


def test_watch_says_why_when_it_never_measured(tmp_path):
    out = tmp_path / "clock.jsonl"
    watch = clock.Watch.port(str(tmp_path / "nothing-listens"), str(out))
    watch.start()
    watch.stop()
    assert "error" in json.loads(out.read_text())


def test_an_uncertain_burst_is_followed_by_another_and_the_most_certain_is_kept():
    parent, guest = socket.socketpair()
    threading.Thread(target=serving, args=(guest.fileno(), ahead(0)), daemon=True).start()
    peer = clock.Peer(parent, exchanges=4)
    calls = []
    measure = peer.measure

    def counted():
        calls.append(1)
        return measure()

    peer.measure = counted
    clock.best_of_bursts(peer, target_ns=0, bursts=3)  # never certain enough: all three bursts
    assert len(calls) == 3
    calls.clear()
    clock.best_of_bursts(peer, target_ns=10**9, bursts=3)  # the first is good enough
    assert len(calls) == 1


def test_a_burst_the_guest_misses_is_said_and_measuring_goes_on(tmp_path, monkeypatch):
    """A guest that stops answering for a while (busy under pressure) costs one measurement, not the rest."""
    monkeypatch.setattr(clock, "REPLY_TIMEOUT_S", 0.05)
    silent = threading.Event()
    silent.set()

    def guest(conn) -> None:
        while silent.is_set():
            conn.recv(4096)  # requests read and left unanswered
        serving(conn.fileno())

    watch, out = watched(tmp_path, guest, 0.3)
    time.sleep(0.2)
    silent.clear()
    time.sleep(0.8)
    watch.stop()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" in records[0] and any("offset_ns" in r for r in records[1:])


def ptp_stamps(offset_ns: int, brackets: list[tuple[int, int]], t0: int = 10**18) -> list[int]:
    """PTP_SYS_OFFSET's answer for a guest offset_ns ahead of its parent: for each sample (before, after), the ns
    from the guest's reading before to the parent's and from the parent's to the guest's after."""
    stamps, now = [t0], t0
    for before, after in brackets:
        now += before
        stamps.append(now - offset_ns)  # the parent's clock
        now += after
        stamps.append(now)
    return stamps


def test_a_ptp_reading_bounds_the_offset_by_the_narrowest_brackets():
    """Each parent reading lies between the guest readings around it; the bounds of all samples hold at once,
    so the fastest way in and the fastest way out may come from different samples."""
    stamps = ptp_stamps(-3_000_000, [(40_000, 90_000), (70_000, 20_000), (50_000, 50_000)])
    lo, hi, shortest, t = clock.offset_bounds(stamps)
    assert lo <= -3_000_000 <= hi and (lo, hi) == (-3_000_000 - 40_000, -3_000_000 + 20_000)
    assert shortest == 90_000 and t in stamps[1::2]


def test_ptp_measure_states_the_offset_and_an_inconsistent_reading_is_refused(monkeypatch):
    ptp = object.__new__(clock.Ptp)  # no device here: its stamps are given
    ptp.samples = 3
    monkeypatch.setattr(ptp, "stamps", lambda: ptp_stamps(5_000_000_000, [(30_000, 30_000)] * 3), raising=False)
    s = ptp.measure()
    assert abs(s.offset_ns - 5e9) <= s.uncertainty_ns <= 30_000 and s.method == clock.PTP_KVM
    stepped = ptp_stamps(0, [(30_000, 30_000)] * 2)
    stepped[3] += 10**9  # the parent's clock jumped a second between two samples
    monkeypatch.setattr(ptp, "stamps", lambda: stepped, raising=False)
    with pytest.raises(ValueError, match="do not meet"):
        ptp.measure()


def test_the_ptp_ioctl_is_the_kernels():
    """_IOW('=', 5, struct ptp_sys_offset) as include/uapi/linux/ptp_clock.h defines it (832 bytes)."""
    assert clock.PTP_SYS_OFFSET_SIZE == 832 and clock.PTP_SYS_OFFSET == 0x43403D05


def test_without_a_kvm_ptp_clock_the_guest_leaves_its_clock_to_its_parent(tmp_path, monkeypatch):
    monkeypatch.setattr(clock, "find_ptp", lambda: None)
    watch, why = clock.own_clock(str(tmp_path / "clock.jsonl"))
    assert watch is None and "ptp_kvm" in why and not (tmp_path / "clock.jsonl").exists()


@pytest.mark.parametrize("method, watched", [(clock.PTP_KVM, False), (clock.VIRTIO_SERIAL, True), (None, True)])
def test_the_parent_measures_a_guest_unless_it_says_it_measures_itself(tmp_path, method, watched):
    """ready.json is the guest's word (untrusted): ptp_kvm there and the parent leaves the clock port alone;
    anything else and it measures over the port (here nothing listens: the watch says so in clock.jsonl)."""
    from harness.guest.supervise import Child

    export = tmp_path / "export"
    child = Child("g", ["sleep", "30"], str(export), str(tmp_path / "console.log"), clock=str(tmp_path / "none"))
    child.start()
    try:
        said = {"t": 1, "uptime_s": 2.5} | ({clock.READY_METHOD: method} if method else {})
        (export / "ready.json").write_text(json.dumps(said))
        child.wait_ready(10)
        assert child.kernel_ready_s == 2.5 and (child.clock is not None) == watched
    finally:
        child.stop()
    assert (export / "clock.jsonl").exists() == watched


def test_what_a_guest_says_in_ready_json_is_read_bounded(tmp_path):
    from harness.guest.supervise import Child

    huge = tmp_path / "ready.json"
    huge.write_text('{"uptime_s": 1, "pad": "' + "x" * (8 << 20) + '"}')  # 8 MiB: only its first 4 KiB are read
    assert Child._ready_record(str(huge)) == {}
    small = tmp_path / "small.json"
    small.write_text('{"uptime_s": 1.5, "clock_method": "ptp_kvm"}')
    assert Child._ready_record(str(small)) == {"uptime_s": 1.5, "clock_method": "ptp_kvm"}
