"""Cells side by side on one host (`parallel`): how many at once, which host CPUs each kernel under test runs on,
and the waves they start in. A repetition's variants start together, as a pair, so A and B see the same host at
the same time; each kernel under test keeps its own memory group (run/cell.py), and `auto` never overcommits
the host's CPUs or memory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import groupby

from ..config import Cell
from ..errors import ConfigError
from ..machine.memory_group import GROUP_SLACK_MB

HOST_RESERVE_MB = 2048  # left to the host itself: the harness, its page cache, sshd


@dataclass(frozen=True)
class Slots:
    n: int  # cells at once
    cpus: tuple[frozenset[int], ...]  # per slot: the host CPUs its kernel under test runs on (empty: not pinned)
    said: str  # how n was found, for the terminal and the manifest


def decide(setting: str | int, cells: list[Cell], host_cpus: list[int], available_mb: int) -> Slots:
    """`auto`: as many cells as the host's CPUs and memory hold: each kernel under test a host CPU per vCPU, its
    guest RAM and QEMU's slack; at most as many as there are cells. Under TCG too a vCPU is one host thread and the
    rest of QEMU little (measured on 2 cores, two nested cells of one vCPU each, the nested test's sizes: each
    QEMU's vCPU thread 264 s, its next thread 24 s of a 292 s cell; side by side the pair took 302 s against 508 s
    one after the other, each cell 1.07-1.29x its time alone, the shrinker's evidence the same). N: that many;
    more than the memory holds is refused, more than the CPUs hold runs unpinned and says so (cells that mostly
    wait out their phases gain; busy ones slow each other down). One cell at a time is not pinned, as before."""
    need_cpus = max((c.config.topology.kut.cpus for c in cells), default=1)
    need_mb = max((c.config.topology.kut.memory_mb for c in cells), default=0) + GROUP_SLACK_MB
    by_cpu, by_mem = len(host_cpus) // need_cpus, max(0, available_mb - HOST_RESERVE_MB) // need_mb
    why = (
        f"{len(host_cpus)} host CPUs / {need_cpus} per kernel under test = {by_cpu}; "
        f"{available_mb} MiB available less {HOST_RESERVE_MB} for the host / {need_mb} per cell = {by_mem}"
    )
    if setting == "auto":
        n = max(1, min(by_cpu, by_mem, len(cells)))
        said = f"parallel auto: {n} cell(s) at a time ({why})"
    else:
        n = int(setting)
        if n > max(1, by_mem):
            raise ConfigError(f"parallel: {n} cells at a time do not fit this host's memory ({why})")
        said = f"parallel {n}: {n} cell(s) at a time ({why})"
        if n > max(1, by_cpu):
            said += "; CPUs overcommitted: not pinned, the cells share them"
            return Slots(n, tuple(frozenset() for _ in range(n)), said)
    if n == 1:
        return Slots(1, (frozenset(),), said)
    return Slots(n, tuple(frozenset(host_cpus[i * need_cpus : (i + 1) * need_cpus]) for i in range(n)), said)


def host_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def waves(cells: list[Cell], n: int) -> list[list[Cell]]:
    """Cells in plan order, in waves of at most n that start together: a repetition's variants (same axes) are
    never split across waves unless there are more of them than n; whole pairs fill a wave in turn."""
    groups = [list(g) for _, g in groupby(cells, key=lambda c: (c.repetition, sorted(c.axes.items())))]
    out: list[list[Cell]] = []
    for group in groups:
        for i in range(0, len(group), n):
            part = group[i : i + n]
            if out and len(out[-1]) + len(part) <= n and len(part) == len(group):
                out[-1].extend(part)
            else:
                out.append(part)
    return out
