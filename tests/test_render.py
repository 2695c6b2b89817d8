"""``iir config render``: a Serve config that Serve's own schema accepts and that mirrors models.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.builder import _model_replica
from serve_app.catalog import load_catalog
from serve_app.cli import main
from serve_app.render import render_config, render_from_files

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "configs" / "models.yaml"
PROVIDERS = REPO / "configs" / "providers.yaml"


def rendered() -> dict[str, Any]:
    return yaml.safe_load(render_from_files(MODELS, PROVIDERS))


def test_rendered_config_passes_serves_schema() -> None:
    schema = ServeDeploySchema.model_validate(rendered())
    [app] = schema.applications
    assert app.import_path == "serve_app.builder:build_app"
    assert [d.name for d in app.deployments] == ["Model_smollm2_135m", "Model_minilm_l6_v2"]


def test_committed_serve_config_is_the_render_without_overrides() -> None:
    # Superset on purpose: serve_app/render.py says why the committed file has no `deployments:`.
    config = rendered()
    for app in config["applications"]:
        app.pop("deployments")
    assert config == yaml.safe_load((REPO / "serve_config.yaml").read_text())


def test_overrides_match_models_yaml() -> None:
    catalog = load_catalog(MODELS, PROVIDERS)
    overrides = {d["name"]: d for d in rendered()["applications"][0]["deployments"]}
    assert set(overrides) == {m.deployment_name for m in catalog.local_models}
    for spec in catalog.local_models:
        got = overrides[spec.deployment_name]
        assert got["ray_actor_options"] == {"num_cpus": spec.resources.num_cpus,
                                            "num_gpus": spec.resources.num_gpus}
        assert got["max_ongoing_requests"] == spec.max_ongoing_requests
        scaling = got["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (
            spec.autoscaling.min_replicas, spec.autoscaling.max_replicas,
            spec.autoscaling.target_ongoing_requests)


def test_overrides_equal_what_the_builder_binds(tmp_path: Path) -> None:
    """The file and the code must agree, or a `serve deploy` would move replicas the code placed."""
    models = yaml.safe_load(MODELS.read_text())
    models["models"].append({"id": "local/qwen-gpu", "engine": "vllm", "task": "chat", "source": "/m",
                             "resources": {"num_cpus": 2, "num_gpus": 1, "accelerator_type": "L4"},
                             "autoscaling": {"min_replicas": 0, "max_replicas": 4,
                                             "target_ongoing_requests": 16}})
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    catalog = load_catalog(tmp_path / "models.yaml", PROVIDERS)
    config = render_config(catalog)
    ServeDeploySchema.model_validate(config)
    overrides = config["applications"][0]["deployments"]
    for override in overrides:
        spec = next(m for m in catalog.local_models if m.deployment_name == override["name"])
        bound = _model_replica(spec)._bound_deployment
        assert override["ray_actor_options"] == bound.ray_actor_options
        assert override["max_ongoing_requests"] == bound.max_ongoing_requests
        assert override["autoscaling_config"] == bound._deployment_config.autoscaling_config.model_dump(
            exclude_unset=True)
    gpu = next(d for d in overrides if d["name"] == "Model_qwen_gpu")
    assert gpu["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1, "accelerator_type": "L4"}
    assert gpu["autoscaling_config"]["initial_replicas"] == 1


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
