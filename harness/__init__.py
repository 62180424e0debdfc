"""nestpress: patched kernel -> nested guests -> memory pressure -> latency report."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
