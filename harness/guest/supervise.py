"""Start a QEMU guest, wait for its agent, notice panics and hangs, stop it for sure.

Standard library only: the host runner and the in-guest agent both supervise their
children with this one class. Every process started here (QEMU, and the virtiofs server
of its root where there is one) is put in its own session, dies with its parent
(PR_SET_PDEATHSIG) and is killed on any exit path of `stop()`.
"""

from __future__ import annotations

import bisect
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

try:
    from .clock import PTP_KVM, READY_METHOD, Watch  # imported by the host as harness.guest.*
    from .export import export_file
except ImportError:  # in a guest: its directory is sys.path[0]
    from clock import PTP_KVM, READY_METHOD, Watch  # type: ignore[no-redef]
    from export import export_file  # type: ignore[no-redef]

CONSOLE_TAIL = 1 << 20  # what is read of a console, every poll, for a panic
PANIC_MARKERS = ("Kernel panic - not syncing", "end Kernel panic", "Attempted to kill init")
_LIVE: set[Child] = set()


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def lock_in_memory() -> str | None:
    """Keep this process's pages out of reclaim (mlockall: what it has mapped now and later, each page
    as it is touched); the error when the kernel refuses.

    The harness's own processes in a guest are not what pressure is meant to reclaim. And under QEMU
    10's TCG, with a nested guest running, the kernel under test's PID 1 twice segfaulted in libpython
    after a global phase had swapped it out: what the harness runs on must not depend on that."""
    if ctypes.CDLL(None, use_errno=True).mlockall(1 | 2 | 4) != 0:  # MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT
        return os.strerror(ctypes.get_errno())
    return None


def read(path: str, default: str | None = "") -> str | None:
    """A small text file (procfs, sysfs, cgroupfs, an export), stripped; default when it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def tail_bytes(path: str, limit: int = 8192) -> str:
    """The last `limit` bytes of a file a guest may have written (a console, a log), as text; "" when unreadable."""
    try:
        with export_file(path) as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""


def tail(path: str, lines: int = 20) -> str:
    return "\n".join(tail_bytes(path).splitlines()[-lines:]) or "(no console output)"


def _spawn(
    argv: list[str],
    stdout,
    stderr,
    env: dict[str, str] | None = None,
    cgroup_procs: str | None = None,
    cpus: frozenset[int] = frozenset(),
) -> subprocess.Popen:
    """cgroup_procs: the process joins that cgroup before it execs, so all it ever allocates is charged there;
    cpus: it and every thread it starts run on these CPUs only (cells side by side each on their own)."""

    def before_exec() -> None:
        _die_with_parent()
        if cgroup_procs:
            with open(cgroup_procs, "w") as f:
                f.write(str(os.getpid()))
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=before_exec,
        env=dict(os.environ, **env) if env else None,
    )


def _end(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process's session, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def monitor_command(path: str, command: str, timeout: float = 15.0) -> str:
    """One command on a QEMU human monitor socket, its answer (the text before the next prompt)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        buf = b""
        while b"(qemu) " not in buf:
            buf += s.recv(65536) or b"(qemu) "
        s.sendall(command.encode() + b"\n")
        buf = b""
        while buf.count(b"(qemu) ") < 1:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    text = buf.decode(errors="replace").replace("\r", "")
    return text.split("\n", 1)[1].rsplit("(qemu) ", 1)[0] if "\n" in text else text


def symbolize(rip: int, system_map: str | None) -> str:
    """rip as function+offset from the guest kernel's System.map, when there is one and rip is in it."""
    if not system_map or not os.path.exists(system_map):
        return f"{rip:#x}"
    addrs, names = [], []
    with open(system_map) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTwW":
                addrs.append(int(parts[0], 16))
                names.append(parts[2])
    i = bisect.bisect_right(addrs, rip) - 1
    return f"{rip:#x}" if i < 0 or rip - addrs[i] > 1 << 20 else f"{rip:#x} {names[i]}+{rip - addrs[i]:#x}"


class Child:
    """One QEMU process whose guest reports readiness by writing <export>/ready.json.

    rootfs_server: the virtiofs server of the guest's root (contract.RootServer: argv, socket),
    started first; QEMU starts once its socket exists. monitor: QEMU's human monitor socket (in argv),
    through which a guest that does not come up has its vCPUs' registers saved to hang.txt, and
    system_map: the guest kernel's System.map, to name the function each vCPU is in. clock: the host side of its
    clock port, where its clock is measured from ready to stop (guest/clock.py) - unless the guest's ready.json
    says it measures its own (ptp_kvm). env: added to QEMU's
    environment (a private QEMU's module directory). view_dir: where a 9p root's view of / was mounted
    (in QEMU's own namespace; here an empty directory), removed at stop. cgroup_procs: the host memory
    group QEMU and the server join (host.MemoryGroup). cpus: the host CPUs they run on (empty: any).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        export: str,
        console: str,
        boot_timeout: float = 300.0,
        rootfs_server=None,
        monitor: str | None = None,
        clock: str | None = None,
        system_map: str | None = None,
        env: dict[str, str] | None = None,
        view_dir: str | None = None,
        cgroup_procs: str | None = None,
        cpus: frozenset[int] = frozenset(),
    ):
        self.name, self.argv, self.export, self.console = name, argv, export, console
        self.view_dir = view_dir
        self.cgroup_procs, self.cpus = cgroup_procs, cpus
        self.boot_timeout = boot_timeout
        self.rootfs_server = rootfs_server
        self.monitor, self.system_map, self.env = monitor, system_map, env
        self.clock = Watch.port(clock, os.path.join(export, "clock.jsonl")) if clock else None
        self.server: subprocess.Popen | None = None
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.ready_s: float | None = None
        self.kernel_ready_s: float | None = None  # of ready_s, the guest kernel's uptime (the rest: QEMU,
        # firmware, RAM prealloc)
        self.failure: str | None = None  # why it is gone, once new_problem() has seen it

    def start(self) -> None:
        os.makedirs(self.export, exist_ok=True)
        with export_file(os.path.join(self.export, "qemu.argv.json"), "w") as f:
            json.dump(self.argv, f)
        self._stdout = export_file(os.path.join(self.export, "qemu.stdout"), "wb")
        self._stderr = export_file(os.path.join(self.export, "qemu.stderr"), "wb")
        self.started = time.monotonic()
        _LIVE.add(self)
        if self.rootfs_server:
            self._serve_root()
        self.proc = _spawn(self.argv, self._stdout, self._stderr, self.env, self.cgroup_procs, self.cpus)

    def _serve_root(self, timeout: float = 20.0) -> None:
        log = os.path.join(self.export, "rootfs.log")
        with export_file(log, "wb") as f:
            self.server = _spawn(
                self.rootfs_server.argv, f, subprocess.STDOUT, cgroup_procs=self.cgroup_procs, cpus=self.cpus
            )
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.rootfs_server.socket):
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: the virtiofs server of its root did not start "
                    f"(status {self.server.poll()}): {tail(log, 5)}"
                )
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def console_text(self) -> str:
        """The end of its console, where a panic shows (bounded: a guest may make its console any size)."""
        return tail_bytes(self.console, CONSOLE_TAIL)

    def problem(self) -> str | None:
        """Why this guest is not going to make it, or None while it still might."""
        text = self.console_text()
        for marker in PANIC_MARKERS:
            if marker in text:
                return f"{self.name}: kernel panic ({marker})"
        if self.proc and self.proc.poll() is not None:
            err = tail(os.path.join(self.export, "qemu.stderr"), 5)
            return f"{self.name}: QEMU exited with status {self.proc.returncode}" + (f" ({err})" if err else "")
        return None

    def new_problem(self) -> str | None:
        """problem(), said once: a guest that died is reported the first time it is seen, not every poll."""
        if self.failure is not None:
            return None
        self.failure = self.problem()
        return self.failure

    def wait_ready(self, timeout: float, poll: float = 0.2) -> float:
        """Seconds from QEMU start to agent ready; raises RuntimeError with the console tail otherwise."""
        ready = os.path.join(self.export, "ready.json")
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if os.path.exists(ready):
                self.ready_s = time.monotonic() - self.started
                said = self._ready_record(ready)
                self.kernel_ready_s = self._number(said, "uptime_s")
                if self.clock and said.get(READY_METHOD) == PTP_KVM:
                    self.clock = None  # the guest measures its own clock, more closely than the port could
                if self.clock:
                    self.clock.start()
                return self.ready_s
            why = self.problem()
            if why:
                raise RuntimeError(f"{why}; last console lines:\n{tail(self.console)}")
            time.sleep(poll)
        raise RuntimeError(
            f"{self.name}: agent not ready after {timeout:.0f}s (boot hang?); "
            f"{self.where()}; last console lines:\n{tail(self.console)}"
        )

    def where(self, samples: int = 3) -> str:
        """Where the guest's vCPUs are (a few register snapshots, a second apart, saved to hang.txt)."""
        if not self.monitor or not self.proc or self.proc.poll() is not None:
            return "no monitor to ask where it is"
        shots = []
        try:
            for _ in range(samples):
                shots.append(monitor_command(self.monitor, "info registers -a"))
                time.sleep(1)
        except OSError as e:
            return f"its monitor did not answer ({e})"
        with export_file(os.path.join(self.export, "hang.txt"), "w") as f:
            f.write("\n\n".join(shots))
        rips = [symbolize(int(m, 16), self.system_map) for shot in shots for m in re.findall(r"RIP=([0-9a-f]+)", shot)]
        return "vCPUs at " + ", ".join(rips) + " (hang.txt has their registers)"

    @staticmethod
    def _ready_record(path: str, limit: int = 4096) -> dict:
        """What the guest said in ready.json (untrusted: its first 4 KiB, {} unless they are a JSON object)."""
        for _ in range(10):  # the file may show up before its content does
            try:
                with export_file(path) as f:
                    rec = json.loads(f.read(limit))
                if isinstance(rec, dict):
                    return rec
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        return {}

    @staticmethod
    def _number(rec: dict, key: str) -> float | None:
        try:
            return float(rec[key])
        except (KeyError, TypeError, ValueError):
            return None

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout) if self.proc else None
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> int | None:
        """Ask nicely (SIGTERM makes QEMU quit), then kill the whole session; then the root's server. Idempotent."""
        if self not in _LIVE:
            return self.proc.returncode if self.proc else None
        if self.clock:
            self.clock.stop()
        if self.proc:
            _end(self.proc, grace)
        if self.server:
            _end(self.server, 2.0)
            # its read-only view of / was mounted in its own namespace: here `root` is an empty directory
            shutil.rmtree(os.path.dirname(self.rootfs_server.socket), ignore_errors=True)
        if self.view_dir:
            shutil.rmtree(self.view_dir, ignore_errors=True)
        for f in (self._stdout, self._stderr):
            f.close()
        _LIVE.discard(self)
        return self.proc.returncode if self.proc else None


def stop_all() -> None:
    for child in list(_LIVE):
        child.stop(grace=2.0)
