"""The committed JSON Schemas: current, backward compatible, and consistently named."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from contracts import schemas
from contracts.base import Command, Event, registry
from contracts.schemas import compare_sets, incompatibilities
from contracts.topics import (
    COMMAND_RESULTS,
    RESTRICTED_TOPICS,
    commands,
    events,
    restricted_events,
)

ROOT = Path(__file__).resolve().parents[2]
TYPE_PATTERN = re.compile(r"^bianzhi\.([a-z]+\.)?[A-Z][A-Za-z]+\.v\d+$")


def _service(type_: str) -> str | None:
    parts = type_.split(".")
    return parts[1] if len(parts) == 4 else None


def committed_baseline() -> dict[str, dict[str, Any]]:
    """The schema files of the last commit; the working-tree files where nothing is committed."""
    relative = schemas.SCHEMA_DIR.relative_to(ROOT).as_posix()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout

    try:
        names = [n for n in git("ls-tree", "--name-only", "HEAD", f"{relative}/").split() if n]
        if not names:
            return schemas.load_dir()
        return {
            Path(name).name: json.loads(git("show", f"HEAD:./{name}"))
            for name in names
            if name.endswith(".json")
        }
    except (OSError, subprocess.SubprocessError, ValueError):
        return schemas.load_dir()


def generated_by_file() -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in schemas.expected_files().items()}


# --- (a) the files are current ------------------------------------------------------------


def test_committed_schema_files_match_the_models() -> None:
    problems = schemas.differences()
    assert not problems, (
        "contracts/schemas/ is out of date with the models:\n  "
        + "\n  ".join(problems)
        + f"\n{schemas.REGENERATE_HINT}"
    )


def test_check_command_passes_and_write_reproduces_the_files(tmp_path: Path) -> None:
    assert schemas.main(["--check"]) == 0
    assert schemas.main(["--write", "--dir", str(tmp_path)]) == 0
    assert schemas.differences(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(schemas.expected_files())


def test_check_command_fails_on_a_stale_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schemas.write(tmp_path)
    (tmp_path / "envelope.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "bianzhi.orgs.Gone.v1.json").write_text("{}\n", encoding="utf-8")
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "out of date: envelope.json" in err
    assert "unexpected: bianzhi.orgs.Gone.v1.json" in err
    assert "--write" in err


def test_every_schema_names_its_type_topic_and_subject() -> None:
    for type_, schema in schemas.generate().items():
        model = registry()[type_]
        assert schema["$id"] == schema["title"] == type_
        assert schema["x-topic"] == model.TOPIC
        assert schema["x-subject"] == model.SUBJECT
        assert schema["type"] == "object"


def test_written_files_are_sorted_indented_and_end_with_a_newline() -> None:
    text = (schemas.SCHEMA_DIR / "envelope.json").read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


# --- (b) compatibility with the committed baseline ----------------------------------------


def test_generated_schemas_are_compatible_with_the_committed_baseline() -> None:
    problems = compare_sets(committed_baseline(), generated_by_file())
    assert not problems, (
        "incompatible change of the wire contract; keep the old type and add a .v2 instead:\n  "
        + "\n  ".join(problems)
    )


def test_the_compatibility_check_catches_a_real_breaking_change() -> None:
    baseline = generated_by_file()
    changed = copy.deepcopy(baseline)
    enrol = changed["bianzhi.roster.EnrolPerson.v1.json"]
    del enrol["properties"]["position"]
    enrol["required"].append("phone")
    del changed["bianzhi.notify.Unsubscribe.v1.json"]
    problems = compare_sets(baseline, changed)
    assert "bianzhi.roster.EnrolPerson.v1.json: position: property removed" in problems
    assert "bianzhi.roster.EnrolPerson.v1.json: phone: optional property made required" in problems
    assert "bianzhi.notify.Unsubscribe.v1.json: type removed" in problems


def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict:
    return {"type": "object", "properties": properties, "required": required or [], **extra}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
BASE = _obj({"a": STRING, "b": NULLABLE_STRING}, ["a"])


def test_an_unchanged_schema_is_compatible() -> None:
    assert incompatibilities(BASE, copy.deepcopy(BASE)) == []


def test_adding_an_optional_property_is_compatible() -> None:
    new = _obj({"a": STRING, "b": NULLABLE_STRING, "c": NULLABLE_STRING}, ["a"])
    assert incompatibilities(BASE, new) == []


def test_loosening_is_compatible() -> None:
    old = _obj(
        {"n": {"type": "integer", "maximum": 10}, "e": {"enum": ["x", "y"], "type": "string"}},
        ["n"],
        additionalProperties=False,
    )
    new = _obj(
        {
            "n": {"anyOf": [{"type": "number", "maximum": 20}, {"type": "null"}]},
            "e": {"enum": ["x", "y", "z"], "type": "string"},
        },
        [],
    )
    assert incompatibilities(old, new) == []


def test_a_removed_property_is_breaking() -> None:
    assert incompatibilities(BASE, _obj({"a": STRING}, ["a"])) == ["b: property removed"]


def test_a_changed_property_type_is_breaking() -> None:
    new = _obj({"a": INTEGER, "b": NULLABLE_STRING}, ["a"])
    assert incompatibilities(BASE, new) == ["a: type changed from string to integer"]


def test_a_nullable_property_made_non_nullable_is_breaking() -> None:
    new = _obj({"a": STRING, "b": STRING}, ["a"])
    assert incompatibilities(BASE, new) == ["b: null no longer accepted"]


def test_a_new_required_property_is_breaking() -> None:
    new = _obj({"a": STRING, "b": NULLABLE_STRING, "c": STRING}, ["a", "c"])
    assert incompatibilities(BASE, new) == ["c: new required property"]


def test_an_optional_property_made_required_is_breaking() -> None:
    new = _obj({"a": STRING, "b": NULLABLE_STRING}, ["a", "b"])
    assert incompatibilities(BASE, new) == ["b: optional property made required"]


def test_a_removed_enum_value_is_breaking() -> None:
    old = _obj({"e": {"enum": ["x", "y"], "type": "string"}})
    new = _obj({"e": {"enum": ["x"], "type": "string"}})
    assert incompatibilities(old, new) == ["e: enum value 'y' removed"]


def test_a_removed_enum_value_behind_a_ref_is_breaking() -> None:
    def schema(values: list[str]) -> dict[str, Any]:
        return {
            "$defs": {"Category": {"enum": values, "type": "string"}},
            **_obj({"category": {"$ref": "#/$defs/Category"}}, ["category"]),
        }

    assert incompatibilities(schema(["admin", "support"]), schema(["admin"])) == [
        "category: enum value 'support' removed"
    ]


def test_a_changed_const_is_breaking() -> None:
    old = _obj({"kind": {"const": "webhook", "type": "string"}})
    new = _obj({"kind": {"const": "hook", "type": "string"}})
    assert incompatibilities(old, new) == ["kind: enum value 'webhook' removed"]


@pytest.mark.parametrize(
    ("old_extra", "new_extra"),
    [(None, False), (True, False), ({"type": "string"}, False), (None, {"type": "string"})],
)
def test_tightened_additional_properties_is_breaking(old_extra: Any, new_extra: Any) -> None:
    old = (
        _obj({"a": STRING})
        if old_extra is None
        else _obj({"a": STRING}, [], additionalProperties=old_extra)
    )
    new = _obj({"a": STRING}, [], additionalProperties=new_extra)
    assert incompatibilities(old, new) == ["(root): additionalProperties tightened"]


def test_changes_inside_nested_objects_and_arrays_are_found() -> None:
    def schema(doc: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        return {
            "$defs": {"Document": doc},
            **_obj(
                {
                    "document": {"anyOf": [{"$ref": "#/$defs/Document"}, {"type": "null"}]},
                    "tags": {"type": "array", "items": item},
                }
            ),
        }

    old = schema(_obj({"number": STRING, "date": STRING}, ["number"]), STRING)
    new = schema(_obj({"number": STRING}, ["number"]), INTEGER)
    assert incompatibilities(old, new) == [
        "document.date: property removed",
        "tags[]: type changed from string to integer",
    ]


def test_a_removed_union_variant_is_breaking() -> None:
    def schema(mapping: dict[str, str]) -> dict[str, Any]:
        defs = {
            "Web": _obj({"kind": {"const": "webhook", "type": "string"}}, ["kind"]),
            "Mail": _obj({"kind": {"const": "email", "type": "string"}}, ["kind"]),
        }
        return {
            "$defs": defs,
            **_obj(
                {
                    "channel": {
                        "discriminator": {"mapping": mapping, "propertyName": "kind"},
                        "oneOf": [{"$ref": ref} for ref in mapping.values()],
                    }
                },
                ["channel"],
            ),
        }

    both = {"webhook": "#/$defs/Web", "email": "#/$defs/Mail"}
    assert incompatibilities(schema(both), schema(both)) == []
    assert incompatibilities(schema({"webhook": "#/$defs/Web"}), schema(both)) == []
    assert incompatibilities(schema(both), schema({"webhook": "#/$defs/Web"})) == [
        "channel: union variant 'email' removed"
    ]


def test_tightened_bounds_and_patterns_are_breaking() -> None:
    old = _obj({"s": {"type": "string", "maxLength": 100}, "n": {"type": "integer", "minimum": 0}})
    new = _obj(
        {
            "s": {"type": "string", "maxLength": 50, "pattern": "^a"},
            "n": {"type": "integer", "minimum": 1},
        }
    )
    assert incompatibilities(old, new) == [
        "s: maxLength tightened to 50",
        "s: pattern changed to '^a'",
        "n: minimum tightened to 1",
    ]


def test_a_changed_topic_or_subject_is_breaking() -> None:
    old = {**BASE, "x-topic": "bianzhi.quota.commands.v1", "x-subject": "org_id"}
    new = {**BASE, "x-topic": "bianzhi.roster.commands.v1", "x-subject": "org_id"}
    assert incompatibilities(old, new) == [
        "x-topic changed from 'bianzhi.quota.commands.v1' to 'bianzhi.roster.commands.v1'"
    ]


# --- (c) names and topics -----------------------------------------------------------------


def test_every_type_string_follows_the_naming_rule() -> None:
    bad = [type_ for type_ in registry() if not TYPE_PATTERN.match(type_)]
    assert not bad


@pytest.mark.parametrize("type_", sorted(registry()))
def test_each_message_travels_on_its_services_topic(type_: str) -> None:
    model = registry()[type_]
    service, topic = _service(type_), model.TOPIC
    if issubclass(model, Command):
        assert service is not None
        assert topic == commands(service)
    else:
        assert issubclass(model, Event)
        if topic in RESTRICTED_TOPICS:  # full personal data: the service's restricted topic
            assert service is not None and topic == restricted_events(service)
        else:
            assert topic == (events(service) if service else COMMAND_RESULTS)


@pytest.mark.parametrize("type_", sorted(registry()))
def test_each_message_subject_is_a_required_field(type_: str) -> None:
    model = registry()[type_]
    assert model.SUBJECT in model.model_fields
    assert model.model_fields[model.SUBJECT].is_required()
