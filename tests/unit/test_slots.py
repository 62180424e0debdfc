"""Cells side by side: how many fit a host, which CPUs each kernel under test gets, and the waves they start in
(a repetition's variants together)."""

import pytest

from harness.config import load
from harness.errors import ConfigError
from harness.run.slots import decide, waves

NESTED = ["repetitions=3"]  # its kernel under test: 1 CPU, 4864 MiB


def cells(config="shrinker-ab-nested", sets=NESTED):
    return load(config, sets).cells


def test_auto_takes_what_the_hosts_cpus_and_memory_hold_and_never_more():
    c = cells()
    two = decide("auto", c, [0, 1], 24 << 10)  # a host CPU per vCPU, under TCG as under KVM (measured: slots.py)
    assert two.n == 2 and two.cpus == (frozenset({0}), frozenset({1})) and "2 host CPUs / 1 per" in two.said
    # memory bounds it: 4864 + 1536 MiB a cell, 2048 left to the host
    assert decide("auto", c, list(range(64)), 2048 + 3 * 6400).n == 3
    assert decide("auto", c, list(range(64)), 256 << 10).n == len(c)  # never more than there are cells
    two_cpus = cells("shrinker-ab", ["repetitions=2"])  # the default's kernel under test has two CPUs
    one = decide("auto", two_cpus, [0, 1], 24 << 10)
    assert one.n == 1 and one.cpus == (frozenset(),)  # one at a time is not pinned
    assert decide("auto", two_cpus, list(range(6)), 24 << 10).cpus[2] == {4, 5}


def test_a_parallel_beyond_the_memory_is_refused_and_beyond_the_cpus_runs_unpinned():
    with pytest.raises(ConfigError, match=r"parallel: 5 cells at a time do not fit this host's memory"):
        decide(5, cells(), list(range(64)), 2048 + 3 * 6400)
    two_cpus = cells("shrinker-ab", ["repetitions=2"])
    shared = decide(2, two_cpus, [0, 1], 24 << 10)
    assert shared.n == 2 and shared.cpus == (frozenset(), frozenset()) and "overcommitted" in shared.said
    assert decide(2, two_cpus, [0, 1, 2, 3], 24 << 10).cpus == (frozenset({0, 1}), frozenset({2, 3}))


def test_a_repetitions_variants_start_together():
    c = cells()
    assert [[x.id for x in w] for w in waves(c, 2)] == [[f"baseline.r{r}", f"patched.r{r}"] for r in (1, 2, 3)]
    assert [len(w) for w in waves(c, 5)] == [4, 2]  # whole pairs only
    assert [len(w) for w in waves(c, 1)] == [1] * 6
    three = load("shrinker-ab", ["repetitions=2", "variants=[{name: a}, {name: b}, {name: c}]"]).cells
    assert [[x.variant for x in w] for w in waves(three, 2)] == [["a", "b"], ["c"], ["a", "b"], ["c"]]
    assert [len(w) for w in waves(three, 6)] == [6]
    # a resumed run: what is left of a pair still starts together, a lone cell alone
    left = [[x.id for x in w] for w in waves(c[1:], 2)]
    assert left == [["patched.r1"], ["baseline.r2", "patched.r2"], ["baseline.r3", "patched.r3"]]


def test_parallel_is_not_part_of_what_a_run_measures():
    assert load("shrinker-ab-nested", ["parallel=1"]).config_hash() == load("shrinker-ab-nested").config_hash()
    with pytest.raises(ConfigError):
        load("shrinker-ab-nested", ["parallel=0"])
