"""The pressure modes, one module each, found by name (MODES): adding a mode is adding a module here.

Standard library only: the kernel under test's agent and actors import them (as `modes`), the host as
harness.guest.modes. Each module defines MODE, an instance of base.Mode.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Mode, PhaseEvidence, Sizes

__all__ = ["MODES", "Mode", "PhaseEvidence", "Sizes", "get"]


def _discover() -> dict[str, Mode]:
    found: dict[str, Mode] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            mode = importlib.import_module(f"{__name__}.{info.name}").MODE
            found[mode.name] = mode
    return found


MODES = _discover()


def get(name: str) -> Mode:
    """The mode of that name; a ValueError naming the known ones otherwise."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown pressure mode {name!r} (known: {', '.join(MODES)})") from None
