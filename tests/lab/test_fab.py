"""fab tasks through real sshd instances on 127.0.0.1 (throwaway host and user keys)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import sets
from fabric import Connection

from harness import REPO_ROOT
from harness.errors import RemoteError
from harness.lab.remote import KEEP_APPS, Remote
from harness.results.manifest import cell_complete

pytestmark = pytest.mark.ssh
FAB = str(Path(os.environ.get("VIRTUAL_ENV", REPO_ROOT / ".venv")) / "bin" / "fab")
if not Path(FAB).exists():
    FAB = shutil.which("fab") or FAB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, root: Path, user_pub: Path, sftp: bool = True):
        self.root, self.port = root, free_port()
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
        shutil.copy(user_pub, root / "authorized_keys")
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\nPidFile {root}/sshd.pid\n"
            f"AuthorizedKeysFile {root}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            + ("Subsystem sftp internal-sftp\n" if sftp else "")
            + "ClientAliveInterval 15\n"
        )
        self.proc = None

    def start(self):
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(self.root / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("sshd did not start")

    def sessions(self) -> list[int]:
        """Every process below this sshd: the sessions it serves."""
        assert self.proc is not None
        found, todo = [], [self.proc.pid]
        while todo:
            r = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True)
            kids = [int(p) for p in r.stdout.split()]
            found += kids
            todo += kids
        return found

    def stop(self):
        """Kill this sshd and the sessions it serves (its children), nobody else's: connections drop,
        detached jobs go on."""
        subprocess.run(["pkill", "-KILL", "-P", str(self.proc.pid)], capture_output=True)
        self.proc.kill()
        self.proc.wait()

    @property
    def known_host(self) -> str:
        return (
            f"[127.0.0.1]:{self.port} "
            + (self.root / "host_key.pub").read_text().split(" ", 2)[0]
            + " "
            + (self.root / "host_key.pub").read_text().split()[1]
        )

    @property
    def host(self) -> str:
        return f"root@127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    if os.geteuid() != 0 or not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        if os.environ.get("NESTPRESS_REQUIRE_KERNEL"):
            pytest.fail("SSH tests need root and openssh-server")
        pytest.skip("SSH tests need root and openssh-server")
    d = tmp_path_factory.mktemp("keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], check=True)
    return d


@pytest.fixture(scope="module")
def hosts(keys, tmp_path_factory):
    servers = [Sshd(tmp_path_factory.mktemp(f"sshd{i}"), keys / "id.pub").start() for i in range(2)]
    known = keys / "known_hosts"
    known.write_text("".join(s.known_host + "\n" for s in servers))
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            s.stop()


def fab(keys, *args, hosts=None, env_extra=None, timeout=1800, known=True):
    env = dict(os.environ, **(env_extra or {}))
    env["NESTPRESS_KNOWN_HOSTS"] = str(keys / "known_hosts" if known is True else known)  # a path: that file
    cmd = [FAB, "-i", str(keys / "id"), *args, *(["--hosts", ",".join(h.host for h in hosts)] if hosts else [])]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def remote_dir(base: Path) -> list[str]:
    return ["--remote-dir", f"{base}/{{host}}"]  # every simulated host has a directory of its own


@pytest.fixture(scope="module")
def rdir(tmp_path_factory):
    return tmp_path_factory.mktemp("remote")


def test_fab_list_documents_every_task():
    r = subprocess.run([FAB, "--list"], cwd=REPO_ROOT, capture_output=True, text=True)
    for t in ("doctor", "validate", "setup", "build", "run", "experiment", "fetch", "report", "compare"):
        assert t in r.stdout
    h = subprocess.run([FAB, "experiment", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert "--run-id" in h.stdout and "--set" in h.stdout


def test_without_hosts_it_says_it_runs_here(keys):
    r = fab(keys, "doctor", "--json")
    assert r.returncode == 0
    assert "running on THIS MACHINE" in r.stdout.splitlines()[0] + r.stderr.splitlines()[0]


def test_doctor_over_ssh(keys, hosts, rdir):
    r = fab(keys, "doctor", "--json", *remote_dir(rdir), hosts=[hosts[0]])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"running on {hosts[0].host} over SSH" in r.stdout + r.stderr
    doc = json.loads(r.stdout[r.stdout.index("{") : r.stdout.rindex("}") + 1])
    assert doc["accel"] in ("kvm", "tcg") and doc["reasons"]


def test_validate_over_ssh_ships_the_config(keys, hosts, rdir):
    r = fab(keys, "validate", "--config", "shrinker-ab", "--set", "repetitions=4", *remote_dir(rdir), hosts=[hosts[0]])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "config OK" in r.stdout and "patched.r4" in r.stdout
    shipped = [f for f in rdir.glob("*/app/**/*") if f.is_file() and ".venv" not in f.parts]
    assert any(f.name == "agent.py" for f in shipped)
    assert all(f.stat().st_uid == 0 and not f.stat().st_mode & 0o022 for f in shipped)


def test_setup_refuses_what_is_no_debian_package_name(keys, tmp_path):
    pwned = tmp_path / "PWNED"
    r = fab(keys, "setup", "--extra", f"linux-source-6.1; touch {pwned}", "--hosts", "nobody@127.0.0.1:1")
    assert r.returncode == 2 and "not Debian package names" in r.stdout + r.stderr and not pwned.exists()
    assert "Traceback" not in r.stderr


def test_unknown_host_key_is_trusted_on_first_use_only_when_asked_and_a_changed_one_never(keys, hosts, rdir, tmp_path):
    known = tmp_path / "ssh" / "known_hosts"  # stands for ~/.ssh/known_hosts
    r = fab(keys, "doctor", *remote_dir(rdir), hosts=[hosts[0]], known=known)
    assert r.returncode != 0 and "unknown host key" in r.stdout + r.stderr
    r = fab(keys, "doctor", "--accept-new-host", *remote_dir(rdir), hosts=[hosts[0]], known=known)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = known.read_text()
    fp = subprocess.run(["ssh-keygen", "-l", "-f", str(known)], capture_output=True, text=True).stdout.split()[1]
    assert f"[127.0.0.1]:{hosts[0].port} ssh-ed25519 " in saved and fp in r.stdout + r.stderr  # said, and saved
    r = fab(keys, "doctor", *remote_dir(rdir), hosts=[hosts[0]], known=known)  # from now on: known
    assert r.returncode == 0, r.stderr[-2000:]
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known.write_text(
        f"[127.0.0.1]:{hosts[0].port} " + " ".join((other.with_suffix(".pub")).read_text().split()[:2]) + "\n"
    )
    r = fab(keys, "doctor", "--accept-new-host", *remote_dir(rdir), hosts=[hosts[0]], known=known)
    assert r.returncode != 0 and "CHANGED" in r.stdout + r.stderr  # even with --accept-new-host


def test_unreachable_host_fails_fast(keys):
    class Dead:
        host = f"root@127.0.0.1:{free_port()}"

    t0 = time.monotonic()
    r = fab(keys, "doctor", hosts=[Dead()], timeout=120)
    assert r.returncode != 0 and "unreachable" in r.stdout + r.stderr
    assert time.monotonic() - t0 < 60


def test_wrong_key_is_an_authentication_failure(keys, hosts, rdir, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    env = dict(os.environ, NESTPRESS_KNOWN_HOSTS=str(keys / "known_hosts"))
    r = subprocess.run(
        [FAB, "-i", str(tmp_path / "other"), "-H", hosts[0].host, "doctor"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode != 0 and "authentication failed" in r.stdout + r.stderr


def remote_to(server: Sshd, keys: Path, base: Path, monkeypatch) -> Remote:
    monkeypatch.setenv("NESTPRESS_KNOWN_HOSTS", str(keys / "known_hosts"))
    c = Connection("127.0.0.1", user="root", port=server.port, connect_kwargs={"key_filename": str(keys / "id")})
    return Remote(c, f"{base}/{{host}}")


def test_code_ships_by_content_and_a_running_job_keeps_its_own(keys, hosts, tmp_path, monkeypatch):
    config = tmp_path / "mine.yaml"
    config.write_text((REPO_ROOT / "configs" / "shrinker-ab.yaml").read_text())
    r = remote_to(hosts[0], keys, tmp_path / "remote", monkeypatch)
    first = Path(str(r.ship(config))).parent.parent
    root = first.parent.parent
    assert (first / "harness" / "guest" / "agent.py").is_file() and (root / "current").resolve() == first
    stamp = (first / ".complete").stat().st_mtime_ns
    again = remote_to(hosts[0], keys, tmp_path / "remote", monkeypatch)
    assert Path(str(again.ship(config))).parent.parent == first and (first / ".complete").stat().st_mtime_ns == stamp
    # a job of this experiment runs from the first code; newer code goes elsewhere, and prunes around it
    job = subprocess.Popen(["sleep", "300"])
    try:
        (root / "jobs").mkdir()
        (root / "jobs" / "shrinker-ab-old1-0of1.pid").write_text(f"{job.pid}\n")
        (root / "jobs" / "shrinker-ab-old1-0of1.app").write_text(f"{first}\n")
        shipped = []
        for i in range(KEEP_APPS + 2):
            config.write_text(config.read_text() + f"# {i}\n")
            shipped.append(Path(str(r.ship(config))).parent.parent)
            time.sleep(1.1)  # ls -t has a resolution of a second on some file systems
        assert len(set(shipped)) == KEEP_APPS + 2 and first not in shipped
        assert (root / "current").resolve() == shipped[-1]
        assert (first / "harness" / "guest" / "agent.py").is_file()  # untouched: its job runs from it
        assert not shipped[0].exists()  # old and unused: pruned
        with pytest.raises(RemoteError, match=r"still running.*--run-id old1"):
            r.refuse_concurrent("shrinker-ab", "shrinker-ab-new-0of1")
        r.refuse_concurrent("shrinker-ab", "shrinker-ab-old1-0of1")  # reattaching to it is fine
        r.refuse_concurrent("other", "other-new-0of1")  # another experiment is not refused
        out = fab(
            keys,
            "run",
            "--config",
            str(config),
            "--run-id",
            "new",
            "--remote-dir",
            f"{tmp_path}/remote/{{host}}",
            hosts=[hosts[0]],
        )
        assert out.returncode != 0 and "still running" in out.stdout + out.stderr
    finally:
        job.kill()
        job.wait()


def test_jump_hosts_get_the_same_host_key_policy(keys, hosts, tmp_path, monkeypatch):
    """ProxyJump: the jump host's key is checked like the host's (Fabric would add any key on its own)."""
    target, jump = hosts
    known = tmp_path / "known_hosts"
    known.write_text(target.known_host + "\n")  # the host is known, the jump host is not
    monkeypatch.setenv("NESTPRESS_KNOWN_HOSTS", str(known))
    key = {"key_filename": str(keys / "id")}

    def via_jump(accept_new_host: bool) -> Remote:
        gateway = Connection("127.0.0.1", user="root", port=jump.port, connect_kwargs=key)
        c = Connection("127.0.0.1", user="root", port=target.port, connect_kwargs=key, gateway=gateway)
        return Remote(c, str(tmp_path / "remote"), accept_new_host=accept_new_host)

    with pytest.raises(RemoteError, match=rf"unknown host key of \[127.0.0.1\]:{jump.port}"):
        via_jump(False).connect()
    r = via_jump(True)
    r.connect()  # trusted on first use, and saved
    assert r.sh("echo through").stdout.strip() == "through" and f"[127.0.0.1]:{jump.port} " in known.read_text()
    r.c.close()
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    forged = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    known.write_text(f"{target.known_host}\n[127.0.0.1]:{jump.port} {forged}\n")
    fp = subprocess.run(["ssh-keygen", "-l", "-f", str(jump.root / "host_key.pub")], capture_output=True, text=True)
    with pytest.raises(RemoteError, match=re.escape(f"CHANGED: it offers ssh-ed25519 {fp.stdout.split()[1]}")):
        via_jump(True).connect()  # the jump host's own key, refused even with --accept-new-host


def test_a_host_without_sftp_is_told_in_one_line(keys, tmp_path):
    server = Sshd(tmp_path / "sshd", keys / "id.pub", sftp=False).start()
    try:
        known = tmp_path / "known_hosts"
        known.write_text(server.known_host + "\n")
        r = fab(keys, "validate", "--config", "shrinker-ab", *remote_dir(tmp_path), hosts=[server], known=known)
        assert r.returncode == 2 and "no SFTP subsystem" in r.stdout + r.stderr, r.stdout + r.stderr
        assert "Traceback" not in r.stdout + r.stderr
    finally:
        server.stop()


def test_a_peer_that_stops_answering_is_dead_after_its_keepalives(keys, tmp_path, monkeypatch):
    server = Sshd(tmp_path / "sshd", keys / "id.pub").start()
    (keys / "known_hosts").write_text((keys / "known_hosts").read_text() + server.known_host + "\n")
    monkeypatch.setenv("NESTPRESS_KEEPALIVE_S", "1")
    r = remote_to(server, keys, tmp_path / "remote", monkeypatch)
    stopped = []
    try:
        assert r.sh("echo up").stdout.strip() == "up"
        stopped = server.sessions()  # the host freezes: TCP stays up, nothing answers
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="no answer to 3 keepalives"):
            r.sh("echo up", timeout=600)
        assert time.monotonic() - t0 < 20  # 3 keepalives of 1 s, not the command's 600 s
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        server.stop()


@pytest.mark.kernel
def test_build_over_ssh_uses_the_cache_and_ships_relative_patches(keys, hosts, rdir, builds, cache_dir):
    r = fab(keys, "build", "--config", "shrinker-ab", "--cache", str(cache_dir), *remote_dir(rdir), hosts=[hosts[0]])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "baseline: 6.1." in r.stdout and "(cached)" in r.stdout
    # a config of the harness tree keeps its place on the host, so its relative patch paths resolve there
    example = ["--config", "configs/examples/mbox.yaml", "--cache", str(cache_dir), *remote_dir(rdir)]
    r = fab(keys, "build", *example, hosts=[hosts[0]])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"in-two-steps: 6.1.192 (cached)\n  {builds['patched'].bzimage}" in r.stdout
    # a user's config beside their own patch, outside the harness tree: both travel
    series = REPO_ROOT / "patches/shrinker-removal/v6.0-6.6/0001-KVM-x86-mmu-Remove-KVM-memory-shrinker.patch"
    mine = rdir.parent / "my-work"
    (mine / "fixes").mkdir(parents=True, exist_ok=True)
    shutil.copy(series, mine / "fixes" / "0001-my-fix.patch")
    (mine / "ab.yaml").write_text(
        "name: mine\nsource: {kind: tarball, path: /usr/src/linux-source-6.1.tar.xz}\n"
        "variants: [{name: baseline}, {name: mine, patches: [fixes/0001-my-fix.patch]}]\n"
        "phases: [{name: steady, duration_s: 5}]\n"
    )
    r = fab(
        keys, "build", "--config", str(mine / "ab.yaml"), "--cache", str(cache_dir), *remote_dir(rdir), hosts=[hosts[0]]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"mine: 6.1.192 (cached)\n  {builds['patched'].bzimage}" in r.stdout


def test_bisect_runs_detached_on_one_host_and_its_folder_comes_back(keys, hosts, rdir, tmp_path):
    repo = tmp_path / "tree"  # the host's clone (this machine): two commits, and no kernel in them
    repo.mkdir()
    for tag in ("good", "bad"):
        (repo / "README").write_text(tag)
        subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
        subprocess.run(["git", "-C", str(repo), "add", "README"], check=True)
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", tag],
                       check=True)  # fmt: skip
        subprocess.run(["git", "-C", str(repo), "tag", tag], check=True)
    out = tmp_path / "results"
    args = ["bisect", "--config", "shrinker-bisect", "--good", "good", "--bad", "bad", "--set", f"source.url={repo}"]
    args += ["--output", str(out), *remote_dir(rdir)]
    r = fab(keys, *args, hosts=hosts)
    assert r.returncode == 2 and "bisect runs on one host" in r.stdout + r.stderr
    r = fab(keys, *args, hosts=[hosts[0]])
    said = r.stdout + r.stderr
    assert r.returncode == 2 and "started detached job shrinker-bisect-bisect-good-bad-bisect" in said, said[-3000:]
    assert "the good end" in said and "could not be measured: does not build" in said and "not a kernel tree" in said
    folder = out / "shrinker-bisect/bisect-good-bad/hypothesis"
    asked = json.loads((folder / "bisect.json").read_text())
    assert asked["bad"] == subprocess.run(["git", "-C", str(repo), "rev-parse", "bad"], capture_output=True,
                                          text=True).stdout.strip()  # fmt: skip


# The fleet cells also exercise the two pressure modes the default schedule does not use.
FLEET = [
    "--config",
    "shrinker-ab",
    *sets(
        [
            "variants=[{name: baseline}]",
            "repetitions=2",
            "topology.kut.cpus=1",  # the two hosts are this machine: a CPU each
            "workload.probe.size_mb=256",  # its first pass in seconds, not ~25 s: the cells are about the fleet
            "phases=[{name: steady, duration_s: 4}, {name: drop-caches, duration_s: 8, pressure: drop-caches}, "
            "{name: root-reclaim, duration_s: 8, pressure: root-reclaim}, {name: rest, duration_s: 3}]",
        ]
    ),
]


@pytest.mark.kernel
def test_fleet_shards_survives_a_dropped_host_and_resumes(keys, hosts, rdir, builds, cache_dir, tmp_path):
    results = tmp_path / "results"
    env = {"NESTPRESS_RECONNECT_S": "20"}
    args = [
        "experiment",
        *FLEET,
        "--set",
        f"output={results}",
        "--run-id",
        "fleet1",
        "--cache",
        str(cache_dir),
        *remote_dir(rdir),
    ]
    # drop host 1's connections once its job is running; host 0 finishes on its own
    proc = subprocess.Popen(
        [FAB, "-i", str(keys / "id"), *args, "--hosts", ",".join(h.host for h in hosts)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, NESTPRESS_KNOWN_HOSTS=str(keys / "known_hosts"), **env),
    )
    local_run = results / "shrinker-ab" / "fleet1"
    host1_run = rdir / f"127.0.0.1-{hosts[1].port}" / "results" / "shrinker-ab" / "fleet1"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not list(host1_run.glob("cells/*/ready.json")):
        time.sleep(2)
    hosts[1].stop()
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode != 0, out[-3000:]
    assert "connection lost" in out and "--run-id" in out
    hosts[1].start()
    r = fab(keys, *args, hosts=hosts, env_extra=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    manifest = json.loads((local_run / "manifest.json").read_text())
    assert set(manifest["cell_hosts"].values()) == {h.host for h in hosts}  # each host ran its shard
    assert manifest["status"] == "complete" and sorted(manifest["hosts"]) == sorted(
        f"127.0.0.1-{h.port}" for h in hosts
    )
    assert cell_complete(local_run, "baseline.r1") and cell_complete(local_run, "baseline.r2")
    assert (local_run / "report.html").exists()
    # what the two modes claim, on the baseline 6.1 kernel with the shadow topology
    from harness.analysis import analyze

    report = analyze(local_run)
    frames, evidence = report.frames, report.evidence
    dc = evidence[evidence["phase"] == "drop-caches"]
    assert len(dc) == 2 and (dc["shrinker_calls"] > 0).all() and (dc["shrinker_freed"] > 0).all()
    assert (dc["mmu_recycled"] > 0).all() and (dc["slabs_scanned"] > 0).all()
    pressure = frames["pressure"]
    rr = pressure[pressure["kind"] == "root_reclaim_request"]
    assert rr["cell"].nunique() == 2  # root memory.reclaim written in both cells
    root = evidence[evidence["phase"] == "root-reclaim"]
    assert (root["slabs_scanned"] > 0).all()  # root reclaim runs shrink_slab
    assert evidence["delivery"].eq("delivered").all(), evidence[["cell", "phase", "delivery_reason"]]
