"""Experiment configs: YAML -> validated model -> expanded matrix of cells.

Every list-valued axis multiplies the matrix of cells (LKP-style), so `pressure.mode: [global, memcg-limit]`
makes two cells per variant and repetition. Overrides (`--set a.b=value`) are applied to the raw YAML before
validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .. import REPO_ROOT
from ..errors import ConfigError
from .kernels import Variant
from .schema import Experiment


def axis_paths(model: type[BaseModel] = Experiment, prefix: str = "") -> list[str]:
    """Dotted paths of every axis field (by YAML name), found from the schema itself."""
    out: list[str] = []
    for name, f in model.model_fields.items():
        key = f.alias or name
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        ann = f.annotation
        if extra.get("axis"):
            out.append(prefix + key)
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(axis_paths(ann, prefix + key + "."))
    return out


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(d, list):
            d = _list_item(d, part, ".".join(parts[: i + 1]))
            continue
        d = d.setdefault(part, {})
        if not isinstance(d, (dict, list)):
            raise ConfigError(f"override {path}: {'.'.join(parts[: i + 1])} is not a mapping")
    last = parts[-1]
    if isinstance(d, list):
        idx = _list_index(d, last, path)
        d[idx] = value
    else:
        d[last] = value


def _list_index(items: list, key: str, path: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    raise ConfigError(f"override {path}: no list element named or numbered '{key}'")


def _list_item(items: list, key: str, path: str) -> Any:
    return items[_list_index(items, key, path)]


MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 32  # YAML aliases (*name) in one config: a few are handy, thousands are a bomb
MAX_NESTING = 24  # a config is a few levels deep
MAX_CELLS = 10_000  # no experiment is larger; a matrix is counted before it is expanded


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last, silently), more than
    MAX_ALIASES aliases (each may stand for a whole tree: a few lines can expand to gigabytes) and nesting deeper
    than MAX_NESTING - in well under a second, before anything is built from them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases, self.depth = 0, 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):  # type: ignore[no-untyped-call]
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases", mark)
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING}", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings; values are YAML (`3`, `[a, b]`, `true`). List elements by name or index."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not KEY=VALUE")
        key, raw = pair.split("=", 1)
        try:
            out.append((key.strip(), yaml.load(raw, Loader=_UniqueKeyLoader)))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair}: the value is not YAML ({str(e).splitlines()[0]})") from None
    return out


def resolve_config_path(path: str | Path) -> Path:
    """A config named by path, or by bare name from configs/ (`shrinker-ab`)."""
    p = Path(path)
    if p.exists():
        return p.resolve()
    for cand in (REPO_ROOT / "configs" / p, REPO_ROOT / "configs" / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"{path}: no such config file (looked in . and {REPO_ROOT / 'configs'})")


def load_raw(path: str | Path, overrides: list[str] | None = None) -> tuple[Path, dict]:
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file")
    with p.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES >> 10} KiB; not an experiment config")
    try:
        raw = yaml.load(data.decode(), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides or []):
        _set(raw, key, value)
    return p, raw


def _is_url(where: str) -> bool:
    return "://" in where or bool(re.match(r"^[\w.-]+@[\w.-]+:", where))


def anchored(base: Path, given: str) -> str:
    """A variant's path as the config gives it, relative to the config file's directory `base`."""
    return os.path.normpath(base / Path(given).expanduser())


def _anchor_variant_paths(raw: dict, base: Path) -> None:
    """A variant's patch files and git repository, given relative, are relative to the config file (a user
    keeps their patch beside their config), made absolute here so every later stage reads one path."""
    variants = raw.get("variants")
    for v in variants if isinstance(variants, list) else []:
        if not isinstance(v, dict):
            continue
        if isinstance(v.get("patches"), list):
            v["patches"] = [anchored(base, x) if isinstance(x, str) and x.strip() else x for x in v["patches"]]
        git = v.get("git")
        if isinstance(git, dict) and isinstance(git.get("repo"), str) and not _is_url(git["repo"]):
            git["repo"] = anchored(base, git["repo"])


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid experiment config ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
    return "\n".join(lines)


def _validate(path: Path, raw: dict) -> Experiment:
    """Validate each axis value on its own (by expanding with the first of each list) and the whole."""
    axes = axis_paths()
    for a in axes:
        given = _get(raw, a)
        if isinstance(given, list) and len({json.dumps(v, sort_keys=True) for v in given}) != len(given):
            raise ConfigError(f"{path}: {a}: a value is listed twice ({given}); each would be the same cell")
    for combo in _combinations(raw, axes) or [raw]:
        try:
            Experiment.model_validate(combo)
        except ValidationError as e:
            raise ConfigError(_format_errors(path, e)) from None
    # the stored model keeps the first value of each axis; the matrix lives in load()
    return Experiment.model_validate(_combinations(raw, axes)[0])


def cell_count(raw: dict) -> int:
    """How many cells a raw config expands to (variants x repetitions x every axis's values), without expanding."""
    lists = [v for a in axis_paths() if isinstance(v := _get(raw, a), list)]
    variants, reps = raw.get("variants"), raw.get("repetitions", 3)
    n = len(variants) if isinstance(variants, list) else 1
    n *= reps if isinstance(reps, int) and not isinstance(reps, bool) and reps > 0 else 1
    for values in lists:
        n *= max(1, len(values))
    return n


def _too_many(path: Path, raw: dict, n: int, limit: int) -> ConfigError:
    if limit >= MAX_CELLS:
        return ConfigError(f"{path}: {n} cells, more than the {MAX_CELLS} an experiment may have")
    phases = raw.get("phases")
    durations = [p.get("duration_s") for p in phases if isinstance(p, dict)] if isinstance(phases, list) else []
    seconds = sum(d for d in durations if isinstance(d, (int, float)) and 0 < d <= 86400)
    hours = n * (120 + seconds) / 3600
    return ConfigError(f"{n} cells, roughly {hours:.0f} h under TCG or less with KVM: pass --yes to run them")


def _combinations(raw: dict, axes: list[str]) -> list[dict]:
    lists = {a: v for a in axes if isinstance(v := _get(raw, a), list)}
    if not lists:
        return [raw]
    out = []
    for values in itertools.product(*lists.values()):
        d = copy.deepcopy(raw)
        for a, v in zip(lists, values):
            _set(d, a, v)
        out.append(d)
    return out


class Matrix(BaseModel):
    """The validated experiment and its expanded cells (one per variant x repetition x axis value), in run order."""

    config_path: str
    raw: dict
    experiment: Experiment
    axes: dict[str, list[Any]]
    cells: list[Cell]

    def config_hash(self) -> str:
        """What the cells measure (how many run at once is not part of it: a run resumes at any `parallel`)."""
        measured = {k: v for k, v in self.raw.items() if k != "parallel"}
        return hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:16]

    def shard(self, i: int, n: int) -> list[Cell]:
        """Host i of n's cells: every n-th block of one cell per variant, so each host runs baseline and
        patched of the same repetition and axis values together, interleaved."""
        block = len(self.experiment.variants)
        return [c for c in self.cells if (c.order // block) % n == i]


class Cell(BaseModel):
    """One atomic run: a variant, a repetition, one value of every axis."""

    id: str
    variant: str
    repetition: int
    axes: dict[str, Any]
    order: int
    config: Experiment


def load(path: str | Path, overrides: list[str] | None = None, limit: int = MAX_CELLS) -> Matrix:
    """The validated matrix. Its `raw` is the config as written (what its hash, and so a resume, compare);
    the models have the variants' relative paths anchored at the config file. A matrix of more than `limit`
    cells is refused, counted before it is expanded."""
    return expand(*load_raw(path, overrides), limit=limit)


def expand(p: Path, raw: dict, limit: int = MAX_CELLS) -> Matrix:
    """The matrix of a config file's raw contents (load(), or a command that rewrote them: bisect's steps)."""
    if (n := cell_count(raw)) > min(limit, MAX_CELLS):
        raise _too_many(p, raw, n, min(limit, MAX_CELLS))
    anchored = copy.deepcopy(raw)
    _anchor_variant_paths(anchored, p.parent)
    exp = _validate(p, anchored)
    axes_all = axis_paths()
    lists = {a: v for a in axes_all if isinstance(v := _get(anchored, a), list)}
    combos = [(combo, Experiment.model_validate(combo)) for combo in _combinations(anchored, axes_all)]
    cells: list[Cell] = []
    # repetitions outermost and variants innermost: baseline and patched interleave (A B A B ...)
    for rep in range(1, exp.repetitions + 1):
        for combo, cfg in combos:
            axis_values = {a: _get(combo, a) for a in lists}
            for var in exp.variants:
                label = "-".join(f"{a.split('.')[-1]}={axis_values[a]}" for a in lists)
                cid = f"{var.name}.r{rep}" + (f".{label}" if label else "")
                cells.append(
                    Cell(id=cid, variant=var.name, repetition=rep, axes=axis_values, order=len(cells), config=cfg)
                )
    return Matrix(config_path=str(p), raw=raw, experiment=exp, axes=lists, cells=cells)


def variant_summary(v: Variant) -> str:
    """What a variant changes, in a few words (resolved in full by variants.py)."""
    parts = [f"series {v.series}:{v.patch_variant}"] if v.series else []
    parts += [f"{len(v.patches)} patch path(s)"] if v.patches else []
    parts += [f"git {v.git.ref or v.git.range}"] if v.git else []
    parts += [f"own source {v.source.kind} {v.source.where}"] if v.source else []
    parts += [f"boots with {' '.join(v.kernel_params())}"] if v.kernel_params() else []
    return ", ".join(parts) or "the source as it is"


def describe(matrix: Matrix) -> str:
    exp = matrix.experiment
    lines = [
        f"experiment {exp.name}: {len(matrix.cells)} cell(s) from {matrix.config_path}",
        f"  source: {exp.source.kind} {exp.source.path or exp.source.url}"
        + (f" @ {exp.source.ref}" if exp.source.kind == "git" else ""),
        f"  kernel: {exp.distro_kernel.distro} image {exp.distro_kernel.release}, KVM modules built from the source"
        if exp.distro_kernel
        else f"  kernel config: {exp.kernel_config.base} + "
        + (", ".join(exp.kernel_config.fragments) or "(no fragments)"),
        "  variants: " + ", ".join(f"{v.name} ({variant_summary(v)})" for v in exp.variants),
        "  phases: "
        + " -> ".join(
            f"{p.name} {p.duration_s:g}s" + (f" [{p.mode(exp.pressure.mode)}]" if p.pressure else "")
            for p in exp.phases
        ),
        f"  repetitions: {exp.repetitions} (variants interleaved)",
    ]
    for a, vals in matrix.axes.items():
        lines.append(f"  axis {a}: {vals}")
    lines.append("  cells:")
    lines.extend(f"    {c.order + 1:3d}. {c.id}" for c in matrix.cells)
    return "\n".join(lines)
