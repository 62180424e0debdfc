"""The probe's writer (harness/guest/probe.py): records and the status file leave the touch loop through one
thread, in order, so a slow export (9p, over 9p in L2) never holds a touch or the gap between two passes."""

import json
import threading
import time

from harness.guest import probe


def a_pass(n: int) -> probe.ProbePass:
    return probe.ProbePass(t0=0, t1=1, number=n)


def test_records_and_status_are_written_in_order_by_the_writer_not_the_caller(tmp_path, monkeypatch):
    out, status = tmp_path / "probe.jsonl", tmp_path / "probe.status"
    gate = threading.Event()
    real = probe.replace

    def slow(path: str, rec: dict) -> None:  # an export that takes its time
        gate.wait(5)
        real(path, rec)

    monkeypatch.setattr(probe, "replace", slow)
    w = probe.Writer(str(out))
    w(a_pass(1))
    w.status(str(status), {"passes": 1})
    w(probe.ProbeHist(t0=0, t1=1, counts={}, number=1))  # queued behind the status: the caller did not wait for it
    assert not status.exists()
    gate.set()
    w.close()
    assert json.loads(status.read_text()) == {"passes": 1} and not (tmp_path / "probe.status.tmp").exists()
    assert [json.loads(line)["type"] for line in out.read_text().splitlines()] == ["pass", "hist"]


def test_a_status_the_export_refuses_does_not_stop_the_records(tmp_path):
    out = tmp_path / "probe.jsonl"
    w = probe.Writer(str(out))
    w.status(str(tmp_path / "no-such-dir" / "probe.status"), {"passes": 1})
    w(a_pass(1))
    w.close()
    assert json.loads(out.read_text())["type"] == "pass"


def test_a_slow_status_never_holds_the_records_back_only_the_newest_is_written(tmp_path, monkeypatch):
    """A small probe ends a pass every few ms, and each status write is several round trips on 9p: the writer
    writes the newest status of whatever queued meanwhile, so records keep pace (once they fell seconds behind,
    and what was still queued when the probe was stopped was lost)."""
    out, status = tmp_path / "probe.jsonl", tmp_path / "probe.status"
    written: list[dict] = []
    real = probe.replace

    def slow(path: str, rec: dict) -> None:
        time.sleep(0.05)
        written.append(rec)
        real(path, rec)

    monkeypatch.setattr(probe, "replace", slow)
    w = probe.Writer(str(out))
    for n in range(1, 201):  # 200 passes, each with its record and its status, in 0.2 s
        w(a_pass(n))
        w.status(str(status), {"passes": n})
        time.sleep(0.001)
    w.close()
    assert len(out.read_text().splitlines()) == 200 and json.loads(status.read_text()) == {"passes": 200}
    assert len(written) < 50
