"""The one reader of guest files (results/guest_files.py, results/rows.py): whatever a guest leaves - links, FIFOs,
directories, huge or sparse files, lines nested thousands deep, wrong types, numbers that are no measurement - is
a named problem of its cell, never an exception, never a read of a host file, never a hang, and reading stays
within a small memory bound."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from harness.results.guest_files import Problems, defuse, json_lines, read_text, records
from harness.results.manifest import CellEntry
from harness.results.tables import cell_frames, guest_dirs

CELL = CellEntry(id="baseline.r1", variant="baseline", repetition=1, order=0)
SECRET = "host-secret-7c1f"


def a_cell(tmp_path: Path) -> Path:
    """A kernel under test's export with one L1 and one phase, as a guest could have left it."""
    cell = tmp_path / "cell"
    (cell / "l1-0").mkdir(parents=True)
    (cell / "plan.json").write_text(json.dumps({"name": "kut", "level": "kut"}))
    (cell / "l1-0" / "plan.json").write_text(json.dumps({"name": "l1-0", "level": "l1"}))
    t0 = 1_800_000_000_000_000_000
    events = [
        {"t": t0, "kind": "phase_start", "phase": "steady", "mode": "none", "duration_s": 10},
        {"t": t0 + 10**10, "kind": "phase_end", "phase": "steady", "mode": "none"},
    ]
    (cell / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (cell / "counters.jsonl").write_text(json.dumps({"t": t0 + 10**9, "v": {"vmstat.pgscan_kswapd": 1}}) + "\n")
    hist = {"type": "hist", "t0": t0 + 10**9, "t1": t0 + 2 * 10**9, "counts": {"40": 5}, "pass": 1}
    (cell / "l1-0" / "probe.jsonl").write_text(json.dumps(hist) + "\n")
    return cell


def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "host-only"
    p.write_text(json.dumps({"t": 1, "kind": "ready", "guest": SECRET}) + "\n")
    return p


def test_links_fifos_and_directories_are_refused_without_reading_or_waiting(tmp_path):
    cell = a_cell(tmp_path)
    (cell / "l1-0" / "events.jsonl").symlink_to(secret_file(tmp_path))
    os.mkfifo(cell / "l1-0" / "probe.jsonl.fifo")
    (cell / "l1-0" / "probe.jsonl").unlink()
    os.rename(cell / "l1-0" / "probe.jsonl.fifo", cell / "l1-0" / "probe.jsonl")  # a FIFO nobody writes to
    (cell / "pressure.jsonl").mkdir()
    problems = Problems()
    began = time.monotonic()
    frames = cell_frames(cell, CELL, problems)
    assert time.monotonic() - began < 5
    said = " | ".join(problems)
    assert "l1-0/events.jsonl: unreadable (Too many levels of symbolic links)" in said
    assert "l1-0/probe.jsonl: not a regular file" in said and "pressure.jsonl: not a regular file" in said
    assert SECRET not in frames["events"].to_csv()


def test_huge_and_sparse_files_are_refused_unread(tmp_path):
    cell = a_cell(tmp_path)
    with open(cell / "shrinker.jsonl", "wb") as f:
        f.truncate(3 << 30)  # 3 GiB of nothing, sparse
    problems = Problems()
    cell_frames(cell, CELL, problems)
    assert any("shrinker.jsonl: over the 1024 MiB a guest may write" in p for p in problems)
    with pytest.raises(Exception, match="over the 1 MiB"):
        read_text(cell / "shrinker.jsonl", limit=1 << 20)
    assert read_text(cell / "shrinker.jsonl", tail=16) == "\0" * 16  # a tail is bounded whatever the size


@pytest.mark.parametrize(
    "line, fits",
    [
        ("[" * 3000, False),  # nested past the decoder's recursion limit
        ('{"a": ' * 40 + "1" + "}" * 40, False),  # past MAX_DEPTH
        ('{"t": ' + "9" * 400 + ', "kind": "ready"}', False),  # no measurement has 400 digits
        ('{"t": NaN, "kind": "ready"}', False),
        ('{"t": 1, "kind": "ready", "guest": 5}', False),  # wrong type
        ('{"t": 1, "kind": "nonsense"}', False),  # not a kind of the contract
        ('{"t": 1, "kind": "ready", "guest": "kut", "from_a_newer_agent": 1}', True),  # unknown fields: left out
    ],
)
def test_every_event_line_is_checked_against_its_type(tmp_path, line, fits):
    from harness.guest.records import Event

    path = tmp_path / "events.jsonl"
    path.write_text(line + "\n")
    problems = Problems()
    got = list(records(path, problems, tmp_path, Event.from_guest))
    assert (len(got) == 1) == fits and (not problems) == fits, problems


def test_wrong_types_in_any_file_are_counted_per_file_and_the_rest_is_kept(tmp_path):
    cell = a_cell(tmp_path)
    t = 1_800_000_001_000_000_000
    with open(cell / "shrinker.jsonl", "w") as f:
        f.write(json.dumps({"t": t, "kind": "shrink_end", "fields": {"freed": "x"}}) + "\n")
        f.write(json.dumps({"t": t, "kind": "shrink_end", "fields": {"freed": 3}, "pid": 7}) + "\n")
    with open(cell / "events.jsonl", "a") as f:
        f.write(json.dumps({"t": t, "kind": "pressure_unavailable", "reason": 5}) + "\n")
        f.write(json.dumps({"t": t, "kind": "phase_start", "phase": "x"}) + "\n")  # no mode: said as none
    with open(cell / "counters.jsonl", "a") as f:
        f.write('{"t": 1, "v": {"a": Infinity}}\n{"t": 1, "v": {"a": [1]}}\n')
    problems = Problems()
    frames = cell_frames(cell, CELL, problems)
    said = " | ".join(problems)
    assert "shrinker.jsonl: 1 record(s) without the fields their kind has" in said
    assert "events.jsonl: 1 record(s) without the fields their kind has" in said
    assert "counters.jsonl: 2 record(s) without the fields their kind has" in said
    assert list(frames["trace"]["freed"]) == [3.0] and "x" in set(frames["phases"]["phase"])


def test_overlong_lines_are_skipped_unkept(tmp_path):
    path = tmp_path / "events.jsonl"
    with open(path, "w") as f:
        f.write('{"t": 1, "kind": "ready", "detail": "' + "x" * (3 << 20) + '"}\n')
        f.write('{"t": 2, "kind": "ready"}\n')
    problems = Problems()
    assert [r["t"] for r in json_lines(path, problems, tmp_path)] == [2]
    assert problems == ["events.jsonl: 1 torn or malformed line(s) skipped"]


def test_reading_a_large_file_keeps_memory_small_and_counts_what_is_no_record(tmp_path):
    """Streamed: memory holds a line and a chunk, not the file (which once took 54 times its size to read)."""
    cell = a_cell(tmp_path)
    with open(cell / "counters.jsonl", "w") as f:
        f.write(('{"junk": "' + "x" * (64 << 10) + '"}\n') * 128)  # 8 MiB, no sample in it
    tracemalloc.start()
    problems = Problems()
    cell_frames(cell, CELL, problems)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 << 20, f"{peak >> 10} KiB"
    assert any("counters.jsonl: 128 record(s) without the fields" in p for p in problems)
    (cell / "counters.jsonl").write_text("{}\n" * 100_000)
    problems = Problems()
    cell_frames(cell, CELL, problems)
    assert any("counters.jsonl: 100000 record(s) without the fields" in p for p in problems)


def test_directories_nested_thousands_deep_are_walked_without_recursion_and_defused(tmp_path):
    cell = a_cell(tmp_path)
    deep, made = cell / "l1-0", []
    for _ in range(1500):  # one at a time: os.makedirs, like shutil.rmtree, recurses
        deep = deep / "d"
        deep.mkdir()
        made.append(deep)
    (deep / "plan.json").write_text(json.dumps({"name": "l2-0", "level": "l2"}))
    (deep / "link").symlink_to("/etc/hostname")
    os.chmod(cell / "l1-0", 0o6777)
    problems = Problems()
    found = [name for name, _, _ in guest_dirs(cell, problems)]
    assert found == ["kut", "l1-0"]  # a plan that deep is no guest the kernel under test started
    changed = defuse(cell)
    assert not (deep / "link").is_symlink() and "l1-0" in changed and not (cell / "l1-0").stat().st_mode & 0o7022
    (deep / "plan.json").unlink()
    for d in reversed(made):  # pytest's own cleanup would recurse as deep
        d.rmdir()


def test_a_parent_never_writes_or_reads_through_what_a_guest_put_in_its_export(tmp_path):
    """With 9p's security_model=none a guest writes its export as the host's root: a link at clock.jsonl or
    hang.txt would make the host write wherever it points, a FIFO at ready.json would block it."""
    from harness.guest.export import export_file
    from harness.guest.supervise import Child, tail

    target = tmp_path / "host-file"
    target.write_text("untouched\n")
    export = tmp_path / "export"
    export.mkdir()
    for name in ("clock.jsonl", "hang.txt", "console.log"):
        (export / name).symlink_to(target)
    os.mkfifo(export / "ready.json")
    for name, mode in (("clock.jsonl", "a"), ("hang.txt", "w"), ("ready.json", "rb")):
        began = time.monotonic()
        with pytest.raises(OSError):
            export_file(str(export / name), mode)
        assert time.monotonic() - began < 1
    assert target.read_text() == "untouched\n" and tail(str(export / "console.log")) == "(no console output)"
    assert Child._ready_record(str(export / "ready.json")) == {}  # a FIFO: nothing read, nothing waited for
