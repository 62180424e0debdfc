"""Pressure modes as a registry (harness/guest/modes/): each mode is one module, and the config, the schedule, the
kernel check, the delivery judgement and the guest all ask the registry. A new mode added as one file (here, in a
copy of the harness) is in every one of them without another line."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import textwrap

import pytest

from harness import REPO_ROOT
from harness.config import load
from harness.config.pressure import upgrade
from harness.errors import ConfigError
from harness.guest import modes
from harness.guest.modes.base import Counters, Series, Sizes

EXAMPLE = '''
"""`trickle`: drops the clean page cache every period (an example mode: one module is a whole mode)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from .base import Mode, PhaseEvidence, param, write


@dataclass
class Knobs:
    period_s: float = param(5.0, "seconds between drops of the page cache", gt=0, le=3600)


class Trickle(Mode):
    name = "trickle"
    about = "vm.drop_caches=1 every period: the page cache only, no shrinker"
    knob_type = Knobs
    needs: ClassVar[dict[str, str]] = {"CONFIG_PROC_SYSCTL": "writes /proc/sys/vm/drop_caches"}

    def act(self, knobs: Knobs, ready, log) -> None:
        ready()
        while True:
            write("/proc/sys/vm/drop_caches", "1")
            log("drop")
            time.sleep(knobs.period_s)

    def shortfalls(self, ev: PhaseEvidence, knobs: Knobs) -> list[str]:
        return [] if ev.counters.rise("vmstat.drop_pagecache") > 0 else ["the page cache was never dropped"]


MODE = Trickle()
'''

CHECK = """
from harness.analysis.evidence import delivery
from harness.config import load
from harness.config.reference import schema_reference
from harness.errors import ConfigError, PressureError
from harness.guest.modes.base import Counters, PhaseEvidence, Series
from harness.run.schedule import check_kernel, conductor_schedule

m = load("shrinker-ab", ["pressure.trickle.period_s=2", "phases.global.pressure=trickle"])
assert conductor_schedule(m.experiment, 1, 1).pressure["trickle"] == {"period_s": 2.0}
assert "| `pressure.trickle.period_s` | number | 5.0 | seconds between drops of the page cache |" in schema_reference()
try:
    load("shrinker-ab", ["pressure.trickle.period_s=0"])
    raise SystemExit("a period of 0 was accepted")
except ConfigError as e:
    assert "pressure.trickle.period_s" in str(e) and "greater than 0" in str(e), e
have = "DEBUG_FS KVM 9P_FS NET_9P_VIRTIO FTRACE MEMCG SWAP SHRINKER_DEBUG".split()
open("config", "w").write("".join(f"CONFIG_{o}=y\\n" for o in have))
try:
    check_kernel(m.experiment, "baseline", __import__("pathlib").Path("config"))
    raise SystemExit("a kernel without CONFIG_PROC_SYSCTL was accepted for trickle")
except PressureError as e:
    assert "CONFIG_PROC_SYSCTL (writes /proc/sys/vm/drop_caches)" in str(e), e
for values, want in (([0.0, 0.0, 3.0], "delivered"), ([0.0, 0.0, 0.0], "not delivered")):
    ev = PhaseEvidence("trickle", Counters({"vmstat.drop_pagecache": Series([0.0, 5.0, 11.0], values),
                                            "vmstat.pgscan_kswapd": Series([0.0, 11.0], [0.0, 0.0]),
                                            "vmstat.pgscan_direct": Series([0.0, 11.0], [0.0, 0.0])}, 1, 10), [])
    status, why = delivery(ev, None, 0, m.experiment)
    assert status == want, (status, why)
print("host ok")
"""


def test_every_mode_is_found_by_name_and_an_unknown_name_names_the_known_ones():
    assert {"none", "global", "drop-caches", "root-reclaim", "shrinker-scan", "memcg-limit"} <= set(modes.MODES)
    with pytest.raises(ValueError, match=r"unknown pressure mode 'gobal' \(known: .*global"):
        modes.get("gobal")
    assert [m.name for m in modes.MODES.values() if not m.acts] == ["none"]


def test_older_flat_knobs_are_read_into_their_modes_sections():
    old = {
        "pressure": {"mode": "global", "memcg_limit_mb": 48, "drop_caches_period_s": 2},
        "checks": {"memcg_min_events": 7},
    }
    new = upgrade(old)
    assert new["pressure"] == {
        "mode": "global",
        "memcg-limit": {"limit_mb": 48, "min_events": 7},
        "drop-caches": {"period_s": 2},
    }
    assert new["checks"] == {}
    exp = load("shrinker-ab", ["pressure.memcg_limit_mb=48", "checks.memcg_min_events=7"]).experiment
    assert exp.pressure.knobs("memcg-limit").limit_mb == 48 and exp.pressure.knobs("memcg-limit").min_events == 7


def test_a_knob_out_of_its_bounds_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"pressure.global.ramp_s: Input should be less than or equal to 3600"):
        load("shrinker-ab", ["pressure.global.ramp_s=1e308"])


def test_each_modes_size_check_says_what_does_not_fit():
    sizes = Sizes(kut_mb=2560, swap_mb=0, guests_mb=1700, reserve_mb=256)
    glob = modes.get("global")
    assert "needs swap" in glob.check_sizes(glob.params({}), sizes)[0]
    memcg = modes.get("memcg-limit")
    assert "not a tight limit" in memcg.check_sizes(memcg.params({"limit_mb": 700}), sizes)[0]
    assert memcg.check_sizes(memcg.params({}), sizes) == []


def test_counters_rise_low_and_fall_over_a_phase_as_the_evidence_reads_them():
    s = {"c": Series([0.0, 1.0, 2.0, 3.0, 4.0], [10.0, 12.0, 11.0, 15.0, 20.0])}
    c = Counters(s, 1.5, 3.5)
    assert c.rise("c") == 4.0 + 5.0  # from the sample before the phase (12) to the one after it (20), rises only
    assert c.low("c") == 11.0 and c.fall("c") == 1.0 and math.isnan(c.rise("other"))


def test_a_mode_added_as_one_module_is_in_the_config_schedule_kernel_check_delivery_and_guest(tmp_path):
    copy = tmp_path / "nestpress"
    for part in ("harness", "configs", "patches"):
        shutil.copytree(REPO_ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "harness" / "guest" / "modes" / "trickle.py").write_text(textwrap.dedent(EXAMPLE))
    host = subprocess.run([sys.executable, "-c", CHECK], cwd=copy, capture_output=True, text=True, timeout=120)
    assert host.returncode == 0 and "host ok" in host.stdout, host.stderr[-3000:]
    guest = "import sys; sys.path.insert(0, '.'); import modes, pressure; print(modes.get('trickle').acts)"
    r = subprocess.run([sys.executable, "-E", "-S", "-c", guest], cwd=copy / "harness" / "guest", capture_output=True)
    assert r.stdout.strip() == b"True", r.stderr[-2000:]
