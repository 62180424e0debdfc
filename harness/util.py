"""Small shared helpers: logging, subprocesses, atomic cache entries, hashing, tool checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import HarnessError, MissingTool

# Off a terminal (a log, `| tee`, fab over SSH) a line stays one line: no wrapping at 80 columns, no colour codes.
console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


def log(msg: str, style: str | None = None) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", style=style, markup=True)


def warn(msg: str) -> None:
    console.print(f"[bold yellow]WARNING[/bold yellow] {msg}")


class _LogStatus:
    """status() off a terminal (CI logs, nohup, fab over SSH): the same text as a log line now and then."""

    def __init__(self, every_s: float):
        self.every_s, self.last = every_s, 0.0

    def update(self, msg: str) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            log(msg)


class _Board:
    """The one live status line of a terminal, shared by what runs at once (cells side by side): each holder
    writes its own part of it; rich allows one live display at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.parts: dict[int, str] = {}
        self.live: Any = None

    def open(self, key: int, msg: str) -> None:
        with self.lock:
            self.parts[key] = msg
            if self.live is None:
                self.live = console.status(msg)
                self.live.__enter__()
            self._show()

    def update(self, key: int, msg: str) -> None:
        with self.lock:
            self.parts[key] = msg
            self._show()

    def close(self, key: int) -> None:
        with self.lock:
            self.parts.pop(key, None)
            if not self.parts and self.live is not None:
                self.live.__exit__(None, None, None)
                self.live = None
            elif self.live is not None:
                self._show()

    def _show(self) -> None:
        self.live.update(" || ".join(self.parts.values()))


_BOARD = _Board()


class _BoardLine:
    def __init__(self, key: int):
        self.key = key

    def update(self, msg: str) -> None:
        _BOARD.update(self.key, msg)


@contextlib.contextmanager
def status(msg: str, every_s: float = 30.0) -> Iterator[Any]:
    """A live status line on a terminal (one line, shared by whatever holds one at once); elsewhere a progress
    line every `every_s` seconds."""
    if console.is_terminal:
        key = threading.get_ident()
        _BOARD.open(key, msg)
        try:
            yield _BoardLine(key)
        finally:
            _BOARD.close(key)
    else:
        lines = _LogStatus(every_s)
        lines.update(msg)
        yield lines


def run(
    cmd: list[str],
    *,
    capture: bool = False,
    check: bool = True,
    cwd: str | Path | None = None,
    env: dict | None = None,
    stdin: Any = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """Run an argument list (never a shell string); raise HarnessError with the output tail on failure."""
    try:
        r = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdin=stdin,
            timeout=timeout,
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
        )
    except FileNotFoundError:
        raise HarnessError(f"command not found: {cmd[0]}") from None
    except subprocess.TimeoutExpired:
        raise HarnessError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    if check and r.returncode != 0:
        tail = ((r.stderr or "") + (r.stdout or ""))[-2000:] if capture else ""
        raise HarnessError(f"command failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}".rstrip())
    return r


# Debian package for every external tool the harness calls: one place, used by doctor and setup.
TOOL_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "cpio": "cpio",
    "ccache": "ccache",
    "git": "git",
    "tar": "tar",
    "xz": "xz-utils",
    "mkswap": "util-linux",
    "ssh": "openssh-client",
    "perl": "perl",
    "openssl": "openssl",
}
# headers found by path rather than by a binary
HEADER_PACKAGES = {"/usr/include/libelf.h": "libelf-dev", "/usr/include/openssl/ssl.h": "libssl-dev"}


def which(tool: str) -> str | None:
    return shutil.which(tool) or next((p for d in ("/usr/sbin", "/sbin") if os.path.exists(p := f"{d}/{tool}")), None)


def need_tool(tool: str, package: str | None = None) -> str:
    path = which(tool)
    if not path:
        raise MissingTool(tool, package or TOOL_PACKAGES.get(tool, tool))
    return path


_HASHES: dict[tuple[str, int, int], str] = {}


def hash_file(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so big tarballs hash once per process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def hash_text(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@contextlib.contextmanager
def atomic_dir(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Fill a temp sibling and rename it into place: an interrupted fill never looks complete. A dest that
    exists by then was completed by another process (maybe still in use): kept, ours dropped; replace (for
    a caller that holds the lock over dest) swaps out a stale one instead."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists() and replace:
            shutil.rmtree(dest)
        if not dest.exists():
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """A temp sibling to fill, renamed into place on success: readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """A temp sibling of its own (created exclusively: a link planted in a guest-writable directory is never
    followed), synced, renamed over the old file: readers and crashes never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def what_is(path: Path) -> str:
    """What is at a path, following links as a reader would: "a regular file", "no such file", "a directory",
    "a FIFO", "a device", "a socket" (to refuse a config's path that is no file with what it is instead)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "no such file" + (" (a link to nothing)" if path.is_symlink() else "")
    kinds = {"a regular file": stat.S_ISREG, "a directory": stat.S_ISDIR, "a FIFO": stat.S_ISFIFO}
    kinds |= {"a socket": stat.S_ISSOCK, "a device": stat.S_ISCHR, "a block device": stat.S_ISBLK}
    return next((name for name, test in kinds.items() if test(mode)), "not a regular file")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def default_cache() -> Path:
    return Path(os.environ.get("NESTPRESS_CACHE") or Path.home() / ".cache" / "nestpress")


def own_cache(path: Path) -> Path:
    """The build cache, made private if new; refused if another user owns it or others may write it: its
    kernels and trees are what this user (often root) boots and builds."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise HarnessError(
            f"cache {path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}: another user could "
            f"plant kernels there; use a cache of your own (NESTPRESS_CACHE, or --cache) that only you can write"
        )
    return path


def python_for_guests() -> str:
    """The interpreter guests run the agent with (stdlib only): the real binary behind this one."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))
