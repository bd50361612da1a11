"""JSON Schemas of the wire contract, generated from the models, and the compatibility check.

``python -m contracts.schemas --write`` writes one schema per message ``type`` (the schema of its
``data``) plus ``envelope.json`` into ``contracts/schemas/``; ``--check`` exits 1 when the files
differ from the models. ``incompatibilities(old, new)`` lists the changes of a schema that would
break a sender or a consumer built against ``old`` (ARCHITECTURE §3, evolution).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from contracts.base import registry
from contracts.envelope import Envelope

SCHEMA_DIR = Path(__file__).parent / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
ENVELOPE_FILE = "envelope.json"
REGENERATE_HINT = "run `python -m contracts.schemas --write` and commit contracts/schemas/"

Schema = dict[str, Any]


# --- generation ---------------------------------------------------------------------------


def generate() -> dict[str, Schema]:
    """One JSON Schema per registered message ``type``: the schema of its ``data``."""
    schemas: dict[str, Schema] = {}
    for type_, model in sorted(registry().items()):
        schema = model.model_json_schema(mode="validation")
        schema.update(
            {
                "$schema": DIALECT,
                "$id": type_,
                "title": type_,
                "x-topic": model.TOPIC,
                "x-subject": model.SUBJECT,
            }
        )
        schemas[type_] = schema
    return schemas


def envelope_schema() -> Schema:
    """The JSON Schema of the CloudEvents envelope."""
    schema = Envelope.model_json_schema(mode="validation")
    schema.update({"$schema": DIALECT, "$id": "envelope", "title": "Envelope"})
    return schema


def file_name(type_: str) -> str:
    """The schema file of a message ``type``."""
    return f"{type_}.json"


def render(schema: Schema) -> str:
    """The committed text of a schema: sorted keys, indent 2, trailing newline."""
    return json.dumps(schema, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def expected_files() -> dict[str, str]:
    """File name to text of every schema file the models produce."""
    files = {file_name(type_): render(schema) for type_, schema in generate().items()}
    files[ENVELOPE_FILE] = render(envelope_schema())
    return files


def load_dir(directory: Path = SCHEMA_DIR) -> dict[str, Schema]:
    """The schemas stored in ``directory``, by file name."""
    if not directory.is_dir():
        return {}
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(directory.glob("*.json"))
    }


def differences(directory: Path = SCHEMA_DIR) -> list[str]:
    """How the files in ``directory`` differ from the generated schemas (empty when equal)."""
    expected = expected_files()
    present = (
        {p.name: p.read_text(encoding="utf-8") for p in directory.glob("*.json")}
        if directory.is_dir()
        else {}
    )
    problems = [f"missing: {name}" for name in sorted(expected.keys() - present.keys())]
    problems += [f"unexpected: {name}" for name in sorted(present.keys() - expected.keys())]
    problems += [
        f"out of date: {name}"
        for name in sorted(expected.keys() & present.keys())
        if expected[name] != present[name]
    ]
    return problems


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Write every schema file into ``directory``, removing files of types that no longer exist.

    Returns the incompatibilities of the new schemas against the files they replace.
    """
    previous = load_dir(directory)
    expected = expected_files()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in sorted(previous.keys() - expected.keys()):
        (directory / stale).unlink()
    for name, text in expected.items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return compare_sets(previous, {name: json.loads(text) for name, text in expected.items()})


def compare_sets(old: dict[str, Schema], new: dict[str, Schema]) -> list[str]:
    """Incompatibilities between two sets of schemas by file name; a removed file is one too."""
    problems: list[str] = []
    for name in sorted(old):
        if name not in new:
            problems.append(f"{name}: type removed")
            continue
        problems += [f"{name}: {problem}" for problem in incompatibilities(old[name], new[name])]
    return problems


# --- compatibility ------------------------------------------------------------------------

_LOWER_BOUNDS = ("minLength", "minimum", "exclusiveMinimum", "minItems", "minProperties")
_UPPER_BOUNDS = ("maxLength", "maximum", "exclusiveMaximum", "maxItems", "maxProperties")
_ROOT_KEYS = ("x-topic", "x-subject")


def incompatibilities(old: Schema, new: Schema) -> list[str]:
    """The breaking changes from schema ``old`` to schema ``new``, one line each.

    Breaking: a property removed; a property's type changed or narrowed (null no longer allowed,
    a union variant gone); a new required property; an optional property made required; an enum
    value removed (or a free value restricted to an enum); ``additionalProperties`` tightened; a
    bound, pattern or format tightened; the topic or subject changed. Adding optional properties,
    enum values or union variants, and loosening anything, is compatible.
    """
    problems = [
        f"{key} changed from {old.get(key)!r} to {new.get(key)!r}"
        for key in _ROOT_KEYS
        if old.get(key) != new.get(key)
    ]
    return problems + _Comparer(old, new).compare(old, new, "")


class _Comparer:
    """Walks two schemas side by side, resolving ``$ref`` against each one's own ``$defs``."""

    def __init__(self, old_root: Schema, new_root: Schema) -> None:
        self.old_root = old_root
        self.new_root = new_root
        self.seen: set[tuple[str, str]] = set()

    def compare(self, old: Schema, new: Schema, path: str) -> list[str]:
        refs = (str(old.get("$ref", "")), str(new.get("$ref", "")))
        if refs[0] and refs[1]:
            if refs in self.seen:  # compared already, or a recursive model being compared
                return []
            self.seen.add(refs)
        old = _resolve(old, self.old_root)
        new = _resolve(new, self.new_root)
        old_mapping = _mapping(old)
        if old_mapping is not None:
            return self._discriminated(old_mapping, new, path)
        return self._branches(old, new, path)

    def _discriminated(self, old_mapping: dict[str, str], new: Schema, path: str) -> list[str]:
        new_mapping = _mapping(new)
        if new_mapping is None:
            return [f"{_label(path)}: no longer a discriminated union"]
        problems: list[str] = []
        for tag, ref in sorted(old_mapping.items()):
            if tag not in new_mapping:
                problems.append(f"{_label(path)}: union variant {tag!r} removed")
            else:
                problems += self.compare({"$ref": ref}, {"$ref": new_mapping[tag]}, path)
        return problems

    def _branches(self, old: Schema, new: Schema, path: str) -> list[str]:
        old_all, new_all = _variants(old, self.old_root), _variants(new, self.new_root)
        old_null, new_null = _nullable(old_all), _nullable(new_all)
        problems: list[str] = []
        if old_null and not new_null:
            problems.append(f"{_label(path)}: null no longer accepted")
        old_vs = [v for v in old_all if not _is_null(v)]
        new_vs = [v for v in new_all if not _is_null(v)]
        if len(new_vs) == 1:
            for variant in old_vs:
                problems += self._single(variant, new_vs[0], path)
            return problems
        for variant in old_vs:
            match = _match(variant, new_vs, self.old_root, self.new_root)
            if match is None:
                problems.append(f"{_label(path)}: variant {_signature(variant)} removed")
            else:
                problems += self._single(variant, match, path)
        return problems

    def _single(self, old: Schema, new: Schema, path: str) -> list[str]:
        if "$ref" in old or "$ref" in new:
            return self.compare(old, new, path)
        if _mapping(old) is not None or len(_variants(new, self.new_root)) > 1:
            return self.compare(old, new, path)
        old_types, new_types = _types(old), _types(new)
        if new_types and not _widens(old_types, new_types):
            before = "/".join(sorted(old_types)) or "any"
            return [f"{_label(path)}: type changed from {before} to {'/'.join(sorted(new_types))}"]
        problems = _values(old, new, path) + _constraints(old, new, path)
        problems += self._object(old, new, path)
        if "items" in new and isinstance(new["items"], dict):
            problems += self.compare(old.get("items", {}), new["items"], f"{path}[]")
        return problems

    def _object(self, old: Schema, new: Schema, path: str) -> list[str]:
        problems: list[str] = []
        old_props: dict[str, Schema] = old.get("properties", {})
        new_props: dict[str, Schema] = new.get("properties", {})
        for name, schema in old_props.items():
            where = _join(path, name)
            if name not in new_props:
                problems.append(f"{where}: property removed")
            else:
                problems += self.compare(schema, new_props[name], where)
        old_required = set(old.get("required", []))
        for name in sorted(set(new.get("required", [])) - old_required):
            where = _join(path, name)
            if name in old_props:
                problems.append(f"{where}: optional property made required")
            else:
                problems.append(f"{where}: new required property")
        old_extra, new_extra = old.get("additionalProperties"), new.get("additionalProperties")
        if _openness(new_extra) < _openness(old_extra):
            problems.append(f"{_label(path)}: additionalProperties tightened")
        elif isinstance(old_extra, dict) and isinstance(new_extra, dict):
            problems += self.compare(old_extra, new_extra, f"{path}{{*}}")
        return problems


def _resolve(node: Schema, root: Schema) -> Schema:
    """``node`` with local ``$ref``s and single-element ``allOf`` wrappers followed."""
    for _ in range(50):
        if "allOf" in node and len(node["allOf"]) == 1:
            node = node["allOf"][0]
        elif isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            target: Any = root
            for part in node["$ref"][2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        else:
            return node
    raise ValueError("$ref chain too long")


def _mapping(node: Schema) -> dict[str, str] | None:
    discriminator = node.get("discriminator")
    if isinstance(discriminator, dict) and isinstance(discriminator.get("mapping"), dict):
        return discriminator["mapping"]
    return None


def _variants(node: Schema, root: Schema) -> list[Schema]:
    """The alternatives of ``node`` (its ``anyOf``/``oneOf`` members, flattened), or itself."""
    members = node.get("anyOf") or node.get("oneOf")
    if not members or _mapping(node) is not None:
        return [node]
    flat: list[Schema] = []
    for member in members:
        flat += _variants(_resolve(member, root), root) if "$ref" not in member else [member]
    return flat


def _is_null(node: Schema) -> bool:
    return node.get("type") == "null" or ("const" in node and node["const"] is None)


def _nullable(variants: list[Schema]) -> bool:
    return any(_is_null(v) or "null" in _types(v) for v in variants)


def _types(node: Schema) -> set[str]:
    """The JSON types ``node`` admits; empty means any."""
    declared = node.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return set(declared)
    values = _enum(node)
    if values is not None:
        return {_json_type(v) for v in values}
    if "properties" in node or "additionalProperties" in node:
        return {"object"}
    if "items" in node:
        return {"array"}
    return set()


def _widens(old: set[str], new: set[str]) -> bool:
    if not old:
        return not new
    return all(t in new or (t == "integer" and "number" in new) for t in old)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _enum(node: Schema) -> list[Any] | None:
    if "enum" in node:
        return list(node["enum"])
    if "const" in node:
        return [node["const"]]
    return None


def _values(old: Schema, new: Schema, path: str) -> list[str]:
    old_values, new_values = _enum(old), _enum(new)
    if new_values is None:
        return []
    if old_values is None:
        return [f"{_label(path)}: restricted to the values {new_values!r}"]
    removed = [v for v in old_values if v not in new_values]
    return [f"{_label(path)}: enum value {v!r} removed" for v in removed]


def _constraints(old: Schema, new: Schema, path: str) -> list[str]:
    problems: list[str] = []
    for key in _LOWER_BOUNDS:
        if key in new and (key not in old or new[key] > old[key]):
            problems.append(f"{_label(path)}: {key} tightened to {new[key]!r}")
    for key in _UPPER_BOUNDS:
        if key in new and (key not in old or new[key] < old[key]):
            problems.append(f"{_label(path)}: {key} tightened to {new[key]!r}")
    for key in ("pattern", "format"):
        if key in new and new[key] != old.get(key):
            problems.append(f"{_label(path)}: {key} changed to {new[key]!r}")
    return problems


def _openness(additional: Any) -> int:
    """2 anything goes, 1 extra properties must match a schema, 0 none allowed."""
    if additional is False:
        return 0
    if isinstance(additional, dict) and additional:
        return 1
    return 2


def _signature(node: Schema) -> str:
    if "$ref" in node:
        return str(node["$ref"]).rsplit("/", 1)[-1]
    return "/".join(sorted(_types(node))) or "any"


def _match(
    variant: Schema, candidates: list[Schema], old_root: Schema, new_root: Schema
) -> Schema | None:
    """The new variant that stands for the old ``variant``: same $ref name, else same types."""
    signature = _signature(variant)
    for candidate in candidates:
        if _signature(candidate) == signature:
            return candidate
    old_types = _types(_resolve(variant, old_root))
    for candidate in candidates:
        if _widens(old_types, _types(_resolve(candidate, new_root))):
            return candidate
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _label(path: str) -> str:
    return path or "(root)"


# --- command line -------------------------------------------------------------------------


def _print(lines: Iterator[str] | list[str], stream: Any = sys.stdout) -> None:
    for line in lines:
        print(line, file=stream)


def main(argv: list[str] | None = None) -> int:
    """``--write`` the schema files, or ``--check`` that they match the models."""
    parser = argparse.ArgumentParser(prog="python -m contracts.schemas", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write contracts/schemas/*.json")
    action.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="the schema directory")
    args = parser.parse_args(argv)
    if args.write:
        breaking = write(args.dir)
        print(f"wrote {len(expected_files())} schemas to {args.dir}")
        if breaking:
            print("WARNING: incompatible with the previous schemas:", file=sys.stderr)
            _print((f"  {line}" for line in breaking), sys.stderr)
        return 0
    problems = differences(args.dir)
    if problems:
        _print(problems, sys.stderr)
        print(REGENERATE_HINT, file=sys.stderr)
        return 1
    print("schemas up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
