"""How a registry finds its entries: every module of a package (but `base` and private ones) that defines the
named object, keyed by one of its attributes. Standard library only: the guests' registries (modes/, workloads/)
use it, and the host's (harness/hypotheses/)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any


def discover(package: str, path: Iterable[str], attr: str, key: str) -> dict[str, Any]:
    """{entry.<key>: entry} for the <attr> of each module of the package, in the modules' name order."""
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            entry = getattr(importlib.import_module(f"{package}.{info.name}"), attr)
            found[getattr(entry, key)] = entry
    return found


def lookup(found: dict[str, Any], name: str, what: str) -> Any:
    """The entry of that name; a ValueError naming the known ones otherwise."""
    try:
        return found[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(found)})") from None
