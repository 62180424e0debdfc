"""A run's directory: its id (a name, never a path), where it is, and the one writer that holds it."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

from .. import REPO_ROOT
from ..config import Matrix
from ..errors import ConfigError, HarnessError
from ..results.manifest import Manifest

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def harness_commit() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


def new_run_id() -> str:
    """Sorts by start time; the random tail keeps two runs started in the same second apart."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def check_run_id(run_id: str) -> str:
    """A run id is one directory name under <output>/<experiment>: never a path, never `..`."""
    if not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(f"--run-id {run_id!r}: letters, digits, '_', '.', '-' only (a name, not a path)")
    return run_id


def find_run_dir(matrix: Matrix, run_id: str | None, resume: bool, root: Path | None = None) -> Path:
    """An explicit run id (resume into it), the newest run of this config (--resume), or a new one."""
    base = (root or Path(matrix.experiment.output)).resolve() / matrix.experiment.name
    if run_id is not None:
        return base / check_run_id(run_id)
    if resume and base.exists():
        for d in sorted(base.iterdir(), reverse=True):
            m = d / "manifest.json"
            if m.exists() and Manifest.load(m).config_hash == matrix.config_hash():
                return d
    return base / new_run_id()


def lock_run_dir(run_dir: Path) -> int:
    """One writer per run directory (a second run with the same --run-id, here or from a fleet job, would
    interleave cells and records): an exclusive lock held while the run lasts; returns its descriptor."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".writer.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise HarnessError(
            f"{run_dir}: another nestpress run (pid {holder}) is writing this run directory; wait for it to end "
            "or choose another --run-id"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
