"""`command`: a user's own program, run again and again in a guest; its metrics read from its output.

Two documented forms: `format: jsonl`, one JSON object per line with `metric`, `value` and optionally `unit` and
`better` ("lower", the default, or "higher"), other lines ignored; or `format: regex`, a named regular expression per
metric whose group `value` is the number (`patterns: {rate: 'rate=(?P<value>[0-9.]+)'}`; the last match counts).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .base import Binaries, Metric, Workload, WorkloadError, param

MAX_METRICS = 256  # per run: a program that prints more is not giving figures
MAX_NAME = 80


@dataclass
class Knobs:
    argv: list[str] = param([], "the program and its arguments (no shell; L2 gets argv[0] and its libraries)")
    format: str = param("jsonl", "jsonl (one {metric, value, unit, better} object per line) or regex")
    patterns: dict[str, str] = param({}, "format regex: metric name -> a regular expression with a group `value`")
    units: dict[str, str] = param({}, "format regex: metric name -> its unit")
    higher_is_better: list[str] = param([], "format regex: the metrics where a rise is an improvement")
    resident_mb: int = param(0, "what one run keeps resident, for the size check before anything boots", ge=0)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class Command(Workload):
    kind = "command"
    about = __doc__.split("\n\n")[0].replace("\n", " ")
    knob_type = Knobs

    def check(self, knobs: Any) -> list[str]:
        out = [] if knobs.argv else ["argv is empty: name the program to run"]
        if knobs.format not in ("jsonl", "regex"):
            out.append(f"format {knobs.format!r} is not jsonl or regex")
        if knobs.format == "regex" and not knobs.patterns:
            out.append("format regex needs patterns: {metric: 'expression with (?P<value>...)'}")
        for name, pattern in knobs.patterns.items():
            try:
                if "value" not in re.compile(pattern).groupindex:
                    out.append(f"pattern of {name!r} has no group named value")
            except re.error as e:
                out.append(f"pattern of {name!r}: {e}")
        return out

    def argv(self, knobs: Any, binaries: Binaries) -> list[str]:
        return list(knobs.argv)

    def resident_mb(self, knobs: Any) -> float:
        return float(knobs.resident_mb)

    def parse(self, knobs: Any, text: str) -> list[Metric]:
        out = self._jsonl(text) if knobs.format == "jsonl" else self._regex(knobs, text)
        if not out:
            raise WorkloadError(f"its output holds no metric in the {knobs.format} form")
        return out[:MAX_METRICS]

    @staticmethod
    def _jsonl(text: str) -> list[Metric]:
        out = []
        for line in text.splitlines():
            try:
                d = json.loads(line) if line.lstrip().startswith("{") else None
            except ValueError:
                continue
            if not isinstance(d, dict) or not isinstance(d.get("metric"), str) or _number(d.get("value")) is None:
                continue
            unit, better = d.get("unit", ""), d.get("better", "lower")
            out.append(
                Metric(
                    d["metric"][:MAX_NAME],
                    float(d["value"]),
                    unit[:20] if isinstance(unit, str) else "",
                    better if better in ("lower", "higher") else "lower",
                )
            )
        return out

    @staticmethod
    def _regex(knobs: Any, text: str) -> list[Metric]:
        out = []
        for name, pattern in knobs.patterns.items():
            found = [m for m in re.finditer(pattern, text, re.MULTILINE)]
            try:
                value = float(found[-1]["value"]) if found else None
            except ValueError:
                value = None
            if value is not None and math.isfinite(value):
                better = "higher" if name in knobs.higher_is_better else "lower"
                out.append(Metric(name, value, knobs.units.get(name, ""), better))
        return out


WORKLOAD = Command()
