"""Results, evidence, statistics, report and the fleet merge on a recorded run, in seconds and without QEMU.

tests/data/recorded-run is a real nested A/B (configs/shrinker-ab-nested.yaml under TCG, one baseline and one
patched cell), shortened: counters every second and only what the report reads (each sample as the sampler
wrote it), probe intervals inside the phases, every level's kernel log. The full suite produces such runs for
real; this tier checks everything after them."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
from conftest import mail_lines

from harness import REPO_ROOT
from harness.analysis import analyze
from harness.lab.fleet import _merge_manifests
from harness.report import generate, render
from harness.report.markdown import report_markdown
from harness.results import tables as results
from harness.results.manifest import Manifest, cell_complete

RECORDED = Path(__file__).parent.parent / "data" / "recorded-run"


@pytest.fixture
def run(tmp_path):
    """A copy of the recorded run of one's own, to change."""
    d = tmp_path / "run"
    shutil.copytree(RECORDED, d)
    return d


def report_cli(run: Path) -> subprocess.CompletedProcess:
    """`python -m harness report` on a run, as a user runs it (a bare environment, lines unfolded)."""
    env = {"COLUMNS": "300", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "harness", "report", "--run", str(run)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The recorded run's report, generated once for the tests that only read it: (its copy, the Report)."""
    d = tmp_path_factory.mktemp("generated") / "run"
    shutil.copytree(RECORDED, d)
    return d, generate(d)


def test_tables_have_both_variants_measured_in_l2(run):
    frames = results.collect(run)
    s = frames["samples"]
    for variant in ("baseline", "patched"):
        l2 = s[(s["variant"] == variant) & (s["level"] == "l2")]
        assert l2["count"].sum() > 1000 and {"steady", "global", "shrinker-scan"} <= set(l2["phase"])
    assert set(frames["cells"]["status"]) == {"complete"}
    assert (run / "tables" / "samples.parquet").exists() and (run / "tables" / "samples.csv").exists()


def test_evidence_baseline_zaps_l2s_shadow_pages_and_patched_has_no_shrinker(generated):
    evidence = generated[1].evidence
    base = evidence[evidence["variant"] == "baseline"].set_index("phase")
    assert base.loc["shrinker-scan", "x86_mmu_count_drop"] > 100
    assert base.loc["shrinker-scan", "l2_vm_shadow_zapped"] > 100 and base.loc["shrinker-scan", "l2_vm"] == "l1-0"
    assert base.loc["memcg-limit", "shrinker_calls"] == 0 and base.loc["memcg-limit", "memcg_max_events"] > 0
    pat = evidence[evidence["variant"] == "patched"]
    assert not pat["shrinker_present"].any() and pat["shrinker_calls"].sum() == 0
    assert pat["l2_vm_shadow_zapped"].fillna(0).sum() == 0


def test_verdicts_are_rows_with_reasons_in_the_schedules_order_with_the_platform_said_once(generated):
    report = generated[1]
    ab = report.ab
    scan = ab["phase"] == "shrinker-scan"  # the patched kernel has no shrinker to scan: no like-for-like row
    assert ab.loc[scan, "verdict"].eq("not comparable").all() and scan.any()
    assert ab.loc[scan, "reason"].str.contains("`shrinker-scan` does not exist on patched").all()
    after = ab["phase"] == "recovery-2"  # what follows it measures its aftermath on one side only: no verdict either
    assert ab.loc[after, "verdict"].eq("not comparable").all() and after.any()
    assert ab.loc[after, "reason"].str.startswith("follows shrinker-scan, which is not comparable").all()
    rest = ~scan & ~after
    assert len(ab) and set(ab.loc[rest, "verdict"]) == {"inconclusive"}  # one repetition
    assert ab.loc[rest, "reason"].str.contains("too few repetitions").all()
    assert not ab["reason"].str.contains("TCG").any() and ab["validity"].str.startswith("emulated (TCG)").all()
    schedule = [p["name"] for p in report.manifest.expanded["phases"]]
    assert list(dict.fromkeys(ab["phase"])) == [p for p in schedule if p in set(ab["phase"])]
    assert ab["level"].eq("l2").all() and report.complete
    md = report.html.with_suffix(".md").read_text()
    assert md.count("emulated (TCG): the direction holds") == 1


def test_report_is_one_html_file_with_its_plots(generated):
    run, report = generated
    html = report.html.read_text()
    assert html.count("data:image/png;base64,") == 6 and "<table>" in html
    md = (run / "report.md").read_text()
    assert "Status: complete" in md and "in the VM that runs L2 (l1-0) shadow pages zapped" in md
    for png in report.plots:
        assert mpimg.imread(png).shape[0] > 300
    assert mail_lines(run)[0].startswith("nestpress")


def test_fleet_merge_is_the_union_of_the_hosts_manifests(run):
    m = Manifest.load(run / "manifest.json")
    (run / "hosts").mkdir()
    for cell, host in zip(m.cells, ("lab1-22", "lab2-22")):
        part = m.model_copy(update={"cells": [cell], "status": "complete"})
        part.save(run / "hosts" / f"{host}.manifest.json")
    (run / "manifest.json").unlink()
    _merge_manifests(run, {"baseline.r1": "root@lab1:22", "patched.r1": "root@lab2:22"})
    merged = Manifest.load(run / "manifest.json")
    assert [c.id for c in merged.cells] == ["baseline.r1", "patched.r1"] and merged.status == "complete"
    assert merged.hosts == {"lab1-22": "complete", "lab2-22": "complete"}
    assert all(cell_complete(run, c.id) for c in merged.cells)
    shutil.rmtree(run / "cells" / "patched.r1")
    _merge_manifests(run, {})
    assert Manifest.load(run / "manifest.json").status == "incomplete"
    assert json.loads((run / "manifest.json").read_text())["cells"][1]["id"] == "patched.r1"


def test_a_broken_run_is_reported_with_each_cell_and_what_is_wrong(run):
    """Guest files are data: torn, planted or missing ones are named with their cell, never a traceback;
    a cell record a guest writes into its own export does not count (the host keeps records elsewhere)."""

    manifest = Manifest.load(run / "manifest.json")
    never = manifest.cells[0].model_copy(update={"id": "baseline.r2", "repetition": 2, "order": 9})
    manifest.cells.append(never)
    manifest.save(run / "manifest.json")
    (run / "records" / "patched.r1.json").unlink()
    (run / "cells" / "patched.r1" / "cell.json").write_text('{"status": "complete", "attempt": 1}')  # planted
    l1 = run / "cells" / "baseline.r1" / "l1-0"
    (l1 / "facts.json").write_text('{"kernel": "6.1", "runs_on')  # torn mid-write
    (l1 / "events.jsonl").unlink()
    (l1 / "events.jsonl").symlink_to("/etc/passwd")
    with open(run / "cells" / "baseline.r1" / "counters.jsonl", "a") as f:
        f.write('[1, 2]\n{"t": "soon", "v": 3}\n{"t": 17')
    assert not cell_complete(run, "patched.r1")
    r = report_cli(run)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert "cell baseline.r2: missing (no directory: it never ran)" in out
    assert "cell patched.r1: incomplete" in out
    assert "cell baseline.r1: l1-0/facts.json: torn or unreadable" in out
    assert "cell baseline.r1: l1-0/events.jsonl: unreadable (Too many levels of symbolic links)" in out
    assert "cell baseline.r1: counters.jsonl: 2 torn or malformed line(s) skipped" in out
    assert "cell baseline.r1: counters.jsonl: 1 record(s) without the fields their kind has" in out
    cells = results.load(run)["cells"].set_index("cell")
    assert cells.loc["baseline.r1", "status"] == "complete" and "facts.json" in cells.loc["baseline.r1", "problems"]
    assert cells.loc["patched.r1", "status"] == "incomplete" and cells.loc["baseline.r2", "status"] == "missing"


def test_every_phase_of_the_recorded_run_delivered_its_pressure(generated):
    report = generated[1]
    ev = report.evidence.set_index(["variant", "phase"])
    assert ev.loc[("patched", "shrinker-scan"), "delivery"] == "not applicable"  # no shrinker to scan
    assert ev.drop(("patched", "shrinker-scan"))["delivery"].eq("delivered").all()
    assert ev.loc[("baseline", "global"), "mem_available_min_mb"] <= 96 and report.conclusive
    md = report.html.read_text()
    assert "Pressure delivered, per phase" in md and "INCONCLUSIVE" not in md.split("Verdict")[0]


def test_a_check_the_phase_fails_marks_it_not_delivered_and_its_rows_inconclusive(run):
    """A stricter control check than the recorded memcg-limit phase met (~1400 events): said per variant, the
    phase's A/B rows inconclusive with the reason, the other phases' rows unchanged, the first screen lists it."""
    m = Manifest.load(run / "manifest.json")
    m.expanded["checks"] = {"memcg_min_events": 100_000}
    m.save(run / "manifest.json")
    report = analyze(run, rebuild_tables=True)
    assert not report.conclusive and set(report.undelivered) == {
        ("baseline", "memcg-limit"),
        ("patched", "memcg-limit"),
    }
    ctrl = report.ab[report.ab["phase"] == "memcg-limit"]
    assert ctrl["verdict"].eq("inconclusive").all()
    assert ctrl["reason"].str.contains(r"pressure not delivered on baseline .*need 100000").all()
    assert not report.ab[report.ab["phase"] != "memcg-limit"]["reason"].str.contains("not delivered").any()
    first_screen = render.html(report_markdown(report, [])).split("Verdict</h2>")[0]
    assert "Phase <code>memcg-limit</code>: pressure not delivered on patched" in first_screen
    # a complete run that is inconclusive somewhere exits 3 with one line that says where (README: exit status)
    from harness import tasks
    from harness.util import console

    with console.capture() as said:
        assert tasks.conclusion(report) == tasks.EXIT_INCONCLUSIVE == 3
    line = said.get()
    assert "INCONCLUSIVE where it says (exit status 3)" in line and "pressure not delivered on baseline" in line


def _shortfalls(run, cell_id):
    from harness.config import Experiment
    from harness.run import checks as health

    m = Manifest.load(run / "manifest.json")
    exp = Experiment.model_validate(m.expanded)
    cell = next(c for c in m.cells if c.id == cell_id)
    d = run / "cells" / cell_id
    phases = [p.name for p in exp.phases]
    return health.shortfalls(results.cell_frames(d, cell), d, exp.checks, phases, {"l2"}, exp.sampler.interval_s)


def test_a_cell_counts_only_if_it_measured_every_phase_without_a_stalled_guest(run):
    assert _shortfalls(run, "baseline.r1") == [] and _shortfalls(run, "patched.r1") == []
    # a stall report as an L1 printed it (a real one, from an L1 whose timer went 100 s late)
    with open(run / "cells" / "baseline.r1" / "l1-0" / "kmsg.log", "a") as f:
        f.write("[  102.539474] rcu: INFO: rcu_sched self-detected stall on CPU\n")
    assert _shortfalls(run, "baseline.r1") == [
        "stall: l1-0: [  102.539474] rcu: INFO: rcu_sched self-detected stall on CPU"
    ]
    # L2's probe stopped writing after its first third: silent for the rest, too few intervals in later phases
    probe = run / "cells" / "patched.r1" / "l1-0" / "l2-0" / "probe.jsonl"
    lines = probe.read_text().splitlines(keepends=True)
    probe.write_text("".join(lines[: len(lines) // 3]))
    said = " | ".join(_shortfalls(run, "patched.r1"))
    assert "l2: too few probe intervals (need 2 per phase): " in said and "recovery-2 0" in said
    assert "l1-0.l2-0: probe silent for" in said
    # the sampler died before the last phases
    counters = run / "cells" / "patched.r1" / "counters.jsonl"
    counters.write_text("".join(counters.read_text().splitlines(keepends=True)[:40]))
    assert "the sampler has no counters in phase(s) recovery-1, shrinker-scan, recovery-2" in " | ".join(
        _shortfalls(run, "patched.r1")
    )


def test_health_section_calls_out_a_variant_far_from_the_baseline(run):
    rec = json.loads((run / "records" / "patched.r1.json").read_text())
    rec["kut_ready_s"] *= 3
    (run / "records" / "patched.r1.json").write_text(json.dumps(rec))
    report = analyze(run, rebuild_tables=True)
    far = report.health[report.health["far"]]
    assert list(zip(far["variant"], far["level"], far["figure"])) == [("patched", "kut", "ready_s")]
    assert (report.run_dir / "tables" / "health.csv").exists()
    md = report_markdown(report, [])
    assert "Health: `patched` kut ready_s median" in md.split("## Verdict")[0] and "⚠" in md


def test_compare_names_the_rows_it_cannot_compare(run, tmp_path):
    from harness.report import compare_runs

    other = tmp_path / "other"
    shutil.copytree(run, other)
    shutil.rmtree(other / "cells" / "patched.r1")
    results.collect(other)
    md = compare_runs(run, other, tmp_path / "cmp").with_suffix(".md").read_text()
    assert "- patched / global / l2: not in B (`patched` has no latency samples in that run)" in md


def test_timeline_and_counters_show_every_repetition_or_the_one_asked_and_no_shrinker_is_said(run):
    from harness.errors import HarnessError
    from harness.hypotheses import get
    from harness.report.plots import _absent, _cells

    frames = analyze(run, rebuild_tables=True).frames
    assert _cells(frames, "baseline", None) == [(1, "baseline.r1")] and _cells(frames, "baseline", 2) == []
    shrinker = get("kvm-mmu-shrinker")
    assert _absent(frames, "baseline.r1", shrinker) is None
    assert _absent(frames, "patched.r1", shrinker) == "no x86-mmu shrinker in this kernel"
    with pytest.raises(HarnessError, match="no repetition 2 \\(it has 1\\)"):
        generate(run, repetition=2)


def test_touches_the_clock_did_not_see_are_no_latency_and_are_said(run):
    samples = results.collect(run)["samples"]
    row = samples[(samples["variant"] == "patched") & (samples["phase"] == "global")].iloc[[0]]
    stalled = row.assign(latency_ns=0.5, lo_ns=0, hi_ns=1, count=37)
    pd.concat([samples, stalled]).to_parquet(run / "tables" / "samples.parquet")
    report = analyze(run, rebuild_tables=False)
    md = report_markdown(report, []).split("## Verdict")[0]
    assert f"Probe clock: 37 touches of `patched` {row['level'].iloc[0]} read 0-1 ns" in md
    assert report.summary["count"].sum() > 0


def test_spikes_are_attributed_and_the_patched_kernel_has_no_shrinker_zap(generated):
    run, report = generated
    a = report.attribution
    assert len(a.spikes) and set(a.spikes["level"]) == {"l2"}
    assert not a.spikes.loc[a.spikes["variant"] == "patched", "shrinker-zap"].any()
    assert not a.spikes.loc[a.spikes["mode"] == "memcg-limit", "shrinker-zap"].any()
    for name in ("spikes", "attribution"):
        assert (run / "tables" / f"{name}.parquet").exists() and (run / "tables" / f"{name}.csv").exists()
    md = report.html.with_suffix(".md").read_text()
    assert "What the baseline's extra tail latency coincided with" in md and "## Attribution" in md


def test_guest_timestamps_are_moved_onto_the_kernel_under_tests_clock_by_their_measured_offsets(run):
    """L1's clock read 2 s ahead of the kernel under test's, L2's 1 s ahead of L1's: L2's timestamps move back
    3 s, L1's 2 s, the kernel under test's not at all; the uncertainties add up along the chain."""
    before = results.collect(run)
    cell = run / "cells" / "baseline.r1"
    t_kut = [json.loads(line)["t"] for line in (cell / "events.jsonl").read_text().splitlines()]
    span = range(min(t_kut) - 10**11, max(t_kut) + 10**11, 10**10)
    for path, offset, unc in ((cell / "l1-0", 2 * 10**9, 300_000), (cell / "l1-0" / "l2-0", 10**9, 200_000)):
        lines = [json.dumps({"t": t, "offset_ns": offset, "uncertainty_ns": unc, "exchanges": 16}) for t in span]
        (path / "clock.jsonl").write_text("\n".join(lines) + "\n")
    after = results.collect(run)

    def times(frames, level, kind):
        e = frames["events"]
        return e[(e["cell"] == "baseline.r1") & (e["level"] == level) & (e["kind"] == kind)]["t"].to_numpy()

    assert times(after, "l2", "probe_outlier") == pytest.approx(times(before, "l2", "probe_outlier") - 3.0)
    assert times(after, "l1", "boot_start") == pytest.approx(times(before, "l1", "boot_start") - 2.0)
    assert times(after, "kut", "phase_start") == pytest.approx(times(before, "kut", "phase_start"))
    c = after["clocks"].set_index("level")
    assert c.loc["l2", "uncertainty_kut_ms"].max() == pytest.approx(0.5)
    assert c.loc["l2", "offset_kut_ms"].max() == pytest.approx(3000) and c.loc["l2", "parent"].iloc[0] == "l1-0"


HOSTILE = "![x](plots/../../host-secret) <script>alert(1)</script> [l](javascript:x) | **b** `c` <img src=x>"


def test_guest_text_is_never_markup_and_never_brings_a_host_file_into_the_report(run, tmp_path):
    """Every string a guest wrote that reaches the report (a reason, an error, a name, a caller) is text: no link,
    image, HTML or table cell of its own, and the HTML inlines only the report's own plots, by name."""
    import base64

    secret = b"host-secret-bytes-5d2a"
    (run.parent / "host-secret").write_bytes(secret)
    (run / "host-secret").write_bytes(secret)
    cell = run / "cells" / "baseline.r1"
    start = next(
        json.loads(line)
        for line in (cell / "events.jsonl").read_text().splitlines()
        if '"phase_start"' in line and '"global"' in line
    )
    with open(cell / "events.jsonl", "a") as f:
        said = {"t": start["t"] + 1, "kind": "pressure_unavailable", "mode": "global", "reason": HOSTILE}
        f.write(json.dumps(said) + "\n")
        f.write(json.dumps({"t": start["t"] + 2, "kind": "guest_died", "guest": HOSTILE, "error": HOSTILE}) + "\n")
    with open(cell / "pressure.jsonl", "a") as f:
        rec = {"t": start["t"] + 3, "mode": "global", "kind": HOSTILE, "error": HOSTILE, "target": HOSTILE}
        f.write(json.dumps(rec) + "\n")
    with open(cell / "shrinker.jsonl", "a") as f:
        call = {"t": start["t"] + 4, "kind": "shrink_start", "comm": HOSTILE, "guest": HOSTILE, "raw": HOSTILE}
        f.write(json.dumps(call) + "\n")
    generate(run)  # in this process: the command line's own report is the broken run's and the spoiled files'
    html = (run / "report.html").read_text()
    md = (run / "report.md").read_text()
    assert "pressure not delivered on baseline" in md and "\\<script\\>alert(1)" in md  # said, as text
    assert "<script>" not in html and "<img src=x>" not in html and 'href="javascript' not in html
    assert '<img src="plots/..' not in html and html.count("<img ") == 6  # the report's own plots, nothing else
    for out in [html, md, *(p.read_text() for p in (run / "tables").glob("*.csv"))]:
        assert secret.decode() not in out and base64.b64encode(secret).decode()[:16] not in out


GUEST_FILES = [  # every file a guest of the recorded run wrote, at every level
    "events.jsonl",
    "pressure.jsonl",
    "shrinker.jsonl",
    "counters.jsonl",
    "facts.json",
    "kmsg.log",
    "l1-0/events.jsonl",
    "l1-0/facts.json",
    "l1-0/l2-0/events.jsonl",
    "l1-0/l2-0/probe.jsonl",
]
PLANS = ["l1-0/l2-0/plan.json"]  # spoiled in one round: the guest is then not read at all (no plan, no guest)


def _spoil(path: Path, how: str, secret: Path) -> None:
    """What a guest can leave at a path of its export instead of what it should have written."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    path.unlink(missing_ok=True)
    if how == "torn":
        path.write_text("".join(lines[: len(lines) // 2]) + (lines[len(lines) // 2][:17] if lines else '{"t": 1'))
    elif how == "link":
        path.symlink_to(secret)
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "directory":
        (path / "d" / "d").mkdir(parents=True)
    elif how == "sparse":
        with open(path, "wb") as f:
            f.truncate(2 << 30)
    else:  # lines no record fits: nesting, wrong types, numbers that are no measurement, markup
        bad = {
            "deep": "[" * 5000 + "\n",
            "types": '{"t": "soon", "kind": 5, "v": {"a": "x"}, "phase": [1], "counts": {"x": -1}}\n',
            "numbers": '{"t": 1e400, "kind": "ready", "v": {"a": NaN}, "t0": 123456789012345678901234567890}\n',
            "markup": json.dumps({"t": 1, "kind": "guest_died", "guest": HOSTILE, "error": HOSTILE}) + "\n",
        }[how]
        path.write_text("".join(lines) + bad * 3)


KINDS = ["torn", "link", "fifo", "directory", "sparse", "deep", "types", "numbers", "markup"]


@pytest.mark.parametrize("round_", range(len(KINDS)))
def test_whatever_a_guest_leaves_in_any_of_its_files_the_tables_and_report_are_made_and_say_so(round_, tmp_path):
    """Every file a guest writes x truncation, a link, a FIFO, a directory, a huge sparse file, deep nesting, wrong
    types, absurd numbers and markup: one kind per file per round, each file meeting every kind over the rounds.
    The tables are built with every refused file named and no planted byte read; the first round makes the whole
    report (nothing planted in it)."""
    import base64

    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    secret = tmp_path / "host-secret"
    secret.write_text("host-secret-bytes-8f1c\n")
    spoiled = {name: KINDS[(round_ + i) % len(KINDS)] for i, name in enumerate(GUEST_FILES)}
    spoiled |= {name: KINDS[(round_ + 3) % len(KINDS)] for name in PLANS if round_ == 0}
    for name, how in spoiled.items():
        _spoil(run / "cells" / "baseline.r1" / name, how, secret)
    began = time.monotonic()
    if round_ == 0:
        generate(run)  # in this process: the command line's own report is the broken run's
        frames = results.load(run)
    else:
        frames = results.collect(run)
    assert time.monotonic() - began < 60
    problems = json.loads(frames["cells"].set_index("cell").loc["baseline.r1", "problems"])
    unplanned = [str(Path(n).parent) for n in spoiled if n.endswith("plan.json")]
    for name, how in spoiled.items():
        guest_found = not any(name.startswith(d + "/") for d in unplanned)
        read = not name.endswith(("plan.json", "kmsg.log")) and guest_found  # kmsg.log: read by the run's checks
        if how in ("link", "fifo", "directory", "sparse") and read:
            assert any(p.startswith(name) for p in problems), (name, how, problems)
    written = [*(run / "tables").glob("*.csv"), *([run / "report.html", run / "report.md"] if round_ == 0 else [])]
    for text in (p.read_text() for p in written):
        assert "host-secret-bytes" not in text and base64.b64encode(b"host-secret-bytes").decode()[:12] not in text
    if round_ == 0:
        html = (run / "report.html").read_text()
        assert "<script>" not in html, html[html.find("<script>") - 300 : html.find("<script>") + 50]
        assert any("l1-0/l2-0/plan.json: torn or unreadable" in p for p in problems)


def test_a_failed_cell_gives_the_ab_no_values_and_its_unfinished_phases_block_no_verdict(run):
    record = run / "records" / "patched.r1.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"status": "failed"}))
    a = analyze(run, rebuild_tables=True)
    assert a.cells.set_index("variant").loc["patched", "status"] == "failed"
    assert set(a.metrics["variant"]) == {"baseline"} and not a.undelivered  # its samples stay in the tables only
    assert set(a.frames["samples"]["variant"]) == {"baseline", "patched"}
