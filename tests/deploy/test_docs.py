"""docs/deploy.md stays true: its example manifests match what the overlays expect, the one-off
Pod is a valid Kubernetes object admitted by the restricted namespace, and its command parses."""

from __future__ import annotations

import base64
import importlib
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from contracts.topics import SERVICES
from services.cli.common import resolve_command_type
from services.cli.main import build_parser
from services.cli.main import main as bianzhi
from services.cli.send import build_envelope, load_data
from services.runtime.signing import (
    CommandVerifier,
    load_key_scopes,
    load_private_key,
    load_public_keys,
    raw_public_key,
    sign_envelope,
)
from tests.deploy.render import Resource, kubectl, kubectl_build
from tests.deploy.test_manifests import (
    HAND_MADE_CONFIGMAPS,
    HAND_MADE_SECRET_DIRECTORIES,
    HAND_MADE_SECRETS,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deploy.md"

sys.path.insert(0, str(ROOT / "deploy"))
generate = importlib.import_module("generate")


def documented() -> list[Resource]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def one(kind: str) -> Resource:
    (found,) = [o for o in documented() if o.get("kind") == kind]
    return found


def prod() -> list[Resource]:
    return kubectl_build(ROOT / "deploy" / "k8s" / "overlays" / "prod")


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_the_linked_walkthrough_exists() -> None:
    assert "docs/deploy.md" in (ROOT / "deploy" / "README.md").read_text()


def test_the_kafka_cluster_is_the_one_the_services_expect() -> None:
    kafka, pool = one("Kafka"), one("KafkaNodePool")
    (namespace,) = [o for o in prod() if o["kind"] == "Namespace"]
    assert kafka["metadata"]["name"] == generate.KAFKA_CLUSTER
    assert kafka["metadata"]["namespace"] == namespace["metadata"]["name"]
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == generate.KAFKA_CLUSTER
    assert pool["spec"]["replicas"] >= 3 and set(pool["spec"]["roles"]) == {"controller", "broker"}
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert (listener["port"], listener["tls"]) == (9093, True)
    assert listener["authentication"]["type"] == "scram-sha-512"
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    assert {"topicOperator", "userOperator"} <= set(kafka["spec"]["entityOperator"])


def test_the_first_command_pod_is_valid_and_restricted() -> None:
    pod = one("Pod")
    kubernetes_validate.validate(pod, "1.37.0", strict=True)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    # the same connection settings as the services, but as the front-end writer
    service_env = next(
        o["data"] for o in prod() if o["kind"] == "ConfigMap" and "orgs" in o["metadata"]["name"]
    )
    env = env_of(container)
    for name in ("BIANZHI_KAFKA_SECURITY_PROTOCOL", "BIANZHI_KAFKA_SASL_MECHANISM"):
        assert env[name] == service_env[name]
    writer = generate.user_name("frontend-writer")
    assert env["BIANZHI_KAFKA_SASL_USERNAME"] == writer
    secrets = {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    assert secrets == {writer, f"{generate.KAFKA_CLUSTER}-cluster-ca-cert", OPERATOR_SECRET}
    # the command is signed (the services require it) with the operator key, mounted read-only
    # and readable by the pod's group only
    key_path = Path(env["BIANZHI_SIGNING_PRIVATE_KEY"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(key_path.parent)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == OPERATOR_SECRET
    assert volume["secret"]["items"] == [{"key": "key.pem", "path": key_path.name}]
    assert volume["secret"]["defaultMode"] & 0o007 == 0
    assert pod["spec"]["securityContext"]["fsGroup"] == container_group(pod)
    assert env["BIANZHI_SIGNING_KID"] == operator_kid()


def test_the_first_command_is_a_valid_command() -> None:
    (container,) = one("Pod")["spec"]["containers"]
    assert container["args"][0] == "bianzhi"
    args = build_parser().parse_args(container["args"][1:])
    assert args.broker == service_bootstrap()
    envelope = build_envelope(
        resolve_command_type(args.type),
        load_data(args.data),
        command_id="doc",
        source=args.source,
        actor=args.actor,
        region=args.region,
        roles=args.roles,
    )
    assert envelope.type == "bianzhi.orgs.RegisterOrg.v1"


OPERATOR_SECRET = "bianzhi-operator-signing-key"


def container_group(pod: Resource) -> int:
    group: int = pod["spec"]["securityContext"]["runAsGroup"]
    return group


def operator_kid() -> str:
    """The kid of the operator key the first command is signed with (step 9's Secret)."""
    (source,) = [w for w in shlex.split(create_command(OPERATOR_SECRET)) if "--from-file" in w]
    assert source.startswith("--from-file=key.pem="), source
    return Path(source.split("=", 2)[2]).name.removesuffix(".key.pem")


def service_bootstrap() -> str:
    configs = [o for o in prod() if o["kind"] == "ConfigMap"]
    (bootstrap,) = {c["data"]["BIANZHI_KAFKA_BOOTSTRAP"] for c in configs}
    return bootstrap


def test_the_webhook_egress_rule_is_documented_as_it_is() -> None:
    policy = yaml.safe_load(
        (ROOT / "deploy/k8s/components/network-policies/notify.yaml").read_text()
    )
    (rule,) = [r for r in policy["spec"]["egress"] if any("ipBlock" in p for p in r["to"])]
    section = DOC.read_text().split("## Webhook egress (notify)", 1)[1].split("\n## ", 1)[0]
    for port in rule["ports"]:
        assert f"**{port['port']}**" in section
    for peer in rule["to"]:
        block = peer["ipBlock"]
        assert f"`{block['cidr']}`" in section
        for cidr in block["except"]:
            assert f"`{cidr}`" in section, cidr
    assert "webhook-egress-notify" in (ROOT / "deploy" / "README.md").read_text()


def shell_block_with(text: str, *, nested: bool = False) -> str:
    """The one ```sh block of docs/deploy.md that contains ``text``, continuation lines joined;
    ``nested``: blocks inside list items too (indented), their lines dedented."""
    fence = r"^[ \t]*```" if nested else r"^```"
    blocks = re.findall(fence + r"sh\n(.*?)" + fence, DOC.read_text(), re.MULTILINE | re.DOTALL)
    (block,) = [textwrap.dedent(b) for b in blocks if text in b]
    return block.replace("\\\n", " ")


def fold(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


def section_with(text: str) -> str:
    """The one section (from a ``##``/``###`` heading to the next) of docs/deploy.md holding
    ``text``, continuation lines joined and whitespace folded."""
    sections = re.split(r"^#{2,3} ", DOC.read_text(), flags=re.MULTILINE)
    (section,) = [fold(s) for s in sections if fold(text) in fold(s)]
    return section


def create_command(secret: str) -> str:
    """The documented ``kubectl create secret`` line of a hand-made Secret."""
    block = shell_block_with(f"create secret generic {secret}")
    (create,) = [line for line in block.splitlines() if f"create secret generic {secret}" in line]
    return create


def _roster_key(path: Path) -> bytes:
    from services.roster.domain.personal_data import load_master_key

    return load_master_key(value=None, path=path, generate_at=None)


def _notify_key(path: Path) -> bytes:
    from services.notify.adapters.secrets import load_key
    from services.notify.settings import NotifySettings

    settings = NotifySettings(secrets_key=None, secrets_key_file=path)
    return load_key(settings, data_dir=path.parent, embedded=False)


# How each service loads its hand-made encryption key, as it does at start.
KEY_LOADERS: dict[str, Callable[[Path], bytes]] = {
    "bianzhi-roster-personal-data-key": _roster_key,
    "bianzhi-notify-secrets-key": _notify_key,
}
ENCRYPTION_KEYS = sorted(s for s, made in HAND_MADE_SECRETS.items() if made.encryption_key)


def test_every_encryption_key_has_a_loader_here() -> None:
    assert sorted(KEY_LOADERS) == ENCRYPTION_KEYS


@pytest.mark.parametrize("secret", sorted(HAND_MADE_SECRETS))
def test_a_hand_made_secret_is_created_as_documented(secret: str) -> None:
    key = HAND_MADE_SECRETS[secret].key
    create = create_command(secret)
    (namespace,) = [o for o in prod() if o["kind"] == "Namespace"]
    words = shlex.split(create)
    assert words[:3] == ["kubectl", "-n", namespace["metadata"]["name"]]
    assert any(w.startswith(f"--from-file={key}=") for w in words), "the key the pod mounts"
    # its section names the setting that reads the mounted file
    assert HAND_MADE_SECRETS[secret].setting in section_with(create)


@pytest.mark.parametrize("secret", sorted(HAND_MADE_SECRET_DIRECTORIES))
def test_a_hand_made_secret_directory_is_created_as_documented(secret: str) -> None:
    made = HAND_MADE_SECRET_DIRECTORIES[secret]
    block = shell_block_with(f"create secret generic {secret}", nested=True)
    (create,) = [line for line in block.splitlines() if f"create secret generic {secret}" in line]
    (namespace,) = [o for o in prod() if o["kind"] == "Namespace"]
    words = shlex.split(create)
    assert words[:3] == ["kubectl", "-n", namespace["metadata"]["name"]]
    # an entry named as the service reads the directory's files
    assert any(w.startswith(f"--from-file={made.key}=") for w in words)
    assert made.setting in section_with(f"create secret generic {secret}")


@pytest.mark.parametrize("secret", ENCRYPTION_KEYS)
def test_an_encryption_key_is_backed_up_and_losing_it_explained(secret: str) -> None:
    text = section_with(create_command(secret))
    assert "**Back it up**" in text and "unreadable" in text


@pytest.mark.parametrize("secret", ENCRYPTION_KEYS)
def test_the_documented_key_is_one_the_service_accepts(secret: str, tmp_path: Path) -> None:
    load = KEY_LOADERS[secret]
    block = shell_block_with(f"create secret generic {secret}")
    # run the documented steps that make the key file (everything but kubectl) in a scratch dir
    steps = [line for line in block.splitlines() if line and not line.startswith("kubectl")]
    done = subprocess.run(
        ["sh", "-euc", "\n".join(steps)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.split() == ["32"], "the documented check prints the key's length"
    (create,) = [line for line in block.splitlines() if secret in line]
    (source,) = [w for w in shlex.split(create) if w.startswith("--from-file=")]
    path = tmp_path / source.split("=", 2)[2]
    assert path.stat().st_mode & 0o077 == 0, "the file is made private (umask 077)"
    key = load(path)
    assert len(key) == 32
    # and two runs make two different keys: nothing is fixed in the documentation
    subprocess.run(
        ["sh", "-euc", "\n".join(steps)], cwd=tmp_path, check=True, timeout=30, capture_output=True
    )
    assert load(path) != key


def test_the_documented_smtp_overlay_patch_applies_and_is_read_by_notify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.notify.settings import NotifySettings

    # the documented patches, in an overlay of prod built by the real kustomize
    (patches,) = [o for o in documented() if "patches" in o]
    prod_dir = ROOT / "deploy" / "k8s" / "overlays" / "prod"
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(prod_dir, tmp_path)],  # kustomize wants a relative path
        **patches,
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))

    def notify_config(objects: list[Resource]) -> dict[str, str]:
        (found,) = [
            o["data"]
            for o in objects
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "bianzhi-notify-config"
        ]
        return found

    base, patched = notify_config(prod()), notify_config(kubectl_build(tmp_path))
    assert set(patched) == set(base), "the patch replaces settings, it adds none"
    changed = {k for k, v in patched.items() if base[k] != v}
    assert {"BIANZHI_NOTIFY_SMTP_HOST", "BIANZHI_NOTIFY_MAIL_FROM"} <= changed
    for name, value in patched.items():
        monkeypatch.setenv(name, value)
    settings = NotifySettings()
    assert (settings.smtp_port, settings.smtp_security) in ((587, "starttls"), (465, "tls"))
    assert settings.smtp_host != base["BIANZHI_NOTIFY_SMTP_HOST"]
    assert settings.mail_from != base["BIANZHI_NOTIFY_MAIL_FROM"]


def test_the_email_section_names_every_smtp_setting_of_the_configmap() -> None:
    from services.notify.settings import NotifySettings

    data = yaml.safe_load((ROOT / "deploy/k8s/base/notify/configmap.yaml").read_text())["data"]
    smtp = {n for n in data if n.startswith(("BIANZHI_NOTIFY_SMTP_", "BIANZHI_NOTIFY_MAIL_"))}
    # every e-mail setting notify has, the password as a file only
    fields = {f"BIANZHI_NOTIFY_{f}".upper() for f in NotifySettings.model_fields}
    expected = {n for n in fields if n.startswith(("BIANZHI_NOTIFY_SMTP_", "BIANZHI_NOTIFY_MAIL_"))}
    assert smtp == expected - {"BIANZHI_NOTIFY_SMTP_PASSWORD"}
    section = DOC.read_text().split("## E-mail (notify)", 1)[1].split("\n## ", 1)[0]
    for name in smtp:
        assert f"`{name}`" in section and f"`{data[name]}`" in section, name


# --- the keys of signed commands and the audit chain ------------------------------------------


@pytest.mark.parametrize("configmap", sorted(HAND_MADE_CONFIGMAPS))
def test_a_hand_made_config_map_is_created_as_documented(configmap: str) -> None:
    block = shell_block_with(f"create configmap {configmap}")
    (create,) = [line for line in block.splitlines() if f"create configmap {configmap}" in line]
    (namespace,) = [o for o in prod() if o["kind"] == "Namespace"]
    words = shlex.split(create)
    assert words[:3] == ["kubectl", "-n", namespace["metadata"]["name"]]
    assert HAND_MADE_CONFIGMAPS[configmap] in section_with(create)


def run_documented(block: str, cwd: Path, created: Path) -> None:
    """Run a documented block in ``cwd``: ``bianzhi keys create`` through the CLI's own entry
    point (in this process: one interpreter, not one per key), everything else with ``sh``,
    ``kubectl create`` as a client-side dry run that appends the objects to ``created``."""
    shim = (
        f'kubectl() {{ "{kubectl()}" "$@" --dry-run=client -o yaml >> "{created}"; '
        f'echo --- >> "{created}"; }}\n'
    )
    pending: list[str] = []

    def flush() -> None:
        if pending:
            script = shim + "\n".join(pending)
            subprocess.run(
                ["sh", "-euc", script], cwd=cwd, check=True, timeout=120, capture_output=True
            )
            pending.clear()

    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["bianzhi"]:
            flush()
            assert bianzhi(words[1:]) == 0, line
        else:
            pending.append(line)
    flush()


def test_the_documented_keys_fit_the_manifests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 5's commands, run as written (kubectl as a dry run): the Secrets hold keys the
    services load, under the kids their ConfigMaps name; the public key ConfigMap holds exactly
    the keys commands may come from (a front-end's, the saga senders', the operator's), public
    keys only; and the first command of step 9, signed with the operator key, passes a
    service's verifier built from that ConfigMap."""
    objects = prod()
    (namespace,) = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    configs = {
        o["metadata"]["labels"]["app.kubernetes.io/name"]: o["data"]
        for o in objects
        if o["kind"] == "ConfigMap"
    }
    monkeypatch.chdir(tmp_path)
    # a front-end made its key elsewhere and sent its public key
    assert bianzhi(["keys", "create", "--kid", "hebei-portal-1", "--dir", "portal"]) == 0
    (tmp_path / "frontends").mkdir()
    (tmp_path / "portal" / "hebei-portal-1.pub.json").rename(
        tmp_path / "frontends" / "hebei-portal-1.pub.json"
    )
    created = tmp_path / "created.yaml"
    block = shell_block_with("create configmap bianzhi-signing-public-keys")
    run_documented(block, tmp_path, created)
    made = [o for o in yaml.safe_load_all(created.read_text()) if o]
    assert {o["metadata"]["namespace"] for o in made} == {namespace}

    # every hand-made signing Secret, holding the private key of the kid its service names
    secrets = {o["metadata"]["name"]: o for o in made if o["kind"] == "Secret"}
    signing = {name: h for name, h in HAND_MADE_SECRETS.items() if h.kind == "signing"}
    assert set(secrets) == set(signing)
    kid_setting = {
        "BIANZHI_AUDIT_SIGNING_PRIVATE_KEY": "BIANZHI_AUDIT_SIGNING_KID",
        "BIANZHI_SIGNING_PRIVATE_KEY": "BIANZHI_SIGNING_KID",
    }
    made_keys = {}
    for name, h in signing.items():
        assert set(secrets[name]["data"]) == {h.key}
        pem = tmp_path / f"{name}.pem"
        pem.write_bytes(base64.b64decode(secrets[name]["data"][h.key]))
        kid = configs[h.service][kid_setting[h.setting]]
        (private_file,) = tmp_path.rglob(f"{kid}.key.pem")  # made under that kid
        public_file = private_file.with_name(f"{kid}.pub.json")
        public = raw_public_key(load_public_keys(public_file)[kid])
        assert raw_public_key(load_private_key(pem).public_key()) == public, name
        made_keys[kid] = public

    # the public keys commands are accepted from, as the services load the mounted directory
    (configmap,) = [o for o in made if o["kind"] == "ConfigMap"]
    assert configmap["metadata"]["name"] in HAND_MADE_CONFIGMAPS
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for file, text in configmap["data"].items():
        assert "PRIVATE KEY" not in text, file
        (mounted / file).write_text(text)
    keys = load_public_keys(mounted)
    senders = {s for s in SERVICES if "BIANZHI_SIGNING_KID" in configs.get(s, {})}
    assert senders == {"orgs", "roster"} & set(configs)
    sender_kids = {configs[s]["BIANZHI_SIGNING_KID"] for s in senders}
    assert set(keys) == {"hebei-portal-1", operator_kid()} | sender_kids
    for kid in sender_kids:
        assert raw_public_key(keys[kid]) == made_keys[kid]
    # the saga keys may sign only quota's commands; the others any command
    assert load_key_scopes(mounted) == {kid: ("bianzhi.quota.*",) for kid in sender_kids}
    audit_kids = {c["BIANZHI_AUDIT_SIGNING_KID"] for c in configs.values()}
    assert len(audit_kids) == len(configs) and not audit_kids & set(keys)

    # the first command, signed as step 9's pod signs it, passes the verifier of a service
    operator_key = load_private_key(tmp_path / "operator" / f"{operator_kid()}.key.pem")
    (container,) = one("Pod")["spec"]["containers"]
    args = build_parser().parse_args(container["args"][1:])
    envelope = build_envelope(
        resolve_command_type(args.type),
        load_data(args.data),
        command_id="doc",
        source=args.source,
        actor=args.actor,
        region=args.region,
        roles=args.roles,
    )
    verifier = CommandVerifier(keys, max_ttl=900, leeway=60)
    assert verifier.verify(envelope) is not None, "unsigned: refused"
    assert verifier.verify(sign_envelope(envelope, operator_key, operator_kid(), 300)) is None


def test_every_outside_party_is_listed_where_outside_parties_are() -> None:
    outside = [generate.user_name(p) for p in generate.ACCESS if p not in SERVICES]
    assert generate.user_name("finance-payroll") in outside
    for anchor in ("The outside parties, each with its own KafkaUser", "**Outside parties**"):
        text = section_with(anchor)
        for user in outside:
            assert f"`{user}`" in text, (anchor, user)
