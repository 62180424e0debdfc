"""Tables -> numbers: statistics, the evidence of each phase, attribution of spikes, health. analyze() gives a
run's Analysis (verdict rows, evidence, latency summary, health, attribution) from its stored tables alone, so a
report can be regenerated without rerunning anything and a crashed run still gets one of what it has."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import hypotheses
from ..config import Experiment
from ..results import tables as results
from ..results.manifest import Manifest, cell_record
from . import health, outcomes, stats
from .attribution import Attribution, attribute
from .evidence import inapplicable, phase_evidence, undelivered


@dataclass
class Analysis:
    run_dir: Path
    manifest: Manifest
    experiment: Experiment  # the manifest's expanded config, validated once
    complete: bool
    cells: pd.DataFrame  # one row per cell of the matrix, with its status
    ab: pd.DataFrame  # verdict rows: phase x level x metric, patched against baseline
    evidence: pd.DataFrame  # per cell x phase: the mechanism, reclaim and delivery (evidence.phase_evidence)
    summary: pd.DataFrame  # latency percentiles per variant x phase x level
    health: pd.DataFrame  # boot, warm-up and cell times per variant x level (health.health_table)
    guest_view: pd.DataFrame  # major faults and steal the guests' own kernels saw, per variant x phase x level
    attribution: Attribution  # spikes, their causes, excess by cause (attribution.attribute)
    undelivered: dict[tuple[str, str], str]  # (variant, phase) -> why its pressure was not delivered
    unmeasured: list[str]  # variants of the plan without a single latency sample or workload metric
    frames: dict[str, pd.DataFrame]  # the run's tables (results.TABLES)
    metrics: pd.DataFrame  # one value per variant x repetition x phase x level x metric (what `ab` compares)
    outcomes: pd.DataFrame  # per variant: boots that crashed, warned, stalled, against the baseline (outcomes.py)
    crash_signatures: pd.DataFrame  # each distinct crash per variant: how many boots, where

    @property
    def conclusive(self) -> bool:
        """Every phase delivered its pressure and every variant was measured: what exit status 0 also says."""
        return not self.undelivered and not self.unmeasured


def analyze(run_dir: Path, rebuild_tables: bool = False) -> Analysis:
    """The Report's data from a run directory's tables (collected from the raw outputs when asked or missing);
    writes nothing but the tables."""
    run_dir = Path(run_dir)
    frames = results.collect(run_dir) if rebuild_tables or not (run_dir / "tables").exists() else results.load(run_dir)
    manifest = Manifest.load(run_dir / "manifest.json")
    exp = Experiment.model_validate(manifest.expanded)
    cells = frames["cells"]
    evidence = phase_evidence(frames, exp) if not frames["phases"].empty else pd.DataFrame()
    hypothesis = hypotheses.get(exp.hypothesis)
    precondition = (
        hypothesis.precondition(evidence, manifest.baseline)
        if not evidence.empty
        else f"no phase completed: no evidence of {hypothesis.mechanism}"
    )
    # the A/B's unit is a complete boot: a failed cell (said in the cells and crashes tables) neither gives values
    # nor blocks a verdict by a phase it never finished
    complete = set(cells.loc[cells["status"] == "complete", "cell"])
    done = {k: d[d["cell"].isin(complete)] if "cell" in d else d for k, d in frames.items()}
    not_delivered = undelivered(evidence[evidence["cell"].isin(complete)] if not evidence.empty else evidence)
    variants = [v.name for v in exp.variants if any(c.variant == v.name for c in manifest.cells)]  # a shard's own
    measured = set(frames["samples"]["variant"]) | set(frames["workload_metrics"]["variant"])
    unmeasured = [v for v in variants if v not in measured]
    summary = stats.summarize(frames["samples"])
    metrics = stats.repetition_metrics(done["samples"], done["passes"], done.get("workload_metrics"))
    ab = stats.ab_table(
        metrics,
        manifest.baseline,
        tcg=manifest.tcg,
        precondition=precondition,
        variants=variants,
        undelivered=not_delivered,
        inapplicable=inapplicable(evidence),
        phases=[p.name for p in exp.phases],
    )
    records = {c.id: r for c in manifest.cells if (r := cell_record(run_dir, c.id)) is not None}
    health_rows = health.health_table(frames, records, manifest.baseline)
    attr = attribute(frames, exp, manifest.baseline)
    guest_view = stats.guest_view(frames["passes"])
    outcome_rows = outcomes.outcome_table(frames["crashes"], cells, variants, manifest.baseline)
    crash_rows = outcomes.signatures(frames["crashes"])
    for name, df in (("spikes", attr.spikes), ("attribution", attr.table)):
        df.to_parquet(run_dir / "tables" / f"{name}.parquet", index=False)
    for name, df in (
        ("summary", summary),
        ("ab", ab),
        ("evidence", evidence),
        ("repetition_metrics", metrics),
        ("health", health_rows),
        ("guest_view", guest_view),
        ("spikes", attr.spikes),
        ("attribution", attr.table),
        ("attribution_ab", attr.ab),
        ("outcomes", outcome_rows),
        ("crash_signatures", crash_rows),
    ):
        df.to_csv(run_dir / "tables" / f"{name}.csv", index=False)
    return Analysis(
        run_dir,
        manifest,
        exp,
        manifest.status == "complete" and bool((cells["status"] == "complete").all()),
        cells,
        ab,
        evidence,
        summary,
        health_rows,
        guest_view,
        attr,
        not_delivered,
        unmeasured,
        frames,
        metrics,
        outcome_rows,
        crash_rows,
    )
