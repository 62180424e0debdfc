"""Running the harness on lab hosts over SSH (Fabric), one host or a fleet.

- Unknown host keys are rejected unless the user opts in (--accept-new-host).
- Every connection has a connect timeout and SSH keepalive; every command a timeout.
- The harness and the config are shipped (tar + put): the host needs no checkout of ours.
- Long commands run detached on the host (setsid nohup, pid and exit status in files),
  so a dropped connection loses nothing: the controller reconnects and reattaches, and
  on Ctrl-C it stops the remote job (whose own handlers stop every QEMU it started).
- Results come back with tar + get into the local results/ tree.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import os
import shlex
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
from fabric import Connection

from . import REPO_ROOT
from .errors import RemoteError
from .util import log, warn

CONNECT_TIMEOUT_S = 15
KEEPALIVE_S = 15
RECONNECT_S = 300  # how long the controller keeps trying to reattach after a drop
SHIP_EXCLUDE = (".venv", "results", ".git", "__pycache__", ".pytest_cache", "build")


def project_files() -> list[str]:
    """Files to ship: what git tracks (never untracked files: a stray secret would travel to every host);
    outside a git checkout, a walk minus build outputs."""
    r = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return [f for f in r.stdout.splitlines() if (REPO_ROOT / f).is_file()]
    out = []
    for root, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in SHIP_EXCLUDE and not d.endswith(".egg-info")]
        out += [os.path.relpath(os.path.join(root, f), REPO_ROOT) for f in files]
    return out


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Shipped code belongs to root and nobody else may write it: root runs it on the lab host."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode &= ~0o022
    return info


def _tarball(files: list[tuple[str, Path]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for arcname, path in files:
            tar.add(str(path), arcname=arcname, recursive=False, filter=_root_owned)
    return buf.getvalue()


def fingerprint(key: paramiko.PKey) -> str:
    """As ssh-keygen -l prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """--accept-new-host: an unknown host's key is trusted once, saved to known_hosts and shown; from then
    on that key is the only one accepted (a changed key is refused: paramiko.BadHostKeyException)."""

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        log(f"{hostname}: new host key {key.get_name()} {fingerprint(key)} trusted, saved to {self.known_hosts}")


class Remote:
    """One lab host: connect safely, ship, bootstrap, run detached, reattach, fetch."""

    def __init__(
        self, c: Connection, remote_dir: str = "~/.nestpress", accept_new_host: bool = False, cache: str | None = None
    ):
        self.c = c
        self.accept_new_host = accept_new_host
        self.remote_dir_spec = remote_dir
        self.cache = cache
        self.name = f"{c.user}@{c.host}:{c.port}"
        self._home: str | None = None
        self.job: str | None = None  # the detached job this controller follows, if any

    # -- connection ---------------------------------------------------------------------------
    def connect(self) -> None:
        c = self.c
        if c.is_connected:
            return
        known = Path(os.environ.get("NESTPRESS_KNOWN_HOSTS") or Path.home() / ".ssh" / "known_hosts")
        for path in (Path("/etc/ssh/ssh_known_hosts"), known):
            if path.exists():
                c.client.get_host_keys().load(str(path))
        c.client.set_missing_host_key_policy(
            _TrustOnFirstUse(known) if self.accept_new_host else paramiko.RejectPolicy()
        )
        c.connect_timeout = CONNECT_TIMEOUT_S
        c.connect_kwargs.setdefault("banner_timeout", CONNECT_TIMEOUT_S)
        c.connect_kwargs.setdefault("auth_timeout", CONNECT_TIMEOUT_S)
        try:
            c.open()
        except paramiko.BadHostKeyException as e:
            raise RemoteError(
                f"{self.name}: host key CHANGED: it offers {e.key.get_name()} {fingerprint(e.key)}, known_hosts "
                f"has {fingerprint(e.expected_key)}; refused (if the host was reinstalled, remove its old key)"
            ) from None
        except paramiko.AuthenticationException as e:
            raise RemoteError(f"{self.name}: authentication failed ({e}); check the user and key (-i)") from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise RemoteError(
                    f"{self.name}: unknown host key - verify it and add it to ~/.ssh/known_hosts, "
                    "or pass --accept-new-host to trust it on first use"
                ) from None
            raise RemoteError(f"{self.name}: SSH error: {e}") from None
        except (TimeoutError, OSError, paramiko.ssh_exception.NoValidConnectionsError) as e:
            raise RemoteError(f"{self.name}: unreachable within {CONNECT_TIMEOUT_S}s ({e})") from None
        c.transport.set_keepalive(KEEPALIVE_S)

    def sh(self, cmd: str, timeout: float = 120, warn_only: bool = False, hide: bool = True):
        """Run a shell command on the host (callers quote every variable part with shlex.quote)."""
        self.connect()
        try:
            r = self.c.run(cmd, hide=hide, warn=True, timeout=timeout, in_stream=False)
        except Exception as e:  # invoke raises CommandTimedOut, paramiko/socket errors on drops
            raise RemoteError(f"{self.name}: `{cmd[:80]}` failed: {type(e).__name__}: {e}") from None
        if r.failed and not warn_only:
            raise RemoteError(f"{self.name}: `{cmd[:120]}` exited {r.exited}:\n{(r.stderr or r.stdout)[-1500:]}")
        return r

    @property
    def home(self) -> str:
        if self._home is None:
            self._home = self.sh("echo $HOME").stdout.strip()
        return self._home

    @property
    def root(self) -> str:
        """The host's nestpress dir; `{host}` in it becomes host-port (for homes shared between hosts)."""
        d = self.remote_dir_spec.replace("{host}", f"{self.c.host}-{self.c.port}")
        return self.home + d[1:] if d.startswith("~") else d

    @property
    def app(self) -> str:
        return f"{self.root}/app"

    def _python_cmd(self, args: list[str]) -> str:
        env = f"NESTPRESS_CACHE={shlex.quote(self.cache)} " if self.cache else ""
        return f"cd {shlex.quote(self.app)} && {env}.venv/bin/python -m harness " + " ".join(map(shlex.quote, args))

    # -- shipping and bootstrap ----------------------------------------------------------------
    def ship(self, config: Path | None = None) -> str | None:
        """Put the harness (and the config) on the host; returns the config's remote path."""
        files = [(f, REPO_ROOT / f) for f in project_files()]
        remote_config = None
        if config is not None:
            files.append((f"shipped/{config.name}", config))
            remote_config = f"{self.app}/shipped/{config.name}"
        data = _tarball(files)
        tmp = f"{self.root}/incoming-{os.getpid()}.tgz"
        self.sh(f"mkdir -p {shlex.quote(self.app)}")
        self.c.put(io.BytesIO(data), remote=tmp)
        self.sh(
            f"cd {shlex.quote(self.app)} && rm -rf harness configs patches "
            f"&& tar --no-same-owner --no-same-permissions -xzf {shlex.quote(tmp)} "
            f"&& rm -f {shlex.quote(tmp)}"
        )
        log(f"{self.name}: shipped {len(files)} files ({len(data) >> 10} KiB) to {self.app}")
        return remote_config

    def ensure_env(self) -> None:
        """A venv with the harness installed, redone only when pyproject.toml changes."""
        stamp = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
        app = shlex.quote(self.app)
        if self.sh(f"cat {app}/.venv/.nestpress-stamp", warn_only=True).stdout.strip() == stamp:
            return
        r = self.sh("command -v python3", warn_only=True)
        if r.failed:
            raise RemoteError(f"{self.name}: python3 not found; run `fab setup` (installs python3, python3-venv)")
        log(f"{self.name}: installing the harness into {self.app}/.venv (once per pyproject change)")
        self.sh(
            f"cd {app} && python3 -m venv .venv && .venv/bin/pip install -q -e . && "
            f"echo {stamp} > .venv/.nestpress-stamp",
            timeout=1200,
        )

    def python(self, args: list[str], timeout: float = 600):
        return self.sh(self._python_cmd(args), timeout=timeout, hide=False)

    # -- detached jobs --------------------------------------------------------------------------
    def start_job(self, job: str, args: list[str]) -> None:
        self.job = job
        jobs = shlex.quote(f"{self.root}/jobs")
        j = shlex.quote(f"{self.root}/jobs/{job}")
        inner = f"{self._python_cmd(args)}; echo $? > {j}.rc"
        self.sh(f"mkdir -p {jobs} && rm -f {j}.rc {j}.pid")
        # only the job goes to the background (`a && b & c` would background the whole chain)
        self.sh(f"setsid nohup sh -c {shlex.quote(inner)} > {j}.log 2>&1 < /dev/null & echo $! > {j}.pid")
        log(f"{self.name}: started detached job {job} (log {self.root}/jobs/{job}.log)")

    def job_state(self, job: str) -> str:
        """running | done | absent."""
        j = shlex.quote(f"{self.root}/jobs/{job}")
        r = self.sh(
            f"if [ -f {j}.rc ]; then echo done; elif [ -f {j}.pid ] && kill -0 $(cat {j}.pid) 2>/dev/null; "
            f"then echo running; else echo absent; fi"
        )
        return r.stdout.strip()

    def follow(self, job: str, prefix: str = "") -> int:
        """Stream the job's log until it ends; reattach after drops (run_on_hosts stops it on Ctrl-C)."""
        j = f"{self.root}/jobs/{job}"
        reconnect_for_s = float(os.environ.get("NESTPRESS_RECONNECT_S", RECONNECT_S))
        offset = 0
        lost_since = None
        while True:
            try:
                out = self.sh(f"tail -c +{offset + 1} {shlex.quote(j + '.log')}", warn_only=True).stdout
                if out:
                    offset += len(out.encode())
                    for line in out.splitlines():
                        print(f"{prefix}{line}", flush=True)
                rc = self.sh(f"cat {shlex.quote(j + '.rc')}", warn_only=True)
                if not rc.failed and rc.stdout.strip():
                    self.job = None
                    return int(rc.stdout.strip())
                if self.job_state(job) == "absent":
                    self.job = None
                    raise RemoteError(f"{self.name}: job {job} vanished without an exit status")
                lost_since = None
            except RemoteError as e:
                if "vanished" in str(e):
                    raise
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > reconnect_for_s:
                    raise RemoteError(
                        f"{self.name}: connection lost for {reconnect_for_s:.0f}s; the job keeps "
                        f"running on the host. Re-run the same command with the same --run-id "
                        f"to reattach or resume."
                    ) from None
                warn(f"{self.name}: connection problem ({e}); reconnecting")
                self.c.close()
            time.sleep(2)

    def stop_job(self, job: str) -> None:
        j = shlex.quote(f"{self.root}/jobs/{job}")
        self.sh(
            f"[ -f {j}.pid ] && kill -TERM -- -$(cat {j}.pid) 2>/dev/null; "
            f"for i in $(seq 60); do kill -0 $(cat {j}.pid) 2>/dev/null || break; sleep 1; done; "
            f"kill -KILL -- -$(cat {j}.pid) 2>/dev/null; true",
            warn_only=True,
            timeout=90,
        )

    # -- results --------------------------------------------------------------------------------
    def fetch(self, remote_run: str, local_root: Path, host_tag: str) -> Path:
        """tar + get one run directory into local_root/<experiment>/<run-id>/, merging with what is there.

        The host's manifest is kept as hosts/<host_tag>.manifest.json; the caller merges them."""
        parent, rel = remote_run.rsplit("/", 2)[0], "/".join(remote_run.rsplit("/", 2)[1:])
        tmp = f"{self.root}/fetch-{os.getpid()}-{host_tag}.tgz"
        self.sh(f"tar -czf {shlex.quote(tmp)} -C {shlex.quote(parent)} {shlex.quote(rel)}", timeout=600)
        buf = io.BytesIO()
        self.c.get(tmp, local=buf)
        self.sh(f"rm -f {shlex.quote(tmp)}")
        buf.seek(0)
        local_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=buf, mode="r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                if m.name == f"{rel}/manifest.json":
                    m.name = f"{rel}/hosts/{host_tag}.manifest.json"
            tar.extractall(local_root, members=members, filter="data")  # "data" refuses absolute and .. paths
        dest = local_root / rel
        log(f"{self.name}: fetched {remote_run} -> {dest}")
        return dest


def run_on_hosts(remotes: list[Remote], fn: Callable[[Remote, int], int]) -> dict[str, object]:
    """Call fn(remote, index) for every host in parallel; one host's failure does not stop the others.

    Ctrl-C reaches only this (the main) thread: it stops the remote job of every host that has one, and
    says so; a second Ctrl-C while they stop leaves them running and says how to reattach."""
    results: dict[str, object] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(remotes), thread_name_prefix="host")
    futures = {pool.submit(fn, r, i): r for i, r in enumerate(remotes)}
    try:
        pending = set(futures)
        while pending:
            _, pending = concurrent.futures.wait(pending, timeout=0.5)
    except KeyboardInterrupt:
        running = [r for r in remotes if r.job]
        warn(
            f"Ctrl-C: stopping the remote job on {', '.join(r.name for r in running) or 'no host'} "
            "(Ctrl-C again to leave them running)"
        )
        try:
            for r in running:
                r.stop_job(str(r.job))
        except KeyboardInterrupt:
            warn("left the remote jobs running; reattach with the same command and --run-id")
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for f, r in futures.items():
        try:
            results[r.name] = f.result()
        except BaseException as e:
            results[r.name] = e
    return results
