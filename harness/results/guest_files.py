"""The one reader of what guests wrote: the run (while a cell runs and when it ends) and the tables read every guest
file through here, as untrusted data.

A guest, L2 included, writes its export as it pleases: any bytes, links, FIFOs, devices, directories nested a
thousand deep, files of any size, sparse or not. So every read here opens regular files only, never through a
link (O_NOFOLLOW) and never blocking (O_NONBLOCK: a FIFO or device is refused, not waited on); reads at most a
bounded size, streams JSON lines one at a time (a line over LINE_LIMIT is skipped unread), refuses nesting past
MAX_DEPTH, and checks every record against its contract type. Whatever does not fit is a counted, named problem
of its cell (Problems), never an exception: a guest can fail its own cell, never the run or the report.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..errors import HarnessError
from ..guest.contract import ContractError

FILE_LIMIT = 1 << 30  # a guest's record files: hours of samples are a few hundred MB
LINE_LIMIT = 1 << 20  # one record; a probe interval's histogram with its outliers is a few KiB
MAX_DEPTH = 32  # JSON nesting: no record of the contract is deeper than 4
DIR_DEPTH = 8  # directories below a cell's: its guests' exports are at most 2 deep
CHUNK = 1 << 16


class GuestFileError(HarnessError):
    """A file a guest wrote is no regular file, too large, or unreadable: data, never a crash."""


class Problems(list[str]):
    """What was wrong with a cell's guest files (torn, missing, not data): said with the cell named."""

    def note(self, path: Path, cell_dir: Path, what: str) -> None:
        said = f"{path.relative_to(cell_dir) if path.is_relative_to(cell_dir) else path}: {what}"
        if said not in self:  # a file read twice (its phases, then its rows) is said once
            self.append(said)


def open_regular(path: Path) -> int:
    """A descriptor of a regular file that is not a link; GuestFileError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:  # a link: ELOOP, "Too many levels of symbolic links"
        raise GuestFileError(f"{path}: unreadable ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GuestFileError(f"{path}: not a regular file")
    return fd


def present(path: Path) -> bool:
    """Something is there (a link counts: it is what a guest left, to be refused, not skipped)."""
    return os.path.lexists(path)


def read_text(path: Path, limit: int = FILE_LIMIT, tail: int | None = None) -> str:
    """A file a guest wrote, as text: at most `limit` bytes (a larger file is refused), or only its last `tail`."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if tail is not None and size > tail:
            f.seek(size - tail)
        elif size > limit:
            raise GuestFileError(f"{path}: {size >> 20} MiB, over the {limit >> 20} MiB a guest may write")
        return f.read(tail if tail is not None else limit).decode(errors="replace")


def _depth(value: Any, limit: int) -> bool:
    """value nests no deeper than limit (iteratively: the check itself must not recurse on a guest's data)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def _loads(text: str) -> Any:
    """One JSON value nesting at most MAX_DEPTH deep, or ValueError (RecursionError from the decoder for what
    nests past Python's own limit: callers take both as a malformed line)."""
    value = json.loads(text)
    if not _depth(value, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    return value


def json_record(text: str) -> dict:
    """One JSON line that must hold an object (ValueError or RecursionError otherwise)."""
    value = _loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a record but {type(value).__name__}")
    return value


def json_object(path: Path, problems: Problems, cell_dir: Path, limit: int = 1 << 20) -> dict | None:
    """One JSON object a guest wrote (facts.json, plan.json, exit.json), or None with the reason noted."""
    try:
        value = _loads(read_text(path, limit=limit))
    except (GuestFileError, ValueError, RecursionError) as e:
        problems.note(path, cell_dir, f"torn or unreadable ({str(e).split(': ', 1)[-1][:200]})")
        return None
    if not isinstance(value, dict):
        problems.note(path, cell_dir, "not a JSON object")
        return None
    return value


def _lines(fd: int) -> Iterator[bytes | None]:
    """The file's lines, read in chunks; None for a line over LINE_LIMIT (skipped without keeping it)."""
    rest, skipping, total = b"", False, 0
    while total <= FILE_LIMIT and (chunk := os.read(fd, CHUNK)):
        total += len(chunk)
        *lines, tail = (rest + chunk).split(b"\n")
        for line in lines:
            yield None if skipping or len(line) > LINE_LIMIT else line
            skipping = False
        rest = tail
        if len(rest) > LINE_LIMIT:
            rest, skipping = b"", True
    if rest and not skipping:
        yield rest  # a last line without its newline (a crash mid-write): the caller finds it torn or not


def json_lines(path: Path, problems: Problems, cell_dir: Path) -> Iterator[dict]:
    """The JSON objects of a JSON-lines file a guest wrote, one at a time. Torn, malformed, overlong or too deeply
    nested lines are skipped and counted; a file that is no regular file, or too large, is skipped and said."""
    if not present(path):
        return
    try:
        fd = open_regular(path)
    except GuestFileError as e:
        problems.note(path, cell_dir, str(e).split(": ", 1)[-1])
        return
    if os.fstat(fd).st_size > FILE_LIMIT:
        os.close(fd)
        problems.note(path, cell_dir, f"over the {FILE_LIMIT >> 20} MiB a guest may write: not read")
        return
    bad = 0
    try:
        for line in _lines(fd):
            try:
                rec = _loads(line.decode(errors="replace")) if line is not None else None
            except (ValueError, RecursionError):
                rec = None
            if isinstance(rec, dict):
                yield rec
            else:
                bad += 1
    finally:
        os.close(fd)
        if bad:
            problems.note(path, cell_dir, f"{bad} torn or malformed line(s) skipped")  # overlong and too deep too


R = TypeVar("R")


def records(path: Path, problems: Problems, cell_dir: Path, parse: Callable[[dict], R | None]) -> Iterator[R]:
    """json_lines() as contract records: parse(line) gives the record (None: a line to pass over, not a
    problem), or raises ContractError, KeyError, TypeError or ValueError for a line that does not fit its type,
    which is skipped and counted with the first reason."""
    bad, first = 0, ""
    for line in json_lines(path, problems, cell_dir):
        try:
            rec = parse(line)
        except (ContractError, KeyError, TypeError, ValueError) as e:
            bad, first = bad + 1, first or str(e)[:200]
            continue
        if rec is not None:
            yield rec
    if bad:
        problems.note(path, cell_dir, f"{bad} record(s) without the fields their kind has, skipped (first: {first})")


def walk(top: Path, max_depth: int | None = None) -> Iterator[tuple[Path, list[os.DirEntry]]]:
    """Every directory under top (never through a link) with its entries, without recursion: a guest may nest
    directories as deep as it likes. max_depth: not below that many levels under top."""
    stack = [(top, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            continue
        yield d, entries
        if max_depth is None or depth < max_depth:
            stack.extend((Path(e.path), depth + 1) for e in entries if e.is_dir(follow_symlinks=False))


def defuse(top: Path) -> list[str]:
    """A guest's root writes its export as the host's root (9p security_model=none): once it is off, remove
    what results have no use for and a local user could abuse (links, device nodes, fifos, sockets) and drop
    setuid/setgid and group/other write bits. Returns what it changed, relative to top."""
    changed = []
    for _, entries in walk(top):
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                os.unlink(e.path)
                changed.append(os.path.relpath(e.path, top))
            elif st.st_mode & 0o7022 & ~stat.S_ISVTX:
                os.chmod(e.path, stat.S_IMODE(st.st_mode) & 0o755, follow_symlinks=False)
                changed.append(os.path.relpath(e.path, top))
    return changed
