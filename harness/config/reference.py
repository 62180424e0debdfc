"""The config reference, generated from the schema: `python -m harness.config.reference` rewrites
docs/config-reference.md (so it cannot drift: a test fails when it is stale)."""

from __future__ import annotations

import json

from .. import REPO_ROOT
from .schema import Experiment

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def schema_reference() -> str:
    """Markdown config reference generated from the schema (docs/config-reference.md embeds it)."""
    schema = Experiment.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    lines: list[str] = []

    def walk(props: dict, required: list[str], prefix: str) -> None:
        for name, spec in props.items():
            ref = spec.get("$ref") or next(
                (x.get("$ref") for x in spec.get("allOf", []) + spec.get("anyOf", []) if "$ref" in x), None
            )
            path = prefix + name
            item = spec.get("items", {}).get("$ref") if spec.get("type") == "array" else None
            if item and "properties" in defs[item.split("/")[-1]]:  # a list of objects: each item's fields
                sub = defs[item.split("/")[-1]]
                about = " ".join(sub.get("description", "").split())
                lines.append(f"| `{path}` | list | {'required' if name in required else ''} | {about} |")
                walk(sub["properties"], sub.get("required", []), path + "[].")
                continue
            if ref and "properties" in defs[ref.split("/")[-1]]:
                sub = defs[ref.split("/")[-1]]
                walk(sub["properties"], sub.get("required", []), path + ".")
                continue
            kind = spec.get("type") or "/".join(x.get("type", "?") for x in spec.get("anyOf", []))
            if "enum" in spec:
                kind = " \\| ".join(map(str, spec["enum"]))
            elif "anyOf" in spec and any("enum" in x for x in spec["anyOf"]):
                kinds = [str(v) for x in spec["anyOf"] for v in x.get("enum", [x.get("type", "?")])]
                kind = " \\| ".join(kinds)
            if spec.get("axis"):
                kind += " (axis: a list expands the matrix)"
            default = "required" if name in required else json.dumps(spec.get("default")) if "default" in spec else ""
            lines.append(f"| `{path}` | {kind} | {default} | {spec.get('description', '')} |")

    walk(schema["properties"], schema.get("required", []), "")
    return "| field | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(lines)


DOC = REPO_ROOT / "docs" / "config-reference.md"


def main() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{schema_reference()}\n{END}{tail}")


if __name__ == "__main__":
    main()
