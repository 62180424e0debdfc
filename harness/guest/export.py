"""Files of a guest's export as its parent touches them. Standard library only.

A guest owns its export and may put a link, a FIFO or a device where its parent will write or read (clock.jsonl,
hang.txt, qemu.stdout, ready.json, its console): with 9p's security_model=none, where the guest writes as the
host's root, a write through its link would land anywhere on the host. So a parent opens them here only: never
through a link, never blocking, regular files only.
"""

from __future__ import annotations

import os
import stat
from typing import IO


def export_file(path: str, mode: str = "rb") -> IO:
    """A file of a guest's export, opened as its parent may: never through a link a guest made, never blocking on a
    FIFO, only a regular file (OSError otherwise). mode as open() takes it: r, w (create or truncate), a (append)."""
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}
    fd = os.open(path, flags[mode[0]] | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a regular file")
    return os.fdopen(fd, mode)
