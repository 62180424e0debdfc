"""Configs and arguments a careful operator (or a hostile one) tries: each refused in one line that names what is
wrong, before anything builds or runs, quickly, never a traceback, a hang or a path outside the results tree."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness.commands import Request
from harness.config import load
from harness.errors import ConfigError, HarnessError


def refused(overrides: list[str], says: str, config: str = "shrinker-ab") -> None:
    began = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load(config, overrides)
    # refused, not expanded: a bomb that got through would take minutes and gigabytes, not a loaded machine's second
    assert says in str(e.value) and time.monotonic() - began < 15, str(e.value)


@pytest.mark.parametrize(
    "override, says",
    [
        ("phases.global.duration_s=1e308", "phases.3.duration_s: Input should be less than or equal to 86400"),
        ("workload.probe.interval_s=1e-300", "workload.probe.interval_s: Input should be greater than or equal"),
        ("workload.probe.size_mb=1000000000000000", "workload.probe.size_mb: Input should be less than or equal"),
        ("workload.probe.stride=99999999999", "workload.probe.stride: Input should be less than or equal"),
        ("sampler.interval_s=0.000001", "sampler.interval_s: Input should be greater than or equal to 0.05"),
        ("topology.kut.memory_mb=99999999", "topology.kut.memory_mb: Input should be less than or equal"),
        ("pressure.memcg-limit.hog_mb=1e20", "pressure.memcg-limit.hog_mb"),
        ("boot.timeout_s.kut=1e308", "boot.timeout_s"),
    ],
)
def test_every_number_has_the_bound_a_real_experiment_needs(override, says):
    refused([override], says)


def test_a_yaml_alias_bomb_and_a_deep_list_are_refused_before_they_expand(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
    )
    (tmp_path / "bomb.yaml").write_text(bomb)
    (tmp_path / "deep.yaml").write_text("name: x\nv: " + "[" * 20000 + "]" * 20000 + "\n")
    for name, says in (("bomb.yaml", "more than 32 aliases"), ("deep.yaml", "nested deeper than 24")):
        refused([], says, str(tmp_path / name))
    refused(["pressure.mode=" + "[" * 5000 + "]" * 5000], "nested deeper than 24")


def test_a_huge_matrix_is_counted_before_it_is_expanded():
    sizes = "[" + ", ".join(str(i) for i in range(1, 201)) + "]"
    refused([f"workload.probe.size_mb={sizes}", "topology.l1.memory_mb=" + sizes], "320000 cells, more than the 10000")
    began = time.monotonic()
    with pytest.raises(ConfigError, match=r"^1200 cells, roughly \d+ h under TCG .*pass --yes"):
        load("shrinker-ab", [f"workload.probe.size_mb={sizes}", "repetitions=3"], limit=100)
    assert time.monotonic() - began < 15  # counted, never expanded (expanding would take minutes)


@pytest.mark.parametrize("kind", ["device", "fifo", "not a config", "missing"])
def test_kernel_config_paths_must_be_kernel_config_files(tmp_path, kind):
    path = {"device": Path("/dev/zero"), "not a config": Path("/etc/hostname")}.get(kind, tmp_path / "frag")
    if kind == "fifo":
        os.mkfifo(path)
    from harness.kernel.build import check_inputs

    says = {"device": "a device", "fifo": "a FIFO", "not a config": "no CONFIG_ line", "missing": "no such file"}[kind]
    refused([f"kernel_config.base={path}"], says)
    began = time.monotonic()
    with pytest.raises(HarnessError, match=f"config fragment {path}: {says}"):
        check_inputs(load("shrinker-ab", [f"kernel_config.fragments=[{path}]"]).experiment, tmp_path / "cache")
    assert time.monotonic() - began < 5


def test_a_patch_that_is_a_fifo_or_a_device_is_said_to_be_one(tmp_path):
    from harness.kernel.build import check_inputs

    os.mkfifo(tmp_path / "fifo.patch")
    for given, says in ((tmp_path / "fifo.patch", "is a FIFO"), (Path("/dev/zero"), "is a device")):
        exp = load("shrinker-ab", [f"variants.patched.patches=[{given}]"]).experiment
        with pytest.raises(HarnessError, match=f"patch path {given} {says}, not a patch file"):
            check_inputs(exp, tmp_path / "cache")


@pytest.mark.parametrize("shard", ["a/b", "1/0", "1/2/3", "5/2", "", "-1/2"])
def test_a_shard_is_i_of_n(shard):
    from harness.tasks import shard as parse

    with pytest.raises(ConfigError, match=r"--shard .*I/N with 0 <= I < N"):
        parse(shard)
    assert parse("1/2") == (1, 2)


@pytest.mark.parametrize("field, value", [("run_id", ""), ("run_id", ".."), ("output", ""), ("output", "../x")])
def test_an_empty_or_climbing_run_id_or_output_is_refused_not_ignored(field, value, tmp_path):
    from harness.tasks import perform

    request = Request.of("run", {"config": "shrinker-ab", field: value, "sets": ["repetitions=1"]})
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}"):
        perform(request)


@pytest.mark.parametrize("experiment, run_id", [("..", "r1"), ("x", ".."), ("a/b", "r"), ("x", "")])
def test_fetch_takes_names_never_paths(experiment, run_id):
    from harness.lab.fleet import fetch_fleet

    with pytest.raises(HarnessError):
        fetch_fleet([], experiment, run_id)
