"""The dependency set is locked: constraints.txt pins every package the install brings, within
the ranges pyproject.toml declares, and every way of installing (dev script, CI, image) uses it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line.strip())
        assert match, f"not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in found, f"{name} pinned twice"
        found[name] = Version(match[2])
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    locked = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{req.name}=={locked[name]} is outside pyproject.toml's {req.specifier}"
        )


def test_the_project_itself_is_not_pinned() -> None:
    assert "bianzhi" not in pins()


def test_the_environment_under_test_is_the_locked_one() -> None:
    # What `scripts/dev.sh install` put here: every dependency at its pinned version.
    locked = pins()
    wrong = {}
    for req in declared():
        name = canonicalize_name(req.name)
        try:
            installed = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            wrong[name] = "not installed"
            continue
        if installed != locked[name]:
            wrong[name] = f"{installed} installed, {locked[name]} pinned"
    assert not wrong, wrong


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        ("scripts/dev.sh", r"pip install --quiet -c constraints\.txt -e '\.\[dev\]'"),
        ("Containerfile", r"pip install -c constraints\.txt /wheels/\*\.whl"),
        ("Containerfile", r"COPY pyproject\.toml README\.md constraints\.txt \./"),
    ],
)
def test_every_install_uses_the_constraints(path: str, pattern: str) -> None:
    assert re.search(pattern, (ROOT / path).read_text()), f"{path} does not install with them"


def test_the_install_stamp_covers_the_constraints() -> None:
    # A changed constraints.txt reinstalls, as a changed pyproject.toml does.
    script = (ROOT / "scripts/dev.sh").read_text()
    assert "cat pyproject.toml constraints.txt | sha256sum" in script
