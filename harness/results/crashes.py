"""Crashes and stalls as outcomes: every kernel panic, oops, BUG, WARN, RCU stall, soft lockup, hung task and OOM
kill that any level's kernel logged, in every attempt at a cell (a retried one's files kept in failed/ too), with
its level, phase, time and a signature: its kind, its first line and the top frames of its trace, normalised (no
addresses, offsets, CPU or PID numbers) so that the same crash has the same signature wherever it happens.

A level's log is read twice - the agent's kmsg.log (everything, until the kernel dies) and the console (what the
kernel printed last, the panic among it) - and a crash seen in both counts once. The logs are a guest's files:
read through guest_files, bounded; what they say is data, escaped where it is shown.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..guest.contract import EventKind
from ..guest.records import Event
from .guest_files import GuestFileError, Problems, json_object, present, read_text, records

LOG_LIMIT = 8 << 20  # of each log, its end
# (kind, pattern): the first that matches a line names it; the group, where there is one, is what it says
KINDS = (
    ("soft-lockup", re.compile(r"watchdog: BUG: soft lockup - (.*)")),
    ("rcu-stall", re.compile(r"(rcu_\w+ (?:self-)?detected stalls?.*|rcu_\w+ kthread timer wakeup didn't happen.*)")),
    ("rcu-stall", re.compile(r"(Possible timer handling issue.*)")),
    ("hung-task", re.compile(r"INFO: (task \S+ blocked for more than \d+ seconds)")),
    ("panic", re.compile(r"Kernel panic - not syncing: (.*)")),
    ("bug", re.compile(r"\bBUG: (.*)")),
    ("oops", re.compile(r"\b(Oops: .*|general protection fault.*)")),
    ("warn", re.compile(r"WARNING: CPU: \d+ PID: \d+ at (.*)")),
    ("oom-kill", re.compile(r"(Out of memory: Killed process \d+ \(\S+\)|\S+ invoked oom-killer)")),
    ("bug", re.compile(r"(kernel BUG at .*)")),
)
WORDS = re.compile(
    r"BUG|WARNING: CPU|Kernel panic|Oops|protection fault|rcu_|Possible timer|blocked for more|oom-killer|Out of memory"
)
LINE = 1024  # a kernel log line is shorter (printk's limit): what a pattern is given of one
STALLS = ("soft-lockup", "rcu-stall", "hung-task", "freeze")  # a guest that stopped making progress
# the host's note, written into an attempt's directory once its QEMU is off, that the kernel under test stopped
# making progress (past its budget, or in a phase past that phase's end: a freeze); removed there after every other
# attempt, so a file of that name a guest left is never read as one
FREEZE_NOTE = "host-freeze.json"
CRASHES = ("panic", "oops", "bug")  # a kernel that died or was corrupted
STAMP = re.compile(r"^\s*\[\s*(\d+\.\d+)\]\s?")
FRAME = re.compile(r"^\s*(\?\s+)?([A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+")
NOISE = (
    (re.compile(r"0x[0-9a-f]+|\b[0-9a-f]{8,16}\b"), "#"),
    (re.compile(r"\b(CPU|PID|pid|cpu)[:#= ]+\d+"), r"\1 #"),
    (re.compile(r"\(\d+\)|\[\d+\]"), "(#)"),
    (re.compile(r"\b\d+(\.\d+)?s\b|\b\d+ seconds\b|\b\d+ jiffies\b"), "#s"),
    (re.compile(r"\b\d{2,}\b"), "#"),
)
TOP_FRAMES = 3
ACTOR_LEAD_S = 2.0  # a pressure actor is ready, and may already act, a moment before the agent logs phase_start


@dataclass
class Crash:
    kind: str
    said: str  # its first line, as the kernel printed it (bounded)
    frames: str  # the top frames of its trace, "a < b < c"
    signature: str  # kind + normalised first line + frames, hashed: the same crash, the same signature
    uptime_s: float | None  # the level's kernel time when it was printed
    line: str  # the line as the log has it (bounded, printable)


def printable(text: str) -> str:
    """Text a kernel or the host's note gave, as one line of text: each character that is not printable a '?'."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def normalise(text: str) -> str:
    for pattern, repl in NOISE:
        text = pattern.sub(repl, text)
    return " ".join(text.split())


def _frames(lines: list[str], start: int) -> list[str]:
    """The top frames of the trace that follows a report: the reliable ones, or where the kernel's unwinder marks
    every frame `?` (a guess: no frame pointers, no ORC), those."""
    sure: list[str] = []
    guessed: list[str] = []
    for line in lines[start + 1 : start + 80]:
        body = STAMP.sub("", line[:LINE])
        if m := FRAME.match(body):
            mine = guessed if m.group(1) else sure
            if m.group(2) not in mine:
                mine.append(m.group(2))
        elif (sure or guessed) and not body.strip().startswith(("<", "RIP", "Code", "RSP", "R", "---")):
            break
        if len(sure) >= TOP_FRAMES:
            break
    return (sure or guessed)[:TOP_FRAMES]


def scan_log(text: str) -> list[Crash]:
    """Every crash, stall, warning and OOM kill in one kernel log, in order. Only lines that hold a word of one are
    looked at (found in one pass over the text), each cut to a kernel log line's length: a log of garbage costs
    one pass, never a pattern's worst case."""
    lines = text.splitlines()
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    wanted = sorted({bisect.bisect_right(starts, m.start()) - 1 for m in WORDS.finditer(text)})
    out = []
    for i in wanted:
        line = lines[i][:LINE]
        body = STAMP.sub("", line)
        if body.lstrip().startswith("---["):  # "---[ end Kernel panic ... ]---": the same panic's last line
            continue
        for kind, pattern in KINDS:
            if m := pattern.search(body):
                said = printable(m.group(1).strip()[:200])
                frames = _frames(lines, i)
                key = f"{kind}\0{normalise(said)}\0{'<'.join(frames)}"
                stamp = STAMP.match(line)
                out.append(
                    Crash(
                        kind,
                        said,
                        " < ".join(frames),
                        hashlib.sha256(key.encode()).hexdigest()[:10],
                        float(stamp.group(1)) if stamp else None,
                        printable(line.strip()[:240]),
                    )
                )
                break
    return out


def _phases(kut_dir: Path, problems: Problems) -> list[tuple[str, int, int | None]]:
    """(phase, start, end or None while it ran) on the kernel under test's clock (ns), from its events. A pressure
    phase starts when its actor may act, a moment before the agent logs it: what its pressure caused is its."""
    events = list(records(kut_dir / "events.jsonl", problems, kut_dir, Event.from_guest))
    lead = int(ACTOR_LEAD_S * 1e9)
    starts = {
        e.phase: e.t - (lead if e.mode not in (None, "none") else 0)
        for e in events
        if e.kind is EventKind.PHASE_START and e.phase
    }
    ends = {e.phase: e.t for e in events if e.kind is EventKind.PHASE_END and e.phase}
    return sorted(((p, t, ends.get(p)) for p, t in starts.items()), key=lambda x: x[1])


def _phase_at(phases: list[tuple[str, int, int | None]], t: int | None, planned: list[str]) -> str:
    """The phase a time fell in; without a time (a console without timestamps), the phase still running when the
    log ended - a kernel that died mid-phase never logged its end - or else the next one planned (its pressure
    actor starts a moment before the phase is logged)."""
    if t is None:
        running = next((p for p, _, e in reversed(phases) if e is None), None)
        started = {p for p, _, _ in phases}
        return running or next((p for p in planned if p not in started), "")
    if not phases or t < phases[0][1]:
        return "boot"
    inside = next((p for p, s, e in phases if s <= t and (e is None or t <= e)), None)
    return inside or ("between" if t <= max(e or s for _, s, e in phases) else "after")


def scan_attempt(attempt_dir: Path, levels: list[tuple[str, str, Path]], problems: Problems) -> list[dict]:
    """Rows of the `crashes` table for one attempt's directory (the cell's, or one kept in failed/); levels: its
    guests' (name, level, export directory), tables.guest_dirs()."""
    phases = _phases(attempt_dir, problems)
    plan = json_object(attempt_dir / "plan.json", problems, attempt_dir) or {}
    schedule = plan.get("schedule")
    listed = schedule.get("phases", []) if isinstance(schedule, dict) else []
    planned = [str(p.get("name")) for p in listed if isinstance(p, dict)][:1000] if isinstance(listed, list) else []
    rows = []
    for guest, level, d in levels:
        ready = json_object(d / "ready.json", problems, attempt_dir) or {}
        t, up = ready.get("t"), ready.get("uptime_s")
        seen: set[tuple[str, str]] = set()
        for name in ("kmsg.log", "console.log"):
            try:
                text = read_text(d / name, limit=LOG_LIMIT, tail=LOG_LIMIT)
            except (GuestFileError, OSError):
                continue
            for c in scan_log(text):
                if (c.signature, c.said) in seen:
                    continue
                seen.add((c.signature, c.said))
                when = None
                if c.uptime_s is not None and isinstance(t, int) and isinstance(up, (int, float)):
                    when = int(t + (c.uptime_s - up) * 1e9)
                rows.append({"level": level, "guest": guest, **asdict(c), "phase": _phase_at(phases, when, planned)})
    return rows + _freeze(attempt_dir, problems, phases, planned)


def _freeze(attempt_dir: Path, problems: Problems, phases: list, planned: list[str]) -> list[dict]:
    """The row of a kernel under test that went silent: in the phase it was in when the host gave it up."""
    if not present(attempt_dir / FREEZE_NOTE):
        return []
    note = json_object(attempt_dir / FREEZE_NOTE, problems, attempt_dir)
    if not note or not isinstance(note.get("said"), str):
        return []
    stage = printable(str(note.get("stage", ""))[:120])
    said = f"{printable(note['said'][:120])} (last stage: {stage})"
    key = f"freeze\0{normalise(stage)}"
    crash = Crash("freeze", said, "", hashlib.sha256(key.encode()).hexdigest()[:10], None, said)
    return [{"level": "kut", "guest": "kut", **asdict(crash), "phase": _phase_at(phases, None, planned)}]
