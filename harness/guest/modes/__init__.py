"""The pressure modes, one module each, found by name (MODES): adding a mode is adding a module here.

Standard library only: the kernel under test's agent and actors import them (as `modes`), the host as
harness.guest.modes. Each module defines MODE, an instance of base.Mode.
"""

from __future__ import annotations

try:
    from ..registry import discover, lookup
except ImportError:  # in a guest: a top-level package
    from registry import discover, lookup  # type: ignore[no-redef]
from .base import Mode, PhaseEvidence, Sizes

__all__ = ["MODES", "Mode", "PhaseEvidence", "Sizes", "get"]


MODES = discover(__name__, __path__, "MODE", "name")


def get(name: str) -> Mode:
    """The pressure mode of that name; a ValueError naming the known ones otherwise."""
    return lookup(MODES, name, "pressure mode")
