"""What one guest's QEMU is made of (GuestSpec): the input of qemu.py's pure functions and the root kinds'."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GuestSpec:
    name: str  # kut, l1-0, l1-0.l2-0 ...
    level: str  # kut | l1 | l2
    kernel: str
    memory_mb: int
    cpus: int
    accel: str  # kvm | tcg
    export: str  # writable results dir, as the parent sees it
    console: str  # serial console log, as the parent sees it
    python: str
    prealloc: bool = False  # guest RAM faulted in before the guest starts
    mlock: bool = False  # guest RAM locked in the parent (never swapped)
    rootfs: str = "9p"  # 9p | virtiofs (the host's root, shared) | initramfs (initramfs.py)
    rootfs_dir: str = ""  # where the root's view of / (and virtiofs's socket) lives while the guest runs
    root_view: bool = False  # 9p: QEMU exports a read-only view of / from a namespace of its own (rootfs.py)
    hidden: tuple[str, ...] = ()  # paths (globs) the view covers: what the guest must not read
    initrd: str | None = None  # initramfs: the archive; a distribution kernel: its boot archive (distro.py)
    distro_init: bool = False  # the initrd's /init (guest/distro-init.sh) loads modules, then starts the agent
    cmdline_extra: list[str] = field(default_factory=list)
    swap_image: str | None = None
    monitor: str | None = None  # QEMU human monitor socket: where a hung guest's vCPUs are (supervise.py)
    clock: str | None = None  # socket of its clock port: its parent measures its clock there (guest/clock.py)
    thp: str = "never"  # transparent_hugepage= (what backs this guest's own guests' RAM, config.LevelSpec)
    qemu: tuple[str, ...] = ("qemu-system-x86_64",)  # the command that starts it (host.Qemu.command)
    bios: str | None = None  # firmware (host.Qemu.qboot); None: QEMU's default, SeaBIOS
    export_model: str = "none"  # 9p security_model of the results export (host.export_model for the host's)

    @property
    def rootfs_socket(self) -> str:
        return f"{self.rootfs_dir}/sock"
