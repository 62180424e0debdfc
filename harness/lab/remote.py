"""Running the harness on lab hosts over SSH (Fabric), one host or a fleet.

- Unknown host keys are rejected unless the user opts in (--accept-new-host).
- Every connection has a connect timeout and SSH keepalive; every command a timeout.
- The harness and the config are shipped (tar + put) into a directory named by their content,
  app/<hash>, and `current` points at the newest: a job that runs keeps the code it started with,
  and a second job of the same experiment on one host is refused.
- A keepalive every KEEPALIVE_S seconds that wants an answer; a peer that answers none for
  KEEPALIVE_COUNT of them in a row is dead (its connection is closed, so whatever waits on it fails
  now, well within RECONNECT_S); every transfer has an idle timeout.
- Long commands run detached on the host (setsid nohup, pid and exit status in files),
  so a dropped connection loses nothing: the controller reconnects and reattaches, and
  on Ctrl-C it stops the remote job (whose own handlers stop every QEMU it started).
- Results come back with tar + get into the local results/ tree.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import shlex
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import paramiko
from fabric import Connection

from .. import REPO_ROOT
from ..errors import RemoteError
from ..util import log, warn
from .shipping import config_files, content_id, project_files, tarball
from .ssh import Heartbeat, TrustOnFirstUse, fingerprint

CONNECT_TIMEOUT_S = 15
KEEPALIVE_S = 15  # NESTPRESS_KEEPALIVE_S overrides (tests)
KEEPALIVE_COUNT = 3  # keepalives in a row without an answer: the peer is dead
STOP_WAIT_S = 60  # how long Ctrl-C waits for a job's start under way to finish, to stop it
RECONNECT_S = 300  # how long the controller keeps trying to reattach after a drop
TRANSFER_IDLE_S = 120  # a put/get that moves no byte for this long fails
KEEP_APPS = 3  # shipped code directories kept on a host besides those running jobs use


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
        self._app: str | None = None  # set by ship(): the code directory this controller's jobs use
        self.job: str | None = None  # the detached job this controller follows, if any (its pid file exists)
        self.starting = threading.Lock()  # held while a job is being started
        self.cancelled = threading.Event()  # Ctrl-C: no job may start any more
        self.dead: str | None = None  # why the heartbeat closed the connection, if it did

    # -- connection ---------------------------------------------------------------------------
    def connect(self) -> None:
        c = self.c
        if c.is_connected:
            return
        known = Path(os.environ.get("NESTPRESS_KNOWN_HOSTS") or Path.home() / ".ssh" / "known_hosts")
        hop: object = c
        while isinstance(hop, Connection):  # the host and every jump host (ProxyJump) before it: one policy
            for path in (Path("/etc/ssh/ssh_known_hosts"), known):
                if path.exists():
                    hop.client.get_host_keys().load(str(path))
            hop.client.set_missing_host_key_policy(
                TrustOnFirstUse(known) if self.accept_new_host else paramiko.RejectPolicy()
            )
            hop = hop.gateway
        c.connect_timeout = CONNECT_TIMEOUT_S
        c.connect_kwargs.setdefault("banner_timeout", CONNECT_TIMEOUT_S)
        c.connect_kwargs.setdefault("auth_timeout", CONNECT_TIMEOUT_S)
        try:
            c.open()
        except paramiko.BadHostKeyException as e:
            raise RemoteError(
                f"{self.name}: host key of {e.hostname} CHANGED: it offers {e.key.get_name()} {fingerprint(e.key)}, "
                f"known_hosts has {fingerprint(e.expected_key)}; refused (if the host was reinstalled, remove its "
                "old key)"
            ) from None
        except paramiko.AuthenticationException as e:
            raise RemoteError(f"{self.name}: authentication failed ({e}); check the user and key (-i)") from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                server = str(e).split("'")[1] if str(e).count("'") >= 2 else c.host
                raise RemoteError(
                    f"{self.name}: unknown host key of {server} - verify it and add it to ~/.ssh/known_hosts, "
                    "or pass --accept-new-host to trust it on first use"
                ) from None
            raise RemoteError(f"{self.name}: SSH error: {e}") from None
        except (TimeoutError, OSError, paramiko.ssh_exception.NoValidConnectionsError) as e:
            raise RemoteError(f"{self.name}: unreachable within {CONNECT_TIMEOUT_S}s ({e})") from None
        self.dead = None
        interval = float(os.environ.get("NESTPRESS_KEEPALIVE_S", KEEPALIVE_S))
        Heartbeat(self.name, c.transport, interval, KEEPALIVE_COUNT, self._died).start()

    def _died(self, why: str) -> None:
        self.dead = why

    def sh(self, cmd: str, timeout: float = 120, warn_only: bool = False, hide: bool = True):
        """Run a shell command on the host (callers quote every variable part with shlex.quote)."""
        self.connect()
        try:
            r = self.c.run(cmd, hide=hide, warn=True, timeout=timeout, in_stream=False)
        except Exception as e:  # invoke raises CommandTimedOut, paramiko/socket errors on drops
            why = self.dead or f"{type(e).__name__}: {e}"
            raise RemoteError(f"{self.name}: `{cmd[:80]}` failed: {why}") from None
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
        """The code this controller runs: what it shipped, else the host's newest (`current`)."""
        return self._app or f"{self.root}/current"

    @property
    def results(self) -> str:
        """Results live beside the code directories, not in one: they outlive every version of the code."""
        return f"{self.root}/results"

    @property
    def venv(self) -> str:
        return f"{self.root}/venv"

    def _python_cmd(self, args: list[str]) -> str:
        env = f"NESTPRESS_CACHE={shlex.quote(self.cache)} " if self.cache else ""
        python = shlex.quote(f"{self.venv}/bin/python")
        return f"cd {shlex.quote(self.app)} && {env}{python} -m harness " + " ".join(map(shlex.quote, args))

    def _transfer(self, what: str, move: Callable[[], object]) -> None:
        """put/get over SFTP with an idle timeout; a host without SFTP gets one line that says so."""
        self.connect()
        try:
            sftp = self.c.sftp()
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise RemoteError(
                f"{self.name}: its sshd offers no SFTP subsystem ({e or type(e).__name__}); nestpress ships code "
                "and fetches results over SFTP: add `Subsystem sftp internal-sftp` to its sshd_config"
            ) from None
        sftp.get_channel().settimeout(TRANSFER_IDLE_S)
        try:
            move()
        except (OSError, EOFError, paramiko.SSHException) as e:
            why = self.dead or f"{type(e).__name__}: {e}"
            raise RemoteError(f"{self.name}: {what} failed: {why}") from None

    # -- shipping and bootstrap ----------------------------------------------------------------
    def ship(self, config: Path | None = None) -> str | None:
        """Put the harness (and the config) on the host, into app/<content hash>, and point `current` at it;
        returns the config's remote path (a config of the harness tree at its own place there). Code already
        there is never touched: jobs keep what they run."""
        files = [(f, REPO_ROOT / f) for f in project_files()]
        with tempfile.TemporaryDirectory(prefix="nestpress-ship-") as scratch:
            rel = None
            if config is not None:
                rel, extra = config_files(config, Path(scratch))
                files += [x for x in extra if x[0] not in {f for f, _ in files}]
            return self._ship(files, rel)

    def _ship(self, files: list[tuple[str, Path]], rel: str | None) -> str | None:
        digest = content_id(files)
        app = f"{self.root}/app/{digest}"
        q = shlex.quote
        if self.sh(f"test -f {q(app)}/.complete", warn_only=True).failed:
            data = tarball(files)
            tmp = f"{self.root}/app/.incoming-{digest}-{os.getpid()}"
            self.sh(f"mkdir -p {q(tmp)}")
            self._transfer("shipping the harness", lambda: self.c.put(io.BytesIO(data), remote=f"{tmp}.tgz"))
            # a concurrent controller may have shipped the same tree: then its copy stays and ours goes
            self.sh(
                f"cd {q(tmp)} && tar --no-same-owner --no-same-permissions -xzf {q(tmp + '.tgz')} "
                f"&& rm -f {q(tmp + '.tgz')} && chmod -R go-w . && touch .complete && cd / "
                f"&& {{ mv -T {q(tmp)} {q(app)} 2>/dev/null || rm -rf {q(tmp)}; }}"
            )
            log(f"{self.name}: shipped {len(files)} files ({len(data) >> 10} KiB) to {app}")
        else:
            log(f"{self.name}: this code is already on the host ({app})")
        link = f"{self.root}/current"
        self.sh(f"ln -sfn {q('app/' + digest)} {q(link)}.new && mv -T {q(link)}.new {q(link)}")
        self._app = app
        self._prune_apps()
        return f"{app}/{rel}" if rel is not None else None

    def running_jobs(self) -> dict[str, str]:
        """Detached jobs still running on the host: job name -> the code directory it runs from."""
        jobs = shlex.quote(f"{self.root}/jobs")
        out = self.sh(
            f'cd {jobs} 2>/dev/null || exit 0; for p in *.pid; do j=${{p%.pid}}; [ -f "$j.pid" ] || continue; '
            f'[ -f "$j.rc" ] && continue; kill -0 "$(cat "$p")" 2>/dev/null && echo "$j $(cat "$j.app" 2>/dev/null)"; '
            "done; true"
        ).stdout
        return {j: app for j, _, app in (line.partition(" ") for line in out.splitlines() if line)}

    def refuse_concurrent(self, experiment: str, job: str) -> None:
        """One job of an experiment per host: a second would compete with it for the host's memory."""
        others = [j for j in self.running_jobs() if j.startswith(f"{experiment}-") and j != job]
        if others:
            run_id = others[0].removeprefix(f"{experiment}-").rsplit("-", 1)[0]
            raise RemoteError(
                f"{self.name}: job {others[0]} of experiment {experiment} is still running there; wait for it, "
                f"reattach with --run-id {run_id}, or stop it"
            )

    def _prune_apps(self) -> None:
        """Keep the newest KEEP_APPS code directories and every one a running job uses."""
        listed = self.sh(f"ls -1t {shlex.quote(self.root + '/app')}", warn_only=True).stdout.split()
        used = {Path(a).name for a in self.running_jobs().values()} | {Path(self.app).name}
        old = [d for d in listed[KEEP_APPS:] if d not in used and not d.startswith(".")]
        if old:
            self.sh("rm -rf -- " + " ".join(shlex.quote(f"{self.root}/app/{d}") for d in old))

    def ensure_env(self) -> None:
        """A venv with the harness's dependencies (the code runs from its app directory), redone only
        when pyproject.toml changes; shared by every shipped version."""
        pyproject = (REPO_ROOT / "pyproject.toml").read_bytes()
        stamp = hashlib.sha256(pyproject).hexdigest()[:16]
        venv = shlex.quote(self.venv)
        if self.sh(f"cat {venv}/.nestpress-stamp", warn_only=True).stdout.strip() == stamp:
            return
        r = self.sh("command -v python3", warn_only=True)
        if r.failed:
            raise RemoteError(f"{self.name}: python3 not found; run `fab setup` (installs python3, python3-venv)")
        log(f"{self.name}: installing the harness's dependencies into {self.venv} (once per pyproject change)")
        deps = " ".join(map(shlex.quote, tomllib.loads(pyproject.decode())["project"]["dependencies"]))
        self.sh(
            f"python3 -m venv {venv} && {venv}/bin/pip install -q -- {deps} && echo {stamp} > {venv}/.nestpress-stamp",
            timeout=1200,
        )

    def python(self, args: list[str], timeout: float = 600):
        return self.sh(self._python_cmd(args), timeout=timeout, hide=False)

    # -- detached jobs --------------------------------------------------------------------------
    def start_job(self, job: str, args: list[str]) -> None:
        """Start the job detached; it is this controller's (self.job, what Ctrl-C stops) once its pid file exists.
        A start the controller cancelled meanwhile (Ctrl-C) does not happen, or is stopped at once."""
        jobs = shlex.quote(f"{self.root}/jobs")
        j = shlex.quote(f"{self.root}/jobs/{job}")
        inner = f"{self._python_cmd(args)}; echo $? > {j}.rc"
        self.sh(f"mkdir -p {jobs} && rm -f {j}.rc {j}.pid && echo {shlex.quote(self.app)} > {j}.app")
        with self.starting:
            if self.cancelled.is_set():
                raise RemoteError(f"{self.name}: job {job} not started: the run was interrupted")
            # only the job goes to the background (`a && b & c` would background the whole chain)
            self.sh(f"setsid nohup sh -c {shlex.quote(inner)} > {j}.log 2>&1 < /dev/null & echo $! > {j}.pid")
            self.job = job
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
        self._transfer(f"fetching {remote_run}", lambda: self.c.get(tmp, local=buf))
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


def stop_jobs(remotes: list[Remote]) -> None:
    """Ctrl-C: no job starts any more; every job that started is stopped, each host on its own (one that does not
    answer leaves the others' stopping untouched, and is said); a second Ctrl-C leaves them running."""
    for r in remotes:
        r.cancelled.set()
    for r in remotes:  # a start under way finishes (its pid file exists) or never happens
        if r.starting.acquire(timeout=STOP_WAIT_S):
            r.starting.release()
    running = [r for r in remotes if r.job]
    warn(
        f"Ctrl-C: stopping the remote job on {', '.join(r.name for r in running) or 'no host'} "
        "(Ctrl-C again to leave them running)"
    )
    try:
        for r in running:
            try:
                r.stop_job(str(r.job))
            except RemoteError as e:
                warn(f"{r.name}: its job could not be stopped ({e}); it may still run there")
    except KeyboardInterrupt:
        warn("left the remote jobs running; reattach with the same command and --run-id")


def run_on_hosts(remotes: list[Remote], fn: Callable[[Remote, int], int]) -> dict[str, object]:
    """Call fn(remote, index) for every host in parallel; one host's failure does not stop the others.

    Ctrl-C reaches only this (the main) thread: it stops the remote job of every host that has one (stop_jobs)."""
    results: dict[str, object] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(remotes), thread_name_prefix="host")
    futures = {pool.submit(fn, r, i): r for i, r in enumerate(remotes)}
    try:
        pending = set(futures)
        while pending:
            _, pending = concurrent.futures.wait(pending, timeout=0.5)
    except KeyboardInterrupt:
        stop_jobs(remotes)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for f, r in futures.items():
        try:
            results[r.name] = f.result()
        except BaseException as e:
            results[r.name] = e
    return results
