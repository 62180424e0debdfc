"""Outcomes beside latency: how many boots of each variant crashed, stalled or warned, against the baseline.

The unit is the boot (every attempt at a cell, retried or not); a boot counts once per outcome whatever it logged.
Fisher's exact test on boots with a kernel report (panic, oops, BUG, WARN, stall) of each variant against the
baseline's: with a handful of boots only a large difference can reach p < 0.05, and the table says how many boots
it rests on. OOM kills are counted apart: pressure may cause them on purpose."""

from __future__ import annotations

from typing import Any

import pandas as pd
from scipy import stats as sps

from ..results.crashes import CRASHES, STALLS

REPORTS = (*CRASHES, "warn", *STALLS)


def boots(cells: pd.DataFrame) -> pd.Series:
    """Boots per variant: every attempt of every cell."""
    return cells.groupby("variant", sort=False)["attempt"].sum() if not cells.empty else pd.Series(dtype=int)


def outcome_table(crashes: pd.DataFrame, cells: pd.DataFrame, variants: list[str], baseline: str) -> pd.DataFrame:
    """Per variant (config order): boots, boots that crashed / warned / stalled / had any kernel report / OOM
    kills, and Fisher's exact p of its boots with a report against the baseline's."""
    n = boots(cells)
    booted = crashes.drop_duplicates(["cell", "attempt", "kind"]) if not crashes.empty else crashes

    def count(variant: str, kinds: tuple[str, ...]) -> int:
        if booted.empty:
            return 0
        mine = booted[(booted["variant"] == variant) & booted["kind"].isin(kinds)]
        return int(mine.drop_duplicates(["cell", "attempt"]).shape[0])

    rows: list[dict[str, Any]] = []
    for v in variants:
        rows.append(
            {
                "variant": v,
                "boots": int(n.get(v, 0)),
                "crashed": count(v, CRASHES),
                "warned": count(v, ("warn",)),
                "stalled": count(v, STALLS),
                "reported": count(v, REPORTS),
                "oom_kills": count(v, ("oom-kill",)),
            }
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    base = next((r for r in rows if r["variant"] == baseline), None)
    ps = []
    for r in rows:
        if base is None or r["variant"] == baseline or not (r["boots"] and base["boots"]):
            ps.append(float("nan"))
            continue
        table = [[r["reported"], r["boots"] - r["reported"]], [base["reported"], base["boots"] - base["reported"]]]
        ps.append(float(sps.fisher_exact(table).pvalue))
    return out.assign(fisher_p=ps)


def signatures(crashes: pd.DataFrame) -> pd.DataFrame:
    """Each distinct crash (by signature) per variant: how many boots showed it, at which levels, in which phases."""
    rows = []
    reports = crashes[crashes["kind"] != "oom-kill"] if not crashes.empty else crashes
    for (variant, signature), g in reports.groupby(["variant", "signature"], sort=False):
        first = g.iloc[0]
        rows.append(
            {
                "variant": variant,
                "kind": first["kind"],
                "said": first["said"],
                "frames": first["frames"],
                "signature": signature,
                "boots": int(g[["cell", "attempt"]].drop_duplicates().shape[0]),
                "retried": bool(g["retried"].any()),
                "levels": ", ".join(dict.fromkeys(g["level"])),
                "phases": ", ".join(p for p in dict.fromkeys(g["phase"]) if p),
            }
        )
    columns = ["variant", "kind", "said", "frames", "signature", "boots", "retried", "levels", "phases"]
    return pd.DataFrame(rows, columns=columns)
