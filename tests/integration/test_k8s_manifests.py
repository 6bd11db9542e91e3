"""deploy/k8s: each overlay, rendered by kustomize, checked against the official schemas and
against what the worker really serves and reads.

Kubernetes objects: the kubernetes-validate package's strict schemas for KUBERNETES (unknown
fields refused). KEDA's ScaledObject and TriggerAuthentication, prometheus-operator's PodMonitor:
the openAPIV3Schema of their CRDs, made strict the same way. scripts/setup builds kustomize and
fetches the CRDs into .tools/; without them these tests fail, never skip.
"""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fmnist import config
from fmnist.brokers.kafka.settings import CLOSE_TIMEOUT_S

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TOOLS = ROOT / ".tools"
KUBERNETES = "1.32"  # the Kubernetes the manifests target (preStop's sleep action: 1.30 and later)
OVERLAYS = ["kafka", "pubsub"]
CRDS = {("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
        ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
        ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml"}
# The slowest drain the worker allows itself after SIGTERM: the broker's confirmation of the
# last answers (fmnist/serving/pipeline.py waits up to 30 s), then closing its clients.
CONFIRM_TIMEOUT_S = 30.0
DRAIN_MAX_S = CONFIRM_TIMEOUT_S + CLOSE_TIMEOUT_S


def render(path: Path) -> list[dict[str, Any]]:
    kustomize = TOOLS / "bin" / "kustomize"
    if not kustomize.exists():
        pytest.fail(f"{kustomize} is missing: run scripts/setup (it builds kustomize with Go)")
    out = subprocess.run([str(kustomize), "build", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as kubeconform's strict mode does: every object
    with listed properties and no say of its own about others allows no others."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    path = TOOLS / "crds" / CRDS[(api_version, kind)]
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup (it fetches the CRDs with Go)")
    crd = yaml.safe_load(path.read_text())
    version = api_version.split("/")[1]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = _strict(entry["schema"]["openAPIV3Schema"])
    return schema


def validate(obj: dict[str, Any]) -> None:
    """Raise if OBJ does not match its official schema (unknown fields included)."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRDS:
        jsonschema.Draft7Validator(crd_schema(*key)).validate(obj)
        name = obj["metadata"]["name"]
        assert isinstance(name, str) and name, obj["metadata"]
    else:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


class Rendered:
    def __init__(self, overlay: str) -> None:
        self.objects = render(K8S / "overlays" / overlay)

    def one(self, kind: str) -> dict[str, Any]:
        (obj,) = [o for o in self.objects if o["kind"] == kind]
        return obj

    def named(self, kind: str, name: str) -> dict[str, Any]:
        (obj,) = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        return obj

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def worker(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container

    def env(self) -> dict[str, str]:
        """The worker's environment: its ConfigMaps, then its own entries (a Secret's value
        stands in as a placeholder of the right kind)."""
        env: dict[str, str] = {}
        for source in self.worker.get("envFrom", []):
            env.update(self.named("ConfigMap", source["configMapRef"]["name"])["data"])
        for entry in self.worker.get("env", []):
            env[entry["name"]] = entry.get("value", "from-a-secret")
        return env

    def cfg(self) -> config.Config:
        """The config the worker would run with (an unknown FMNIST_ key or a bad value fails)."""
        return config.load(env={k: v for k, v in self.env().items() if k.startswith("FMNIST_")},
                           use_default_file=True)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(request.param)


def test_every_object_matches_its_official_schema(rendered: Rendered) -> None:
    kinds = {o["kind"] for o in rendered.objects}
    assert {"Deployment", "ConfigMap", "PodDisruptionBudget", "PodMonitor", "ScaledObject",
            "TriggerAuthentication"} <= kinds
    for obj in rendered.objects:
        validate(obj)


@pytest.mark.parametrize("where, field", [
    (("spec", "template", "spec", "containers", 0), "readinessProbes"),   # a typo
    (("spec",), "maxReplicas"),                                            # HPA's name, not KEDA's
    (("spec", "podMetricsEndpoints", 0), "metricsPath"),
])
def test_the_validation_refuses_unknown_fields(rendered: Rendered, where: tuple[Any, ...],
                                               field: str) -> None:
    kind = {"readinessProbes": "Deployment", "maxReplicas": "ScaledObject",
            "metricsPath": "PodMonitor"}[field]
    broken = copy.deepcopy(rendered.one(kind))
    node: Any = broken
    for step in where:
        node = node[step]
    node[field] = "x"
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(broken)


def test_the_worker_config_loads_and_names_real_settings(rendered: Rendered) -> None:
    env = rendered.env()
    cfg = rendered.cfg()
    known = {config.env_name(f"{section}.{key}")
             for section, keys in config.as_dict(cfg).items() for key in keys}
    assert {k for k in env if k.startswith("FMNIST_")} <= known
    assert rendered.worker["command"][:2] == ["fmnist", "serve"]
    assert "--quiet" in rendered.worker["command"]


def test_probes_point_at_what_the_worker_serves(rendered: Rendered) -> None:
    cfg = rendered.cfg()
    ports = {p["name"]: p["containerPort"] for p in rendered.worker["ports"]}
    assert cfg.serve.metrics_port > 0 and cfg.serve.metrics_host == "0.0.0.0"
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = rendered.worker[probe]["httpGet"]
        assert ports.get(get["port"], get["port"]) == cfg.serve.metrics_port, probe
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                     "readinessProbe": "/readyz"}
    # /healthz itself turns 503 only after 30 s without a poll: liveness must not be quicker
    live = rendered.worker["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30


def test_grace_period_covers_the_pre_stop_and_the_drain(rendered: Rendered) -> None:
    pre_stop = rendered.worker["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert rendered.pod["terminationGracePeriodSeconds"] > pre_stop + DRAIN_MAX_S


def test_runs_as_non_root_on_a_read_only_root(rendered: Rendered) -> None:
    pod, ctx = rendered.pod["securityContext"], rendered.worker["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    # everything the worker writes is on a volume
    cfg, env = rendered.cfg(), rendered.env()
    mounts = [Path(m["mountPath"]) for m in rendered.worker["volumeMounts"]]
    writes = [Path(cfg.serve.compile_cache), cfg.model.weights_dir / "registry", Path(env["HOME"]),
              Path(cfg.serve.journal_dir)]
    if cfg.serve.broker == "pubsub":
        writes.append(cfg.registry.dir)
    for path in writes:
        assert any(path.is_relative_to(m) for m in mounts), f"{path} is not on a volume"


def test_monitoring_and_disruption_budget_select_the_workers(rendered: Rendered) -> None:
    labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodMonitor", "PodDisruptionBudget"):
        selector = rendered.one(kind)["spec"]["selector"]["matchLabels"]
        assert selector and selector.items() <= labels.items(), kind
    (endpoint,) = rendered.one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in rendered.worker["ports"]}
    assert endpoint["path"] == "/metrics"


def test_secrets_reach_the_worker_as_its_sasl_settings() -> None:
    r = Rendered("kafka")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in r.worker["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(refs) == {config.env_name("kafka.sasl_username"),
                         config.env_name("kafka.sasl_password")}
    for ref in refs.values():
        assert ref["key"] in r.named("Secret", ref["name"])["stringData"]
    cfg = r.cfg()
    assert cfg.kafka.security_protocol == "SASL_SSL" and cfg.kafka.sasl_mechanism
    # KEDA logs in with the same Secret
    auth = r.one("TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {a["parameter"] for a in auth} == {"username", "password"}
    for a in auth:
        assert a["key"] in r.named("Secret", a["name"])["stringData"]


def scaler(r: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = r.one("ScaledObject")["spec"]
    target = spec["scaleTargetRef"]
    assert target["name"] == r.one("Deployment")["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    (trigger,) = spec["triggers"]
    assert trigger["authenticationRef"]["name"] == r.one("TriggerAuthentication")["metadata"]["name"]
    return spec, trigger


def test_kafka_scales_on_the_request_groups_lag_up_to_the_partitions() -> None:
    r = Rendered("kafka")
    spec, trigger = scaler(r)
    defaults, cfg = config.load(env={}), r.cfg()
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["topic"] == defaults.broker.request_topic == cfg.broker.request_topic
    assert meta["consumerGroup"] == defaults.kafka.group_id == cfg.kafka.group_id
    assert meta["bootstrapServers"] == cfg.kafka.bootstrap_servers
    assert meta.get("allowIdleConsumers", "false") == "false"
    keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    assert meta["sasl"] == keda_sasl[cfg.kafka.sasl_mechanism]
    assert meta["tls"] == ("enable" if cfg.kafka.security_protocol.endswith("SSL") else "disable")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= defaults.kafka.partitions


def test_pubsub_scales_on_the_request_subscriptions_backlog() -> None:
    r = Rendered("pubsub")
    spec, trigger = scaler(r)
    cfg = r.cfg()
    assert trigger["type"] == "gcp-pubsub"
    name = trigger["metadata"]["subscriptionName"]
    assert name.split("/")[-1] == config.load(env={}).pubsub.request_subscription \
        == cfg.pubsub.request_subscription
    assert r.one("TriggerAuthentication")["spec"]["podIdentity"]["provider"] == "gcp"
    assert cfg.pubsub.emulator_host == "" and cfg.registry.store == "dir"
    # the registry directory is one ReadWriteMany volume that every worker mounts
    (mount,) = [m for m in r.worker["volumeMounts"] if Path(m["mountPath"]) == cfg.registry.dir]
    (volume,) = [v for v in r.pod["volumes"] if v["name"] == mount["name"]]
    claim = r.named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert r.pod["serviceAccountName"] == r.one("ServiceAccount")["metadata"]["name"]
