"""The Helm chart, as CI checks it: `helm lint --strict` and `helm template`
for every helm/llm-sidecar/ci/*-values.yaml scenario, every rendered object
validated against the pinned Kubernetes version's schemas (strict), then
assertions on what the chart promises: probes on the app's endpoints, ports,
the native sidecar shape, the grace period arithmetic, secrets kept out of
ConfigMaps, a schema that rejects typos, and named templates another chart
can include.

helm comes from PATH (`make test` puts .tools/bin there, built by
scripts/ensure-helm.sh); each scenario is rendered once per session.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.policy import Policy, Retry, Route, Target, Upstream, parse_policy

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "llm-sidecar"
# Validated against this Kubernetes version: the newest one every
# kubernetes-validate the project allows (>=1.30) ships schemas for, and past
# 1.29, where native sidecars (initContainers with restartPolicy: Always) are on.
KUBE_VERSION = "1.30.0"
RELEASE = "ci"
NAMESPACE = "llm"
PROXY = "llm-sidecar"  # the proxy container's name
EXPECTED_SCENARIOS = {
    "admin",
    "fallbacks",
    "standalone",
    "sidecar-native",
    "sidecar-plain",
    "redis-secret",
    "servicemonitor",
    "cross-replica",
}
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in CHART.glob("ci/*-values.yaml"))

Obj = dict[str, Any]


@dataclass(frozen=True)
class Helm:
    binary: str
    env: dict[str, str]

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def _template(
        self, args: tuple[str | Path, ...], chart: Path, kube_version: str
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "template",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--kube-version",
            kube_version,
            *args,
        )

    def template(
        self, *args: str | Path, chart: Path = CHART, kube_version: str = KUBE_VERSION
    ) -> list[Obj]:
        result = self._template(args, chart, kube_version)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def template_error(self, *args: str, kube_version: str = KUBE_VERSION) -> str:
        """stderr of a render that must fail."""
        result = self._template(args, CHART, kube_version)
        assert result.returncode != 0, "the render should have been refused"
        stderr: str = result.stderr
        return stderr


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    binary = shutil.which("helm")
    if binary is None:
        pytest.fail(
            "helm is not on PATH. `make test` builds it into .tools/bin "
            "(scripts/ensure-helm.sh v3.22.0 .tools), or run: "
            "scripts/ensure-helm.sh v3.22.0 $PWD/.tools && PATH=$PWD/.tools/bin:$PATH pytest"
        )
    version = subprocess.run(
        [binary, "version", "--template", "{{.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    if not version.startswith("v3."):
        pytest.fail(f"{binary} is helm {version!r}; the chart checks need helm v3 (v3.22.0)")
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        # Keep helm away from the user's repositories, plugins and kubeconfig.
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "kubeconfig"),
    }
    return Helm(binary, env)


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, list[Obj]]:
    return {s: helm.template("-f", CHART / "ci" / f"{s}-values.yaml") for s in SCENARIOS}


# ---- helpers ---------------------------------------------------------------


def find(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Obj], kind: str) -> Obj:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_specs(docs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(pod template, pod spec) of every workload."""
    for deployment in find(docs, "Deployment"):
        template = deployment["spec"]["template"]
        yield template, template["spec"]


def all_containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def proxy_of(spec: Obj) -> Obj:
    found = [c for c in all_containers(spec) if c["name"] == PROXY]
    assert len(found) == 1, "one proxy container per pod"
    return found[0]


def option(args: list[str], name: str) -> str:
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name]
    assert values, f"{name} missing from {args}"
    return values[-1]


def policy_text(docs: list[Obj]) -> str:
    text: str = one(docs, "ConfigMap")["data"]["policy.yaml"]
    return text


def policy_of(docs: list[Obj]) -> Policy:
    return parse_policy(policy_text(docs), "ConfigMap policy.yaml").policy


def port_number(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert numbers, f"port {port!r} is not a named port of {container['name']}"
    number: int = numbers[0]
    return number


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def scenario_values(scenario: str) -> Obj:
    values: Obj = yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text())
    return values


# ---- lint and Kubernetes schemas -------------------------------------------


def test_every_ci_scenario_is_present() -> None:
    assert set(SCENARIOS) == EXPECTED_SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(helm: Helm, scenario: str) -> None:
    result = helm.run(
        "lint",
        "--strict",
        CHART,
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        "-f",
        CHART / "ci" / f"{scenario}-values.yaml",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Lint renders with `fail` turned into a log line: treat it as an error here.
    for marker in ("[WARNING]", "[ERROR]", "Fail:"):
        assert marker not in output, output


def check_service_monitor(monitor: Obj, docs: list[Obj]) -> None:
    """A CRD, so no schema ships with kubernetes-validate: check its shape and
    that it really selects this release's Service port."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["namespace"] == NAMESPACE
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    services = [
        s
        for s in find(docs, "Service")
        if matches(spec["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert len(services) == 1, "the ServiceMonitor selects exactly the proxy's Service"
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    assert spec["endpoints"], "at least one endpoint"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[key])


def test_pinned_kubernetes_version_is_shipped() -> None:
    # validate() silently falls back to an older schema; refuse that.
    assert KUBE_VERSION in kubernetes_validate.utils.all_versions()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_objects_validate_against_kubernetes(rendered: dict[str, list[Obj]], scenario: str) -> None:
    docs = rendered[scenario]
    assert docs
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc, docs)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(exc.message)


def test_kinds_per_scenario(rendered: dict[str, list[Obj]]) -> None:
    kinds = {s: sorted(d["kind"] for d in docs) for s, docs in rendered.items()}
    assert kinds == {
        "admin": ["ConfigMap", "Deployment", "Service", "ServiceMonitor"],
        "fallbacks": ["ConfigMap", "Deployment", "Service"],
        "standalone": sorted(
            ["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
        ),
        "sidecar-native": ["ConfigMap", "Deployment", "Secret"],
        "sidecar-plain": ["ConfigMap", "Deployment"],
        "redis-secret": ["ConfigMap", "Deployment", "Secret", "Service"],
        "servicemonitor": ["ConfigMap", "Deployment", "Service", "ServiceMonitor"],
        "cross-replica": ["ConfigMap", "Deployment", "Secret"],
    }


def test_a_typo_is_rejected_by_the_schema(helm: Helm) -> None:
    for typo, key in [("standalone.replica=3", "replica"), ("sidecar.nativ=false", "nativ")]:
        stderr = helm.template_error("--set", typo)
        assert "don't meet the specifications of the schema" in stderr
        assert re.search(rf"additional propert(y|ies) '?{key}'? (is )?not allowed", stderr, re.I)


def test_a_password_in_the_redis_url_is_rejected(helm: Helm) -> None:
    stderr = helm.template_error(
        "--set",
        "cache.backend=redis",
        "--set",
        "cache.redis.url=redis://:hunter2@redis:6379/0",
    )
    # In words: what form is expected and where the password goes, not a regex;
    # and the password itself is not echoed back.
    assert "cache.redis.url: no password in the URL" in stderr
    assert "cache.redis.password.existingSecret" in stderr
    assert "hunter2" not in stderr and "pattern" not in stderr


def test_a_redis_url_of_another_scheme_is_explained(helm: Helm) -> None:
    stderr = helm.template_error(
        "--set", "cache.backend=redis", "--set", "cache.redis.url=http://redis:6379"
    )
    assert "cache.redis.url: expected redis://host:6379/0" in stderr


# ---- the app's contract: policy, ports, probes -----------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_policy_is_accepted_by_the_app_with_the_pods_env(
    rendered: dict[str, list[Obj]], scenario: str, tmp_path: Path
) -> None:
    """`llm-sidecar check` accepts the rendered policy given exactly the
    environment variable names the proxy container defines (the policy's
    api_key_env/password_env must be among them)."""
    docs = rendered[scenario]
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy_text(docs))
    for _, spec in pod_specs(docs):
        # PYTHONPATH too, so a worktree's proxy/ is the one checked, not the venv's install.
        env = {k: os.environ[k] for k in ("PATH", "PYTHONPATH") if k in os.environ}
        env.update({e["name"]: "placeholder" for e in proxy_of(spec).get("env", [])})
        cli = Path(sys.executable).with_name("llm-sidecar")
        result = subprocess.run(
            [str(cli), "check", str(policy_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    policy = policy_of(docs)
    assert policy.listen.host == "0.0.0.0", "in a container the proxy must listen on all addresses"
    assert policy.reload.watch, "ConfigMap edits reach the pod; the proxy must pick them up"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_ports_and_policy_mount(rendered: dict[str, list[Obj]], scenario: str) -> None:
    docs = rendered[scenario]
    policy = policy_of(docs)
    configmap = one(docs, "ConfigMap")
    specs = list(pod_specs(docs))
    assert specs
    for _, spec in specs:
        proxy = proxy_of(spec)
        assert proxy["command"] == ["llm-sidecar", "serve"]
        args = proxy["args"]
        assert option(args, "--host") == "0.0.0.0"
        port = int(option(args, "--port"))
        assert port == policy.listen.port == 8080
        # With an admin listener the probes go there: the API port answers them 404.
        admin = policy.admin
        probed = port if admin is None else admin.port
        ports = [port] if admin is None else [port, admin.port]
        assert [p["containerPort"] for p in proxy["ports"]] == ports
        assert admin is None or admin.host == "0.0.0.0", "the kubelet probes from outside the pod"
        probes = {
            "startupProbe": "/readyz",
            "readinessProbe": "/readyz",
            "livenessProbe": "/healthz",
        }
        for probe, path in probes.items():
            get = proxy[probe]["httpGet"]
            assert get["path"] == path, probe
            assert port_number(proxy, get["port"]) == probed, probe
        # The policy file lives in a directory mount of the ConfigMap, not a
        # subPath (a subPath mount never sees ConfigMap updates).
        policy_path = Path(option(args, "--policy"))
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = [m for m in proxy["volumeMounts"] if m["mountPath"] == str(policy_path.parent)]
        assert len(mounts) == 1
        assert "subPath" not in mounts[0] and "subPathExpr" not in mounts[0]
        assert volumes[mounts[0]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
        assert policy_path.name in configmap["data"]
        # A read-only root filesystem needs a writable /tmp.
        tmp = [m for m in proxy["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]]
        assert proxy["resources"]["requests"]["cpu"] and proxy["resources"]["requests"]["memory"]
        assert proxy["resources"]["limits"]["memory"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_grace_period_outlasts_prestop_and_drain(
    rendered: dict[str, list[Obj]], scenario: str
) -> None:
    docs = rendered[scenario]
    shutdown = policy_of(docs).shutdown
    for _, spec in pod_specs(docs):
        command = proxy_of(spec)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2
        sleep = float(command[1])
        assert sleep > 0, "endpoints need a moment to drop the pod before SIGTERM"
        needed = sleep + shutdown.accept_delay + shutdown.drain_timeout
        assert spec["terminationGracePeriodSeconds"] > needed


def test_explicit_grace_period_too_short_is_refused(helm: Helm) -> None:
    # default: preStop 5 + accept 1 + drain 30 = 36; 36 leaves no time to exit
    stderr = helm.template_error("--set", "shutdown.terminationGracePeriodSeconds=36")
    assert "terminationGracePeriodSeconds (36) must exceed" in stderr
    docs = helm.template("--set", "shutdown.terminationGracePeriodSeconds=37")
    assert [spec["terminationGracePeriodSeconds"] for _, spec in pod_specs(docs)] == [37]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_containers_are_locked_down(rendered: dict[str, list[Obj]], scenario: str) -> None:
    for _, spec in pod_specs(rendered[scenario]):
        assert spec["automountServiceAccountToken"] is False
        for container in all_containers(spec):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, container["name"]
            assert ctx["allowPrivilegeEscalation"] is False, container["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
            assert ctx.get("runAsNonRoot", spec["securityContext"].get("runAsNonRoot")) is True
            assert "privileged" not in ctx or ctx["privileged"] is False


# ---- modes -----------------------------------------------------------------


def test_native_sidecar_shape(rendered: dict[str, list[Obj]]) -> None:
    docs = rendered["sidecar-native"]
    assert not find(docs, "Service"), "a sidecar is reached on 127.0.0.1, not through a Service"
    [(_, spec)] = pod_specs(docs)
    [sidecar] = spec["initContainers"]
    assert sidecar["name"] == PROXY
    assert sidecar["restartPolicy"] == "Always"
    assert "startupProbe" in sidecar, "the app starts only once the proxy is ready"
    assert [c["name"] for c in spec["containers"]] == ["app"]
    app_env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    port = sidecar["ports"][0]["containerPort"]
    assert app_env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{port}/v1"


def test_plain_sidecar_shape(rendered: dict[str, list[Obj]]) -> None:
    docs = rendered["sidecar-plain"]
    [(_, spec)] = pod_specs(docs)
    assert "initContainers" not in spec
    assert sorted(c["name"] for c in spec["containers"]) == ["app", PROXY]
    assert "restartPolicy" not in proxy_of(spec)


def test_native_sidecar_needs_kubernetes_1_29(helm: Helm) -> None:
    stderr = helm.template_error(
        "--set", "mode=sidecar", "--set", "sidecar.demo.enabled=true", kube_version="1.28.0"
    )
    assert "sidecar.native needs Kubernetes >= 1.29" in stderr
    docs = helm.template("-f", CHART / "ci" / "sidecar-plain-values.yaml", kube_version="1.28.0")
    assert find(docs, "Deployment")


def test_standalone_service_hpa_and_pdb_select_the_pods(rendered: dict[str, list[Obj]]) -> None:
    docs = rendered["standalone"]
    deployment = one(docs, "Deployment")
    name = deployment["metadata"]["name"]
    [(template, spec)] = pod_specs(docs)
    labels = template["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    service = one(docs, "Service")
    assert matches(service["spec"]["selector"], labels)
    [service_port] = service["spec"]["ports"]
    proxy = proxy_of(spec)
    assert port_number(proxy, service_port["targetPort"]) == proxy["ports"][0]["containerPort"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = one(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"] == {**pdb["spec"], "minAvailable": 1} and "maxUnavailable" not in pdb["spec"]
    # A rollout never takes a ready pod away before its replacement is ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_monitor_only_when_enabled(rendered: dict[str, list[Obj]]) -> None:
    for scenario, docs in rendered.items():
        assert bool(find(docs, "ServiceMonitor")) == (scenario in ("servicemonitor", "admin"))
    monitor = one(rendered["servicemonitor"], "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_admin_listener_takes_metrics_and_probes(
    helm: Helm, rendered: dict[str, list[Obj]]
) -> None:
    docs = rendered["admin"]
    policy = policy_of(docs)
    assert policy.admin is not None and policy.admin.port == 9090
    [endpoint] = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert endpoint["port"] == "admin" and ports["admin"]["port"] == 9090
    [(_, spec)] = pod_specs(docs)
    assert port_number(proxy_of(spec), ports["admin"]["targetPort"]) == 9090
    # Without a ServiceMonitor the admin port stays off the Service.
    plain = helm.template("--set", "admin.enabled=true")
    assert [p["name"] for p in one(plain, "Service")["spec"]["ports"]] == ["http"]
    stderr = helm.template_error("--set", "admin.enabled=true", "--set", "admin.port=8080")
    assert "admin.port must differ from port" in stderr


# ---- secrets ---------------------------------------------------------------


def secret_values(node: Any, parent: str = "") -> Iterator[str]:
    """Every `value` under an apiKey or password block of a values file."""
    if isinstance(node, dict):
        for key, child in node.items():
            if key == "value" and parent in ("apiKey", "password") and child:
                yield str(child)
            else:
                yield from secret_values(child, key)


def test_secret_values_stay_out_of_configmaps_and_pod_specs(
    rendered: dict[str, list[Obj]],
) -> None:
    checked = 0
    for scenario, docs in rendered.items():
        secrets = list(secret_values(scenario_values(scenario)))
        stored = {
            base64.b64decode(v).decode()
            for secret in find(docs, "Secret")
            for v in secret["data"].values()
        }
        assert stored == set(secrets), "the chart stores exactly the secrets given as values"
        public = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
        for secret in secrets:
            checked += 1
            assert secret not in public
            assert base64.b64encode(secret.encode()).decode() not in public
        # The proxy reads them from the Secret by reference.
        for _, spec in pod_specs(docs):
            for env in proxy_of(spec).get("env", []):
                assert "value" not in env or env["value"] not in secrets
    assert checked >= 3, "the CI scenarios must exercise secrets given as values"


def test_keys_come_from_secret_references(rendered: dict[str, list[Obj]]) -> None:
    standalone = rendered["standalone"]
    policy = policy_of(standalone)
    [(_, spec)] = pod_specs(standalone)
    env = {e["name"]: e for e in proxy_of(spec)["env"]}
    key_env = policy.upstreams["openai"].api_key_env
    assert key_env is not None
    assert env[key_env]["valueFrom"]["secretKeyRef"] == {
        "name": "openai-credentials",
        "key": "api-key",
    }
    redis = rendered["redis-secret"]
    policy = policy_of(redis)
    assert policy.cache.backend == "redis"
    assert policy.cache.url == "redis://redis-master.cache.svc.cluster.local:6379/0"
    assert policy.cache.password_env is not None
    [(_, spec)] = pod_specs(redis)
    env = {e["name"]: e for e in proxy_of(spec)["env"]}
    secret_name = one(redis, "Secret")["metadata"]["name"]
    assert env[policy.cache.password_env]["valueFrom"]["secretKeyRef"]["name"] == secret_name
    # Without a key configured the policy lets callers send their own.
    assert policy_of(rendered["sidecar-plain"]).upstreams["openai"].api_key_env is None


def test_checksum_annotations(helm: Helm, rendered: dict[str, list[Obj]]) -> None:
    def annotations(docs: list[Obj]) -> dict[str, str]:
        [(template, _)] = pod_specs(docs)
        found: dict[str, str] = template["metadata"].get("annotations") or {}
        return found

    # Live reload is the default: a policy change alone does not roll pods.
    assert "checksum/llm-sidecar-policy" not in annotations(rendered["standalone"])
    # A Secret created from values is read into env vars at start: always roll on change.
    assert "checksum/llm-sidecar-secret" in annotations(rendered["sidecar-native"])
    before = annotations(rendered["redis-secret"])
    assert re.fullmatch(r"[0-9a-f]{64}", before["checksum/llm-sidecar-policy"])
    after = annotations(
        helm.template(
            "-f", CHART / "ci" / "redis-secret-values.yaml", "--set", "policy.logLevel=debug"
        )
    )
    assert after["checksum/llm-sidecar-policy"] != before["checksum/llm-sidecar-policy"]
    assert after["checksum/llm-sidecar-secret"] == before["checksum/llm-sidecar-secret"]


# ---- versions, NOTES, the include interface --------------------------------


def test_image_tag_matches_chart_and_project_versions() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert values["image"]["tag"] == chart["appVersion"] == project["version"]


def _render_notes(helm: Helm, tmp_path: Path, *args: str) -> str:
    """helm template skips NOTES.txt, so render it inside a ConfigMap of a copy."""
    chart = tmp_path / "llm-sidecar"
    shutil.copytree(CHART, chart)
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_test_notes.tpl").write_text(
        '{{- define "test.notes" -}}\n' + notes + "{{- end }}\n"
    )
    (chart / "templates" / "test-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ include "test.notes" . | quote }}\n'
    )
    docs = helm.template("--show-only", "templates/test-notes.yaml", *args, chart=chart)
    text: str = docs[0]["data"]["notes"]
    return text


def test_notes_give_the_base_url(
    helm: Helm, rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    service = one(rendered["standalone"], "Service")
    port = service["spec"]["ports"][0]["port"]
    notes = _render_notes(
        helm, tmp_path / "standalone", "-f", str(CHART / "ci/standalone-values.yaml")
    )
    url = f"http://{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}/v1"
    assert f'base_url = "{url}"' in notes

    notes = _render_notes(
        helm, tmp_path / "sidecar", "-f", str(CHART / "ci/sidecar-native-values.yaml")
    )
    assert 'base_url = "http://127.0.0.1:8080/v1"' in notes
    # The pod template snippet in the notes is copy-paste ready: it is the
    # same container and volumes the demo Deployment runs.
    after = notes.split("Add the proxy to your workload's pod template")[1].split("\n", 1)[1]
    block = after.lstrip("\n").split("\n\n")[0]
    snippet = yaml.safe_load(block)["template"]
    [(template, spec)] = pod_specs(rendered["sidecar-native"])
    assert snippet["spec"]["initContainers"] == spec["initContainers"]
    assert snippet["spec"]["volumes"] == spec["volumes"]
    grace = spec["terminationGracePeriodSeconds"]
    assert snippet["spec"]["terminationGracePeriodSeconds"] == grace
    assert snippet["metadata"]["annotations"] == template["metadata"]["annotations"]


def test_another_chart_can_include_the_sidecar(helm: Helm, tmp_path: Path) -> None:
    parent = tmp_path / "myapp"
    shutil.copytree(CHART, parent / "charts" / "llm-sidecar", ignore=shutil.ignore_patterns("ci"))
    (parent / "templates").mkdir()
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    (parent / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "myapp",
                "version": "1.0.0",
                "dependencies": [
                    {
                        "name": "llm-sidecar",
                        "version": version,
                        "repository": "file://../llm-sidecar",
                    }
                ],
            }
        )
    )
    (parent / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "llm-sidecar": {
                    "mode": "sidecar",
                    "upstream": {"apiKey": {"existingSecret": "openai", "existingSecretKey": "k"}},
                }
            }
        )
    )
    # The usage documented at the top of templates/_helpers.tpl.
    (parent / "templates" / "deployment.yaml").write_text(
        """{{- $llm := dict "Values" (index .Values "llm-sidecar") "Release" .Release }}
apiVersion: apps/v1
kind: Deployment
metadata: {name: myapp, namespace: {{ .Release.Namespace }}}
spec:
  selector: {matchLabels: {app: myapp}}
  template:
    metadata:
      labels: {app: myapp}
    spec:
      terminationGracePeriodSeconds: {{ include "llm-sidecar.terminationGracePeriodSeconds" $llm }}
      initContainers:
        {{- include "llm-sidecar.sidecar" $llm | nindent 8 }}
      containers:
        - name: app
          image: myapp:1.0
      volumes:
        {{- include "llm-sidecar.volumes" $llm | nindent 8 }}
"""
    )
    lint = helm.run("lint", "--strict", parent, "--kube-version", KUBE_VERSION)
    assert lint.returncode == 0 and "Fail:" not in lint.stderr, lint.stdout + lint.stderr
    docs = helm.template(chart=parent)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    [deployment] = [d for d in find(docs, "Deployment") if d["metadata"]["name"] == "myapp"]
    spec = deployment["spec"]["template"]["spec"]
    [sidecar] = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e for e in sidecar["env"]}
    key_env = policy_of(docs).upstreams["openai"].api_key_env
    assert key_env is not None
    assert env[key_env]["valueFrom"]["secretKeyRef"] == {"name": "openai", "key": "k"}
    # The volume names the ConfigMap the subchart rendered in the same release.
    volumes = {v["name"]: v for v in spec["volumes"]}
    policy_mount = next(m for m in sidecar["volumeMounts"] if m["readOnly"])
    configmap = one(docs, "ConfigMap")["metadata"]["name"]
    assert volumes[policy_mount["name"]]["configMap"]["name"] == configmap
    shutdown = policy_of(docs).shutdown
    sleep = float(sidecar["lifecycle"]["preStop"]["exec"]["command"][1])
    assert (
        spec["terminationGracePeriodSeconds"]
        > sleep + shutdown.accept_delay + shutdown.drain_timeout
    )


def test_default_values_render_and_validate(helm: Helm) -> None:
    docs = helm.template()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert one(docs, "Deployment")["spec"]["replicas"] == 2


def test_the_standalone_networkpolicy_example_selects_the_proxy_pods(
    rendered: dict[str, list[Obj]],
) -> None:
    """docs/kubernetes.md's NetworkPolicy is valid and its selector matches the
    chart's pods (the docs install with release name llm-sidecar, these tests ci)."""
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    block = docs.split("**Restrict who can call it.**")[1].split("```yaml\n")[1].split("```")[0]
    policy = yaml.safe_load(block)
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    selector = dict(policy["spec"]["podSelector"]["matchLabels"])
    assert selector.pop("app.kubernetes.io/instance") == "llm-sidecar"
    [(template, _)] = pod_specs(rendered["standalone"])
    labels = template["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert selector.items() <= labels.items()
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8080}]


def test_notes_tell_callers_to_pass_a_placeholder_key(helm: Helm, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path, "-f", str(CHART / "ci/standalone-values.yaml"))
    assert 'api_key="unused"' in notes  # the SDK refuses to build a client without a key
    assert "NetworkPolicy" in notes


# ---- cross-replica coalescing and Redis Cluster ----------------------------


def test_cross_replica_settings_reach_the_policy(rendered: dict[str, list[Obj]]) -> None:
    docs = rendered["cross-replica"]
    policy = policy_of(docs)
    assert (policy.cache.mode, policy.cache.url) == (
        "cluster",
        "redis://redis-cluster.cache.svc.cluster.local:6379",
    )
    cluster = policy.cluster
    assert cluster.coalesce_across_replicas
    assert (cluster.url, cluster.mode) == (
        "rediss://coalesce.cache.svc.cluster.local:6380/0",
        "single",
    )
    assert (cluster.lease, cluster.stream_ttl, cluster.timeout) == (3.0, 30.0, 0.2)
    assert cluster.max_stream_bytes == 16 * 1024 * 1024
    # Both passwords by reference: the cache's from the Secret you manage,
    # the coordination Redis's from the Secret the chart created.
    [(_, spec)] = pod_specs(docs)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in proxy_of(spec)["env"]}
    assert policy.cache.password_env is not None and cluster.password_env is not None
    assert env[policy.cache.password_env] == {"name": "redis-cluster", "key": "redis-password"}
    secret = one(docs, "Secret")
    assert env[cluster.password_env] == {
        "name": secret["metadata"]["name"],
        "key": "cluster-redis-password",
    }
    assert base64.b64decode(secret["data"]["cluster-redis-password"]) == b"ci-cluster-password-3333"


def test_without_the_feature_the_policy_has_no_cluster_block(
    rendered: dict[str, list[Obj]],
) -> None:
    for scenario, docs in rendered.items():
        if scenario != "cross-replica":
            assert "cluster" not in yaml.safe_load(policy_text(docs)), scenario
            assert not policy_of(docs).cluster.coalesce_across_replicas


def test_cross_replica_shares_the_cache_redis_by_default(helm: Helm) -> None:
    docs = helm.template(
        "-f",
        CHART / "ci" / "redis-secret-values.yaml",
        "--set",
        "cluster.coalesceAcrossReplicas=true",
        "--set",
        "cache.redis.mode=cluster",
    )
    policy = policy_of(docs)
    assert policy.cluster.coalesce_across_replicas and policy.cluster.url is None
    assert policy.cache.mode == "cluster"
    assert "cluster-redis-password" not in one(docs, "Secret")["data"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["cluster.coalesceAcrossReplicas=true"],
            "cluster.coalesceAcrossReplicas needs a Redis shared by the replicas",
        ),
        (
            ["cluster.redis.password.value=hunter2"],
            "cluster.redis.password applies to cluster.redis.url",
        ),
        (
            ["cluster.coalesceAcrossReplicas=true", "cluster.redis.url=redis://:hunter2@r:6379"],
            "cluster.redis.url: no password in the URL",
        ),
        (
            ["cache.backend=redis", "cache.redis.url=redis://r:6379/2", "cache.redis.mode=cluster"],
            "cache.redis.url: a Redis Cluster is reached over TCP and has only database 0",
        ),
        (
            [
                "cluster.coalesceAcrossReplicas=true",
                "cluster.redis.url=unix:///run/redis.sock",
                "cluster.redis.mode=cluster",
            ],
            "cluster.redis.url: a Redis Cluster is reached over TCP",
        ),
        (["cluster.redis.mode=sharded"], "don't meet the specifications of the schema"),
    ],
)
def test_cross_replica_mistakes_are_refused_in_words(
    helm: Helm, settings: list[str], message: str
) -> None:
    stderr = helm.template_error(*(arg for setting in settings for arg in ("--set", setting)))
    assert message in stderr
    assert "hunter2" not in stderr


def test_the_docs_cross_replica_example_renders_the_policy_they_show(
    helm: Helm, tmp_path: Path
) -> None:
    """docs/kubernetes.md's values for sharing one Redis render, with this
    chart, exactly the cache and cluster sections the page shows next to them."""
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    section = docs.split("## Many sidecars, one Redis")[1]
    values_block, policy_block = (part.split("```")[0] for part in section.split("```yaml\n")[1:3])
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(yaml.safe_load(values_block)["llm-sidecar"]))
    rendered = yaml.safe_load(policy_text(helm.template("-f", values)))
    shown = yaml.safe_load(policy_block)
    assert {k: rendered[k] for k in ("cache", "cluster")} == {
        "cache": {**shown["cache"], "max_bytes": "128MiB", "timeout": "200ms"},
        "cluster": shown["cluster"],
    }


# ---- the policy's routes and upstreams, as the schema lets values express them ----


def schema_properties(*path: str) -> set[str]:
    node: Any = json.loads((CHART / "values.schema.json").read_text())
    for key in path:
        node = node[key]
    return set(node["properties"])


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def test_the_schema_takes_every_route_and_upstream_key_of_the_policy_model() -> None:
    """additionalProperties: false turns a key the schema lacks into a failed
    `helm install`: every field of the policy's models must be in it, and
    nothing else (a new field fails here until the schema has it)."""
    route = ("properties", "policy", "properties", "routes", "items")
    assert schema_properties(*route) == set(Route.model_fields)
    assert schema_properties(*route, "properties", "targets", "items") == set(Target.model_fields)
    assert schema_properties(*route, "properties", "retry") == set(Retry.model_fields)
    extra = ("properties", "extraUpstreams", "additionalProperties")
    assert schema_properties(*extra) == set(Upstream.model_fields)
    # The chart's own upstream block spells them in camelCase, with its key
    # as a Secret reference instead of an env var name, plus its name.
    own = {camel(name) for name in Upstream.model_fields} - {"apiKeyEnv"}
    assert schema_properties("properties", "upstream") == own | {"name", "apiKey"}


def test_a_fallback_route_renders_with_its_targets_retry_and_ejection(
    rendered: dict[str, list[Obj]],
) -> None:
    policy = policy_of(rendered["fallbacks"])
    chat, embeddings, catch_all = policy.routes
    assert chat.upstream is None  # a route with targets gets no default upstream
    assert [(t.upstream, t.model) for t in chat.target_list] == [
        ("openai", None),
        ("azure", "gpt-4o-mini-eu"),
    ]
    assert (chat.strategy, chat.retry.attempts, chat.retry.max_retry_wait) == ("fallback", 3, 2.0)
    assert not chat.cache_fallback
    assert [t.weight for t in embeddings.target_list] == [3.0, 1.0]
    assert catch_all.upstream == "openai"
    openai, azure = policy.upstreams["openai"], policy.upstreams["azure"]
    assert (openai.eject_after, openai.eject_for, openai.max_eject_for) == (3, 15.0, 120.0)
    assert (azure.eject_after, azure.api_key_env) == (5, "AZURE_OPENAI_API_KEY")


def test_a_typo_inside_a_retry_block_is_rejected_by_the_schema(helm: Helm) -> None:
    stderr = helm.template_error(
        "-f",
        str(CHART / "ci" / "fallbacks-values.yaml"),
        "--set",
        "policy.routes[0].retry.atempts=2",
    )
    assert re.search(r"additional propert(y|ies) '?atempts'? (is )?not allowed", stderr, re.I)
