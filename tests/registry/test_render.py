"""``iir config render``: a Serve config that Serve's own schema accepts, and the model applications the
Registry deploys carrying exactly the placement and scaling of ``models.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.builder import BuildArgs, build_model_app
from serve_app.cli import main
from serve_app.registry.catalog import load_catalog
from serve_app.registry.render import deployment_override, model_app_name, render_from_files

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "configs" / "models.yaml"
PROVIDERS = REPO / "configs" / "providers.yaml"
ROUTING = REPO / "configs" / "routing.yaml"


def rendered(**kwargs: Any) -> dict[str, Any]:
    return yaml.safe_load(render_from_files(MODELS, PROVIDERS, **kwargs))


def test_rendered_config_passes_serves_schema() -> None:
    schema = ServeDeploySchema.model_validate(rendered())
    [app] = schema.applications
    assert app.import_path == "serve_app.builder:build_app"
    assert not app.deployments  # local models are applications of the Registry's, not overrides here


def test_committed_serve_config_is_the_render() -> None:
    assert rendered() == yaml.safe_load((REPO / "serve_config.yaml").read_text())


def test_rendered_file_lists_the_model_applications() -> None:
    text = render_from_files(MODELS, PROVIDERS)
    for spec in load_catalog(MODELS, PROVIDERS).local_models:
        assert f"#   {model_app_name(spec)}: {spec.deployment_name} " in text


def test_inline_render_carries_the_documents_and_builds() -> None:
    config = rendered(inline=True, routing_config=ROUTING)
    ServeDeploySchema.model_validate(config)
    args = config["applications"][0]["args"]
    assert args["models"] == yaml.safe_load(MODELS.read_text())
    assert args["providers"] == yaml.safe_load(PROVIDERS.read_text())
    assert args["routing"] == yaml.safe_load(ROUTING.read_text())
    BuildArgs.model_validate(args)  # what build_app accepts


def test_model_application_carries_the_registry_placement(tmp_path: Path) -> None:
    """What Ray places and scales: the deployment the Registry runs for a GPU model."""
    models = yaml.safe_load(MODELS.read_text())
    models["models"].append({"id": "local/qwen-gpu", "engine": "vllm", "task": "chat", "source": "/m",
                             "resources": {"num_cpus": 2, "num_gpus": 1, "accelerator_type": "L4"},
                             "autoscaling": {"min_replicas": 0, "max_replicas": 4,
                                             "target_ongoing_requests": 16}})
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    catalog = load_catalog(tmp_path / "models.yaml", PROVIDERS)
    for spec in catalog.local_models:
        bound = build_model_app(spec)._bound_deployment
        override = deployment_override(spec)
        assert bound.name == spec.deployment_name
        assert bound.ray_actor_options == override["ray_actor_options"]
        assert bound.max_ongoing_requests == spec.max_ongoing_requests
        assert bound._deployment_config.autoscaling_config.model_dump(exclude_unset=True) == \
            override["autoscaling_config"]
    gpu = build_model_app(catalog.get("local/qwen-gpu"))._bound_deployment  # type: ignore[arg-type]
    assert gpu.ray_actor_options == {"num_cpus": 2, "num_gpus": 1, "accelerator_type": "L4"}
    scaling = gpu._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (0, 4, 1)
    assert scaling.target_ongoing_requests == 16


def test_cli_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "serve_config.yaml"
    assert main(["config", "render", "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == rendered()
    assert main(["config", "render", "--models-config", str(MODELS)]) == 0
    pinned = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert pinned == {"models_config": str(MODELS)}
    ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))


def test_cli_names_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "models.yaml").write_text("models: []\ndefault_model: local/x\n")
    assert main(["config", "render", "--models-config", str(tmp_path / "models.yaml")]) == 2
    assert "default_model" in capsys.readouterr().err


def test_the_default_graph_fits_a_two_cpu_machine() -> None:
    """`make run` on 2 cores: the services plus the packaged models must fit, or a model waits forever."""
    from ray.serve import Application

    from serve_app.builder import build_app

    app = build_app({})
    ingress = app._bound_deployment
    deployments = [ingress, *(a._bound_deployment for a in ingress.init_args if isinstance(a, Application))]
    assert {d.name for d in deployments} == {"Ingress", "Auth", "Registry", "SemanticCache"}
    services = sum(d.ray_actor_options.get("num_cpus", 1) for d in deployments)
    models = sum(m.resources.num_cpus * m.autoscaling.max_replicas
                 for m in load_catalog(MODELS, PROVIDERS).local_models)
    assert services + models <= 2, (services, models)


def test_groups_and_resilience_travel_inline_and_a_bad_group_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = yaml.safe_load(MODELS.read_text())
    models["groups"] = [{"id": "chat-default", "strategy": "cheapest",
                         "members": ["openai/gpt-4o-mini", "local/smollm2-135m"],
                         "fallbacks": ["local/smollm2-135m"]}]
    models["resilience"] = {"retries": 1, "cooldown": {"cooldown_s": 5}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    config = yaml.safe_load(render_from_files(tmp_path / "models.yaml", PROVIDERS, inline=True))
    args = config["applications"][0]["args"]
    assert args["models"]["groups"][0]["id"] == "chat-default"
    BuildArgs.model_validate(args)
    models["groups"][0]["members"].append("local/nope")
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    assert main(["config", "render", "--models-config", str(tmp_path / "models.yaml")]) == 2
    assert "group chat-default: member 'local/nope' is not a model" in capsys.readouterr().err
