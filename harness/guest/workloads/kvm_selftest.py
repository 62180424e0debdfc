"""`kvm-selftest`: one of KVM's own performance selftests (tools/testing/selftests/kvm), built from each variant's
tree and run inside the level's kernel, its printed figures as metrics.

These are plain /dev/kvm programs: their VM, run in the kernel under test, is a guest whose memory that kernel's MMU
maps (on TDP where it has nested paging, shadow-paged otherwise), and they make no pressure of their own, so every
pressure mode applies to them. What KVM maintainers quote in commit messages comes from them:
`dirty_log_perf_test` (populate, enable/disable dirty logging, per-iteration dirty-memory / get / clear times),
`demand_paging_test` (demand-paging rate), `access_tracking_perf_test` (per-phase access times).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import Binaries, Metric, Workload, WorkloadError, param, size_bytes

# "Populate memory time: 0.50s", "Iteration 1 dirty memory time: 0.03s", "Populating memory     : 0.1s"
TIME = re.compile(r"^(?P<name>[A-Za-z][\w ,/()-]*?)\s*:\s*(?P<v>\d+(?:\.\d+)?)s\s*$")
# "Get dirty log over 2 iterations took 0.000329390s. (Avg 0.000164695s/iteration)"
TOOK = re.compile(r"^(?P<name>[A-Za-z][\w ,/()-]*?) took (?P<v>\d+(?:\.\d+)?)s\b")
# "Overall demand paging rate: 12345.6 pgs/sec" (6.1), "...: 100.0 pgs/sec/vcpu and 200.0 pgs/sec" (later)
RATE = re.compile(r"^(?P<name>[A-Za-z][\w ]*? rate):.*?(?P<v>\d+(?:\.\d+)?) pgs/sec\s*$")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MEMORY_FLAGS = {"-b": "1G", "-v": "1"}  # what the memstress-based tests size their VM by, and their defaults


@dataclass
class Knobs:
    test: str = param("dirty_log_perf_test", "the selftest's program name (tools/testing/selftests/kvm/<test>.c)")
    args: list[str] = param([], "its arguments, as its -h lists them (e.g. [-b, 256M, -i, 2, -g])")
    metrics: list[str] = param([], "the printed figures to keep, by name (empty: every one it prints)")


def _flag(args: list[str], flag: str) -> str:
    """A flag's value: `-b 64M` or `-b64M` (getopt's two spellings); its default when absent."""
    value = MEMORY_FLAGS[flag]
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag) and len(a) > len(flag):
            value = a[len(flag) :]
    return value


class KvmSelftest(Workload):
    kind = "kvm-selftest"
    about = __doc__.split("\n\n")[0].replace("\n", " ")
    levels: ClassVar[tuple[str, ...]] = ("kut", "l1")  # where the host's root (and so the build) is seen
    knob_type = Knobs

    def check(self, knobs: Any) -> list[str]:
        out = [] if NAME.match(knobs.test) else [f"test {knobs.test!r} is not a selftest's program name"]
        try:
            self.resident_mb(knobs)
        except WorkloadError as e:
            out.append(str(e))
        return out

    def argv(self, knobs: Any, binaries: Binaries) -> list[str]:
        if not binaries.kvm_selftests:
            raise WorkloadError("kvm-selftest: this build has no KVM selftests (they are built before the boot)")
        return [f"{binaries.kvm_selftests}/{knobs.test}", *knobs.args]

    def resident_mb(self, knobs: Any) -> float:
        """Guest memory per vCPU times vCPUs (a -u demand-paging run keeps a source copy too)."""
        per_vcpu, vcpus = size_bytes(_flag(knobs.args, "-b")), _flag(knobs.args, "-v")
        if not vcpus.isdigit():
            raise WorkloadError(f"-v {vcpus!r} is not a number of vCPUs")
        copies = 2 if knobs.test == "demand_paging_test" and "-u" in knobs.args else 1
        return per_vcpu * int(vcpus) * copies / (1 << 20)

    def needs_selftests(self, knobs: Any) -> list[str]:
        return [knobs.test]

    def parse(self, knobs: Any, text: str) -> list[Metric]:
        out = []
        for line in text.splitlines():
            line = line.strip()
            if m := RATE.match(line):
                out.append(Metric(m["name"], float(m["v"]), "pages/s", "higher"))
            elif m := TOOK.match(line) or TIME.match(line):
                out.append(Metric(m["name"].strip(), float(m["v"]), "s", "lower"))
        if knobs.metrics:
            out = [m for m in out if m.name in knobs.metrics]
        if not out:
            keep = f" named {knobs.metrics}" if knobs.metrics else ""
            raise WorkloadError(f"{knobs.test} printed no figure{keep} that this parser knows")
        return out


WORKLOAD = KvmSelftest()
