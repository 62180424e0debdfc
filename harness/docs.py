"""`python -m harness.docs`: rewrite the README's config reference from the schema (so it cannot drift)."""

from __future__ import annotations

from . import REPO_ROOT
from .config import schema_reference

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def main() -> None:
    readme = REPO_ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{schema_reference()}\n{END}{tail}")


if __name__ == "__main__":
    main()
