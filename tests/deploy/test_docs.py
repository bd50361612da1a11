"""docs/deploy.md stays true: its example manifests match what the overlays expect, the one-off
Pod is a valid Kubernetes object admitted by the restricted namespace, and its command parses."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.cli.common import resolve_command_type
from services.cli.main import build_parser
from services.cli.send import build_envelope, load_data
from tests.deploy.render import Resource, kubectl_build
from tests.deploy.test_manifests import HAND_MADE_SECRETS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deploy.md"

sys.path.insert(0, str(ROOT / "deploy"))
generate = importlib.import_module("generate")


def documented() -> list[Resource]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def one(kind: str) -> Resource:
    (found,) = [o for o in documented() if o["kind"] == kind]
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
    assert secrets == {writer, f"{generate.KAFKA_CLUSTER}-cluster-ca-cert"}


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


def shell_block_with(text: str) -> str:
    """The one ```sh block of docs/deploy.md that contains ``text``, continuation lines joined."""
    blocks = re.findall(r"^```sh\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)
    (block,) = [b for b in blocks if text in b]
    return block.replace("\\\n", " ")


@pytest.mark.parametrize("secret", sorted(HAND_MADE_SECRETS))
def test_a_hand_made_secret_is_created_and_backed_up_as_documented(secret: str) -> None:
    _, key, _ = HAND_MADE_SECRETS[secret]
    block = shell_block_with(f"create secret generic {secret}")
    (create,) = [line for line in block.splitlines() if f"create secret generic {secret}" in line]
    (namespace,) = [o for o in prod() if o["kind"] == "Namespace"]
    words = shlex.split(create)
    assert words[:3] == ["kubectl", "-n", namespace["metadata"]["name"]]
    assert any(w.startswith(f"--from-file={key}=") for w in words), "the key the pod mounts"
    text = " ".join(DOC.read_text().split())
    assert "**Back it up**" in text and "unreadable" in text


def test_the_documented_personal_data_key_is_one_the_roster_accepts(tmp_path: Path) -> None:
    from services.roster.domain.personal_data import load_master_key

    secret = "bianzhi-roster-personal-data-key"
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
    key = load_master_key(value=None, path=path, generate_at=None)
    assert len(key) == 32
    # and two runs make two different keys: nothing is fixed in the documentation
    subprocess.run(
        ["sh", "-euc", "\n".join(steps)], cwd=tmp_path, check=True, timeout=30, capture_output=True
    )
    assert load_master_key(value=None, path=path, generate_at=None) != key
