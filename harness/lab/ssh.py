"""SSH safety for lab hosts: host keys trusted on first use only when asked, and keepalives that want an answer."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from ..util import log, warn


def fingerprint(key: paramiko.PKey) -> str:
    """As ssh-keygen -l prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
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


class Heartbeat(threading.Thread):
    """Keepalives that want an answer (as ssh's ServerAliveInterval/CountMax): one is sent every interval
    while the previous one was answered; each interval the outstanding one stays unanswered counts as a
    missed keepalive, and at `count` missed the transport is closed, so every call waiting on a peer that
    is gone (a dead host, a cut cable that TCP has not noticed) fails now instead of at its own timeout."""

    def __init__(
        self, host: str, transport: paramiko.Transport, interval: float, count: int, dead: Callable[[str], None]
    ):
        super().__init__(name=f"keepalive {host}", daemon=True)
        self.host, self.transport, self.interval, self.count, self.dead = host, transport, interval, count, dead

    def _ping(self, answered: threading.Event) -> None:
        try:
            self.transport.global_request("keepalive@openssh.com", wait=True)  # OpenSSH answers: failure
        except Exception:  # the transport went away under it; the loop sees that
            return
        answered.set()

    def run(self) -> None:
        while self.transport.is_active():
            answered = threading.Event()
            threading.Thread(target=self._ping, args=(answered,), daemon=True).start()
            missed = 0
            while not answered.wait(self.interval):
                if not self.transport.is_active():
                    return
                missed += 1
                if missed >= self.count:
                    why = f"no answer to {missed} keepalives in {missed * self.interval:.0f}s: host or network down"
                    self.dead(why)
                    warn(f"{self.host}: {why}; closing the connection")
                    self.transport.close()
                    return
            time.sleep(self.interval)
