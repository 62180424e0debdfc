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
    """The guest's side in a thread of the test: it ends, like the agent's, when the parent's side is gone."""
    try:
        clock.serve(fd, now)
    except OSError:
        pass


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
    watch = clock.Watch(path, str(out), period_s=period_s)
    watch.start()
    return watch, out


def test_watch_measures_at_start_periodically_and_at_stop_into_clock_jsonl(tmp_path):
    """The parent's Watch against a guest whose clock is 1.5 s behind."""
    watch, out = watched(tmp_path, lambda conn: serving(os.dup(conn.fileno()), ahead(-1.5)), 0.2)
    time.sleep(0.5)
    watch.stop()
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) >= 3 and all(abs(s["offset_ns"] + 1.5e9) <= s["uncertainty_ns"] + 1000 for s in samples)


def test_watch_says_why_when_it_never_measured(tmp_path):
    out = tmp_path / "clock.jsonl"
    watch = clock.Watch(str(tmp_path / "nothing-listens"), str(out))
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
        serving(os.dup(conn.fileno()))

    watch, out = watched(tmp_path, guest, 0.3)
    time.sleep(0.2)
    silent.clear()
    time.sleep(0.8)
    watch.stop()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" in records[0] and any("offset_ns" in r for r in records[1:])
