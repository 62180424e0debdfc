import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO_ROOT
from harness.config import axis_paths, describe, load
from harness.config.reference import schema_reference
from harness.errors import ConfigError
from harness.guest.contract import GuestPlan
from harness.machine.host import Qemu, TopologyDecision


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


MINIMAL = """
name: t
source: {kind: tarball, path: /usr/src/linux-source-6.1.tar.xz}
variants: [{name: baseline}, {name: patched, series: shrinker-removal}]
phases: [{name: steady, duration_s: 5}, {name: hit, duration_s: 5, pressure: true}]
repetitions: 2
"""


def test_default_config_plan_interleaves_variants():
    plan = load("shrinker-ab")
    assert [c.variant for c in plan.cells] == ["baseline", "patched"] * plan.experiment.repetitions
    assert plan.experiment.repetitions >= 3


def test_list_axis_expands_matrix(tmp_path):
    p = write(tmp_path, MINIMAL + "pressure: {mode: [global, memcg-limit]}\n")
    plan = load(p)
    assert len(plan.cells) == 2 * 2 * 2
    assert {c.axes["pressure.mode"] for c in plan.cells} == {"global", "memcg-limit"}
    assert {c.config.pressure.mode for c in plan.cells} == {"global", "memcg-limit"}
    assert "pressure.mode" in axis_paths() and "topology.kind" in axis_paths()


def test_overrides_by_name_and_yaml_values(tmp_path):
    plan = load(write(tmp_path, MINIMAL), ["repetitions=1", "phases.hit.duration_s=1.5", "pressure.mode=drop-caches"])
    exp = plan.experiment
    assert exp.repetitions == 1 and exp.phases[1].duration_s == 1.5
    assert exp.phases[1].mode(exp.pressure.mode) == "drop-caches"


@pytest.mark.parametrize(
    "patch, where, what",
    [
        ("repetitions: 0", "repetitions", "greater than or equal to 1"),
        ("pressure: {mode: sometimes}", "pressure.mode", "unknown pressure mode 'sometimes' (known: drop-caches"),
        ("topology: {l1: {memory_mb: 12}}", "topology.l1.memory_mb", "greater than or equal"),
        ("bogus: 1", "bogus", "Extra inputs are not permitted"),
        ("name: again", "key 'name' given twice", "line 7"),  # plain YAML would keep the last one, silently
        ("boot: {timeout_s: {kut: .nan}}", "boot.timeout_s.kut", "finite number"),
        ("phases: [{name: forever, duration_s: .inf}]", "phases.0.duration_s", "finite number"),
        ("boot: {timeout_s: {l3: 5}}", "boot.timeout_s", "unknown: l3"),
        ("kernel_config: {base: nonsense}", "kernel_config.base", "neither a make *config target"),
        ("pressure: {mode: [global, global]}", "pressure.mode", "listed twice"),
        ("output: ../../etc", "output", "without '..'"),
    ],
)
def test_bad_config_names_file_field_and_problem(tmp_path, patch, where, what):
    key = patch.split(":")[0]  # replaces that key's line of MINIMAL; `name` stays, to be given twice
    base = "\n".join(line for line in MINIMAL.splitlines() if key == "name" or not line.startswith(key + ":"))
    p = write(tmp_path, base + "\n" + patch + "\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    msg = str(e.value)
    assert str(p) in msg and where in msg and what in msg


@pytest.mark.parametrize(
    "content, what",
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"name: t\n" + b"#" * (2 << 20), "larger than 1024 KiB"),
        (None, "not a regular file"),
    ],
)
def test_a_config_that_is_no_text_file_is_refused_in_one_line(tmp_path, content, what):
    p = tmp_path / "exp.yaml"
    p.mkdir() if content is None else p.write_bytes(content)
    with pytest.raises(ConfigError, match=what):
        load(p)
    with pytest.raises(ConfigError, match="not a regular file"):
        load("/dev/zero")  # would read until the OOM killer


def test_validate_finds_missing_build_inputs_without_building(tmp_path):
    from harness.errors import PatchError, SourceError
    from harness.kernel.build import check_inputs

    with pytest.raises(SourceError, match="does not exist"):
        check_inputs(load("shrinker-ab", ["source.path=/nonexistent.tar.xz"]).experiment, tmp_path)
    # refused before the tarball is unpacked: these never touch the cache
    with pytest.raises(PatchError, match="variant patched: series shrinker-removal has no patch variant 'nope'"):
        check_inputs(load("shrinker-ab", ["variants.patched.patch_variant=nope"]).experiment, tmp_path)
    with pytest.raises(PatchError, match=r"variant patched: patch path /nonexistent\.patch does not exist"):
        check_inputs(load("shrinker-ab", ["variants.patched.patches=[/nonexistent.patch]"]).experiment, tmp_path)
    assert not (tmp_path / "src").exists()
    with pytest.raises(ConfigError, match="series"):
        load("shrinker-ab", ["variants.patched.series=../../etc"])
    with pytest.raises(ConfigError, match="--set repetitions=\\[1: the value is not YAML"):
        load("shrinker-ab", ["repetitions=[1"])


def test_validate_resolves_the_patch_variant_for_the_sources_version(tmp_path):
    import tarfile

    from harness.errors import PatchError, UnsupportedKernel
    from harness.kernel.build import check_inputs

    def kernel(version: str, kind: str) -> list[str]:
        major, minor, sub = version.split(".")
        tree = tmp_path / f"linux-{version}"
        tree.mkdir()
        (tree / "Makefile").write_text(
            f"# SPDX\nVERSION = {major}\nPATCHLEVEL = {minor}\nSUBLEVEL = {sub}\nEXTRAVERSION =\nNAME = Some Name\n"
        )
        if kind == "local":
            return [f"source={{kind: local, path: {tree}}}"]
        with tarfile.open(tmp_path / f"{tree.name}.tar.xz", "w:xz") as tar:
            tar.add(tree, arcname=tree.name)
        return [f"source.path={tmp_path / tree.name}.tar.xz"]

    # the series' variant for the version is tried on the tree (which has no mmu.c here): named, and why
    cache = tmp_path / "cache"
    for version, kind, variant in (("6.1.99", "tarball", "v6.0-6.6"), ("6.11.2", "local", "v6.7-6.12")):
        with pytest.raises(PatchError, match=rf"variant patched: patch series shrinker-removal {variant}: .* not"):
            check_inputs(load("shrinker-ab", kernel(version, kind)).experiment, cache)
    lines = check_inputs(
        load("shrinker-ab", [*kernel("6.2.1", "local"), "variants=[{name: baseline}]"]).experiment, cache
    )
    assert lines == [f"variant baseline: {tmp_path / 'linux-6.2.1'} (6.2.1)"]
    with pytest.raises(UnsupportedKernel, match=r"variant patched: kernel 6\.14\.1: .* upstream since 6\.13"):
        check_inputs(load("shrinker-ab", kernel("6.14.1", "tarball")).experiment, cache)
    with pytest.raises(UnsupportedKernel, match=r"variant patched: kernel 5\.4\.0: no variant of series"):
        check_inputs(load("shrinker-ab", kernel("5.4.0", "local")).experiment, cache)


def test_bad_override_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no list element named or numbered 'nope'"):
        load(write(tmp_path, MINIMAL), ["phases.nope.duration_s=3"])


def test_a_kernel_under_test_bigger_than_the_host_is_refused_before_anything_starts():
    from harness.errors import HostResourceError
    from harness.machine.host import check_host_resources

    matrix = load("shrinker-ab", ["topology.kut.memory_mb=999999"])
    with pytest.raises(HostResourceError, match=r"needs 1000255 MiB with its QEMU, this host has 8000 MiB"):
        check_host_resources(matrix, available_mb=8000, free_disk_mb=10**6)
    with pytest.raises(HostResourceError, match="swap image needs up to 1536 MiB"):
        check_host_resources(load("shrinker-ab-nested"), available_mb=10**6, free_disk_mb=1000)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "validate",
            "--config",
            "shrinker-ab",
            "--set",
            "topology.kut.memory_mb=999999",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert r.returncode == 2 and "topology.kut.memory_mb" in r.stderr + r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("run_id", ["../../etc", "/tmp/x", "a/b", "-x", "..", "a..b"])
def test_a_run_id_is_a_name_not_a_path(run_id, tmp_path):
    from harness.errors import ConfigError
    from harness.run.run_dir import find_run_dir, new_run_id

    matrix = load("shrinker-ab")
    with pytest.raises(ConfigError, match="a name, not a path"):
        find_run_dir(matrix, run_id, False, tmp_path)
    assert find_run_dir(matrix, "e2e.r-1_x", False, tmp_path) == tmp_path.resolve() / "shrinker-ab" / "e2e.r-1_x"
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", new_run_id())  # time, then a tail for runs in one second


def test_one_writer_per_run_directory(tmp_path):
    import os

    from harness.errors import HarnessError
    from harness.run.run_dir import lock_run_dir

    fd = lock_run_dir(tmp_path / "run")
    try:
        with pytest.raises(HarnessError, match=f"another nestpress run \\(pid {os.getpid()}\\)"):
            lock_run_dir(tmp_path / "run")
    finally:
        os.close(fd)
    os.close(lock_run_dir(tmp_path / "run"))  # free again once the first writer ends


def test_a_matrix_of_more_than_100_cells_runs_only_when_confirmed(tmp_path):
    cmd = [sys.executable, "-m", "harness", "run", "--config", "shrinker-ab", "--set", "repetitions=51"]
    r = subprocess.run([*cmd, "--output", str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 2 and "102 cells, roughly" in r.stderr + r.stdout and "--yes" in r.stderr + r.stdout
    assert not list(tmp_path.iterdir())  # nothing started


def test_fab_validate_exit_codes(tmp_path):
    good = subprocess.run(
        [sys.executable, "-m", "harness", "validate", "--config", "shrinker-ab"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert good.returncode == 0, good.stderr
    assert "config OK" in good.stdout and "baseline.r1" in good.stdout
    bad = write(tmp_path, MINIMAL.replace("repetitions: 2", "repetitions: -1"))
    r = subprocess.run(
        [sys.executable, "-m", "harness", "validate", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert r.returncode == 2 and "repetitions" in r.stderr and str(bad) in r.stderr


def test_describe_lists_every_cell():
    plan = load("shrinker-ab")
    text = describe(plan)
    assert all(c.id in text for c in plan.cells)


def test_the_config_reference_is_generated_from_the_schema():
    doc = (REPO_ROOT / "docs" / "config-reference.md").read_text()
    assert schema_reference() in doc, "docs/config-reference.md is stale: run `python -m harness.config.reference`"


def test_every_shipped_config_validates():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        assert load(path).cells, path


def test_kernel_without_what_the_schedule_needs_is_refused_before_boot(tmp_path):
    from harness.errors import PressureError
    from harness.run.schedule import check_kernel

    exp = load("shrinker-ab").experiment
    full = tmp_path / "full.config"
    full.write_text(
        "".join(
            f"{o}=y\n"
            for o in (
                "CONFIG_DEBUG_FS",
                "CONFIG_KVM",
                "CONFIG_MEMCG",
                "CONFIG_SWAP",
                "CONFIG_SHRINKER_DEBUG",
                "CONFIG_FTRACE",
                "CONFIG_9P_FS",
                "CONFIG_NET_9P_VIRTIO",
            )
        )
    )
    check_kernel(exp, "baseline", full)
    with pytest.raises(PressureError, match=r"CONFIG_VIRTIO_FS .*CONFIG_SECCOMP_FILTER \(virtiofsd"):
        check_kernel(exp, "baseline", full, rootfs="virtiofs")
    lacking = tmp_path / "lacking.config"
    lacking.write_text(full.read_text().replace("CONFIG_SHRINKER_DEBUG=y", "# CONFIG_SHRINKER_DEBUG is not set"))
    with pytest.raises(PressureError, match=r"CONFIG_SHRINKER_DEBUG \(writes /sys/kernel/debug/shrinker"):
        check_kernel(exp, "baseline", lacking)
    no_scan = load("shrinker-ab", ["phases=[{name: steady, duration_s: 5}]", "sampler.trace_shrinker=false"])
    check_kernel(no_scan.experiment, "baseline", lacking)


SYSTEM_10 = Qemu("/usr/bin/qemu-system-x86_64", "10.0.2")
SYSTEM_72 = Qemu("/usr/bin/qemu-system-x86_64", "7.2.22")
TREE_72 = "/usr/local/lib/nestpress/qemu-7.2/usr"
PRIVATE_72 = Qemu(
    f"{TREE_72}/bin/qemu-system-x86_64", "7.2.22", f"{TREE_72}/share/qemu", f"{TREE_72}/lib/x86_64-linux-gnu/qemu"
)


def level_argvs(kut, l1, l2_argv) -> list[tuple[str, list[str]]]:
    """Each level's QEMU argv of a nested plan, by level."""
    from harness.machine.qemu import qemu_argv

    return [("kut", qemu_argv(kut)), ("l1", l1.argv), ("l2", l2_argv)]


def cell_plan(exp, accel, decision, rootfs, tmp_path, l2_initrd=None):
    """The plan tree of a cell with a kernel and paths that need not exist."""
    from harness.machine.plan import CellMachines, build_plan
    from harness.run.schedule import conductor_schedule

    m = CellMachines(exp, Path("/k/bzImage"), accel, decision, rootfs, tmp_path / "cell", tmp_path, "run",
                     "/usr/bin/python3", l2_initrd=l2_initrd)  # fmt: skip
    return build_plan(m, conductor_schedule(exp, 240, m.expected_probes()))


def _nested_plan(exp, accel, qemu, rootfs, tmp_path, l2_initrd):
    return cell_plan(exp, accel, TopologyDecision("nested", qemu, []), rootfs, tmp_path, l2_initrd)


@pytest.mark.parametrize("rootfs", ["9p", "virtiofs"])
def test_kut_and_l1_share_the_root_the_same_way_and_l2_boots_from_its_initramfs(rootfs, tmp_path):
    from harness.machine.qemu import qemu_argv, rootfs_server
    from harness.machine.roots import ROOTFS_SERVER

    exp = load("shrinker-ab", ["topology.kind=nested", "topology.l1.thp=always"]).experiment
    kut, plan = _nested_plan(exp, "kvm", PRIVATE_72, rootfs, tmp_path, tmp_path / "l2.cpio")
    l1 = plan.children[0]
    l2 = l1.plan.children[0]
    for argv, server in ((qemu_argv(kut), rootfs_server(kut)), (l1.argv, l1.rootfs_server)):
        cmdline = argv[argv.index("-append") + 1]
        if rootfs == "virtiofs":
            # the daemon maps guest RAM, so it must be shareable; QEMU waits on the server's socket
            assert "rootfstype=virtiofs" in cmdline and any(a.startswith("vhost-user-fs-pci") for a in argv)
            assert any(a.startswith("memory-backend-memfd") and ",share=on" in a for a in argv)
            assert f"socket,id=root,path={server.socket}" in argv
        else:
            assert "rootfstype=9p" in cmdline and server is None
    # the host's root reaches the kernel under test as a read-only view with secrets hidden; inside it, its
    # own root (already that view) is shared as it is
    view = f"{tmp_path}/kut.rootfs"
    if rootfs == "virtiofs":
        assert rootfs_server(kut).argv[4:] == [view, *exp.boot.hidden] and "/etc/shadow" in exp.boot.hidden
        assert l1.rootfs_server.argv[4:] == ["/run/nestpress/l1-0.rootfs"]  # a tmpfs inside the kernel under test
    else:
        kut_argv = qemu_argv(kut)
        assert kut_argv[3:6] == [str(ROOTFS_SERVER), "--exec", view] and kut_argv[6 : 6 + len(exp.boot.hidden)] == (
            exp.boot.hidden
        )
        assert f"local,id=root,path={view}/root,security_model=none,readonly=on,multidevs=remap" in kut_argv
        assert "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap" in l1.argv
    # L2: no shared root at all, plain anonymous RAM (THP-able in L1), Python from the archive as init
    argv = l2.argv
    cmdline = argv[argv.index("-append") + 1]
    assert argv[argv.index("-initrd") + 1] == str(tmp_path / "l2.cpio") and l2.rootfs_server is None
    assert (
        "rdinit=/usr/bin/python3" in cmdline
        and "root=" not in cmdline
        and "init=/usr" not in cmdline.replace("rdinit=", "")
    )
    assert not any("fsdev=root" in a or "vhost-user-fs" in a for a in argv)
    assert any(a.startswith("memory-backend-ram,") for a in argv)
    # what backs each level's guests' RAM: 4 KiB in the kernel under test, 2 MiB pages in L1 (configured)
    thp = {
        name: a[a.index("-append") + 1].split("transparent_hugepage=")[1].split()[0]
        for name, a in level_argvs(kut, l1, argv)
    }
    assert thp == {"kut": "never", "l1": "always", "l2": "never"}
    # a level with guests keeps its time on the TSC, so that its KVM pairs clocks with theirs (ptp_kvm); L2 has none
    tsc = {name: "clocksource=tsc tsc=reliable" in a[a.index("-append") + 1] for name, a in level_argvs(kut, l1, argv)}
    assert tsc == {"kut": True, "l1": True, "l2": False}
    # one QEMU at every level, a private tree with its firmware directory and its module directory
    for a in (qemu_argv(kut), l1.argv, argv):
        a = a[a.index("--") + 1 :] if "--exec" in a else a  # 9p: QEMU after the view's helper
        assert a[:3] == [PRIVATE_72.binary, "-L", PRIVATE_72.data_dir]
    assert l1.env == l2.env == {"QEMU_MODULE_DIR": PRIVATE_72.module_dir}
    # the plan crosses into the guest as JSON and comes back the same, typed
    assert GuestPlan.from_dict(json.loads(plan.to_json())) == plan
    assert plan.schedule.expected_probes == 2 and plan.schedule.phases[0].mode == "none"  # L1 and L2


def test_only_a_level_with_guests_is_told_to_keep_its_time_on_the_tsc(tmp_path):
    """Shadow topology: the kernel under test has guests (its L1s pair their clocks with it by ptp_kvm), an L1
    has none and keeps its default clocksource."""
    from harness.machine.qemu import qemu_argv

    exp = load("shrinker-ab", ["topology.kind=shadow"]).experiment
    kut, plan = cell_plan(exp, "tcg", TopologyDecision("shadow", PRIVATE_72, []), "9p", tmp_path)
    kut_argv, l1_argv = qemu_argv(kut), plan.children[0].argv
    assert "clocksource=tsc tsc=reliable" in kut_argv[kut_argv.index("-append") + 1]
    assert "clocksource=" not in l1_argv[l1_argv.index("-append") + 1]


def test_commas_in_paths_stay_inside_their_qemu_option(tmp_path):
    from harness.machine.qemu import GuestSpec, qemu_argv

    evil = str(tmp_path / "x,readonly=on")
    spec = GuestSpec(
        "kut",
        "kut",
        "/k/bzImage",
        512,
        1,
        "tcg",
        evil,
        f"{evil}/console.log",
        "/usr/bin/python3",
        rootfs="virtiofs",
        rootfs_dir=evil,
        swap_image=f"{evil}/swap",
        monitor=f"{evil}/mon",
    )
    argv = qemu_argv(spec)
    doubled = evil.replace(",", ",,")
    assert f"local,id=out,path={doubled},security_model=none" in argv
    assert f"file:{doubled}/console.log" in argv and f"socket,id=root,path={doubled}/sock" in argv
    assert f"file={doubled}/swap,if=virtio,format=raw,cache=unsafe" in argv
    assert f"unix:{doubled}/mon,server=on,wait=off" in argv
    # QEMU splits an option list on single commas only; no list may gain a `readonly=on` of its own.
    assert not any("readonly=on" in a.replace(",,", "\0").split(",") for a in argv)


def test_the_hosts_export_maps_guest_ownership_where_user_xattrs_work(tmp_path):
    from dataclasses import replace

    from harness.machine.memory_group import export_model
    from harness.machine.qemu import GuestSpec, qemu_argv

    model, why = export_model(tmp_path / "run")
    assert model == "mapped-xattr" and "user xattrs work" in why  # tmp_path: ext4 here and on CI
    assert not list((tmp_path / "run").iterdir())  # its probe file is gone
    spec = GuestSpec("kut", "kut", "/k/bzImage", 512, 1, "tcg", "/r/cell", "/r/cell/console.log", "/usr/bin/python3")
    assert "local,id=out,path=/r/cell,security_model=mapped-xattr" in qemu_argv(replace(spec, export_model=model))


def test_nested_l2_needs_its_initramfs(tmp_path):
    exp = load("shrinker-ab", ["topology.kind=nested"]).experiment
    with pytest.raises(ValueError, match="initramfs"):
        _nested_plan(exp, "tcg", SYSTEM_10, "9p", tmp_path, None)


def test_nested_under_tcg_needs_a_kernel_under_test_with_one_cpu():
    from harness.errors import AccelError
    from harness.machine.host import decide_topology

    with pytest.raises(AccelError, match=r"topology\.kut\.cpus: 1"):
        decide_topology("nested", "tcg", [SYSTEM_10], kut_cpus=2)
    assert decide_topology("nested", "kvm", [SYSTEM_10], kut_cpus=2).kind == "nested"


@pytest.mark.parametrize(
    "accel, installs, requested, kind, version",
    [
        ("kvm", [SYSTEM_72], "auto", "nested", "7.2.22"),
        ("kvm", [SYSTEM_72], "shadow", "shadow", "7.2.22"),
        ("tcg", [SYSTEM_10, PRIVATE_72], "auto", "shadow", "7.2.22"),
        ("tcg", [SYSTEM_10, PRIVATE_72], "nested", "nested", "10.0.2"),
        ("tcg", [SYSTEM_72], "shadow", "shadow", "7.2.22"),
        ("tcg", [SYSTEM_72], "nested", None, "QEMU >= 10"),
        ("tcg", [SYSTEM_10], "shadow", None, "QEMU < 10"),
        ("tcg", [], "nested", None, "no qemu-system-x86_64"),
    ],
)
def test_each_topology_gets_the_qemu_that_runs_it(accel, installs, requested, kind, version):
    from harness.errors import AccelError
    from harness.machine.host import decide_topology

    if kind is None:
        with pytest.raises(AccelError, match=version):
            decide_topology(requested, accel, installs)
    else:
        d = decide_topology(requested, accel, installs)
        assert d.kind == kind and d.qemu.version == version and d.reasons


def test_virtiofs_is_refused_where_it_cannot_be_served(monkeypatch):
    from harness.errors import AccelError
    from harness.machine import host

    monkeypatch.setattr(host, "find_virtiofsd", lambda: None)
    assert host.decide_rootfs("auto", "kvm").kind == "9p"
    with pytest.raises(AccelError, match="virtiofs was requested"):
        host.decide_rootfs("virtiofs", "kvm")


def test_auto_serves_the_root_over_9p_under_tcg_and_virtiofs_on_kvm(monkeypatch):
    from harness.machine import host

    monkeypatch.setattr(host, "find_virtiofsd", lambda: "/usr/libexec/virtiofsd")
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)
    assert host.decide_rootfs("auto", "kvm").kind == "virtiofs"
    tcg = host.decide_rootfs("auto", "tcg")
    assert tcg.kind == "9p" and any("behind TCG's back" in r for r in tcg.reasons)
    forced = host.decide_rootfs("virtiofs", "tcg")  # asked for: served, with the risk said
    assert forced.kind == "virtiofs" and any("stale code" in r for r in forced.reasons)
    assert host.decide_rootfs("9p", "kvm").kind == "9p"


def test_under_tcg_the_kernel_under_test_is_told_the_hosts_tsc_rate(tmp_path):
    """Its own calibration against emulated timers failed in some boots (its KVM then kept a rate 650 ppm off, and
    L1 could not start); the host's kernel knows the rate, and under TCG the guest's TSC is the host's."""
    from harness.machine.host import host_tsc_khz
    from harness.machine.plan import CellMachines

    log = "tsc: Detected 2598.318 MHz processor\n... tsc: Refined TSC clocksource calibration: 2600.001 MHz\n"
    kept, cpuinfo = tmp_path / "kept" / "tsc-khz.boot", "flags\t: fpu tsc\ncpu MHz\t\t: 2601.000\n"
    assert host_tsc_khz("tsc: Detected 2598.318 MHz processor", cpuinfo, kept) == 2598318
    assert host_tsc_khz(log, cpuinfo, kept) == 2600001
    # the log wrapped: the rate read earlier in this boot; without one, a rate the hypervisor gave
    assert host_tsc_khz("no such line", cpuinfo, kept) == 2600001
    assert host_tsc_khz("no such line", cpuinfo, tmp_path / "none") is None
    given = "flags\t: fpu tsc tsc_known_freq\ncpu MHz\t\t: 2601.000\n"
    assert host_tsc_khz("no such line", given, tmp_path / "none") == 2601000
    assert host_tsc_khz("no such line", given.replace("known_freq", "known_freq aperfmperf"), tmp_path / "x") is None
    exp = load("shrinker-ab", ["topology.kind=shadow"]).experiment
    decision = TopologyDecision("shadow", PRIVATE_72, [])
    args = (exp, Path("/k/bzImage"), "tcg", decision, "9p", tmp_path / "cell", tmp_path, "run", "/usr/bin/python3")
    assert "tsc_early_khz=2600001" in CellMachines(*args, tsc_khz=2600001).kut().cmdline_extra
    assert not any(a.startswith("tsc_early_khz") for a in CellMachines(*args).kut().cmdline_extra)
