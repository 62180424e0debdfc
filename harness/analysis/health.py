"""How healthy were a run's guests: boot, warm-up and cell times per variant and level (the report's health
section), with a variant far from the baseline called out."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..guest.contract import EventKind
from ..results.manifest import CellRecord

FAR = 2.0  # a variant's median this many times the baseline's (or its inverse) is called out
CHILD_LEVEL = {"kut": "l1", "l1": "l2"}  # a boot_ready event names a child of the level that logged it


def boot_times(events: pd.DataFrame, cells: pd.DataFrame, records: dict[str, CellRecord]) -> pd.DataFrame:
    """One row per cell x guest: variant, level, guest, ready_s (QEMU start to agent ready), kernel_s."""
    rows = []
    for _, c in cells.iterrows():
        r = records.get(c["cell"])
        if r is not None and r.kut_ready_s is not None:
            rows.append(
                {
                    "cell": c["cell"],
                    "variant": c["variant"],
                    "level": "kut",
                    "guest": "kut",
                    "ready_s": r.kut_ready_s,
                    "kernel_s": r.kut_kernel_s,
                }
            )
    ready = events[events["kind"] == EventKind.BOOT_READY.value]
    for e in ready.to_dict("records"):
        level = CHILD_LEVEL.get(e["level"], "?")
        rows.append(
            {
                **{k: e[k] for k in ("cell", "variant")},
                **{"level": level, "guest": e["subject"], "ready_s": e["seconds"], "kernel_s": e["kernel_s"]},
            }
        )
    return pd.DataFrame(rows, columns=["cell", "variant", "level", "guest", "ready_s", "kernel_s"])


def health_table(frames: dict[str, pd.DataFrame], records: dict[str, CellRecord], baseline: str) -> pd.DataFrame:
    """Per variant x level x figure: median [min-max] over cells, and whether it is far from the baseline's."""
    cells = frames["cells"]
    long = []
    boots = boot_times(frames["events"], cells, records)
    for fig in ("ready_s", "kernel_s"):
        for _, b in boots.dropna(subset=[fig]).iterrows():
            long.append({"variant": b["variant"], "level": b["level"], "figure": fig, "value": float(b[fig])})
    passes = frames["passes"]
    for _, p in passes[passes["pass"] == 1].iterrows() if not passes.empty else []:
        long.append(
            {"variant": p["variant"], "level": p["level"], "figure": "warmup_s", "value": p["duration_ms"] / 1e3}
        )
    for _, c in cells.iterrows():
        r = records.get(c["cell"])
        if r is not None and r.started and r.finished:
            long.append({"variant": c["variant"], "level": "cell", "figure": "wall_s", "value": r.finished - r.started})
        if r is not None:
            long.append({"variant": c["variant"], "level": "cell", "figure": "attempts", "value": float(r.attempt)})
    df = pd.DataFrame(long, columns=["variant", "level", "figure", "value"])
    if df.empty:
        return pd.DataFrame(columns=["variant", "level", "figure", "n", "median", "min", "max", "vs_baseline", "far"])
    out = (
        df.groupby(["variant", "level", "figure"], sort=False)["value"]
        .agg(n="count", median="median", min="min", max="max")
        .reset_index()
    )
    rank = {
        k: i for i, k in enumerate(("kut", "l1", "l2", "cell", "ready_s", "kernel_s", "warmup_s", "wall_s", "attempts"))
    }
    out = out.sort_values(["level", "figure"], key=lambda col: col.map(rank), kind="stable").reset_index(drop=True)
    base = out[out["variant"] == baseline].set_index(["level", "figure"])["median"]

    def versus(r) -> float:
        b = base.get((r["level"], r["figure"]), np.nan)
        return float(r["median"] / b) if b and not np.isnan(b) else np.nan

    out["vs_baseline"] = out.apply(versus, axis=1)
    out["far"] = (out["vs_baseline"] > FAR) | (out["vs_baseline"] < 1 / FAR)
    return out


def far_from_baseline(health: pd.DataFrame) -> pd.DataFrame:
    """Rows whose median is more than FAR times off the baseline's (either way)."""
    return health[health["far"].astype(bool)] if not health.empty else health
