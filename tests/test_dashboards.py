"""The Grafana dashboard and Prometheus config reference only metrics and labels that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from serve_app import metrics

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "configs" / "grafana" / "dashboards" / "iir.json"
_METRIC = re.compile(r"\b(ray_[a-z_]+)\b")
_BY = re.compile(r"by \(([^)]*)\)\s*\(\s*(?:rate\()?\s*(ray_[a-z_]+)")
_SELECTOR = re.compile(r"\b(ray_[a-z_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\bby \(([^)]*)\)")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def exported_names() -> dict[str, metrics._Metric]:
    """What Ray's endpoint calls each IIR metric (Ray adds ``ray_``, and ``_total`` to counters)."""
    names = {}
    for m in metrics.ALL:
        base = f"ray_{m.name}"
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[m.kind]
        names.update({base + s: m for s in suffixes})
    return names


def targets() -> list[dict[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def expressions() -> list[str]:
    return [t["expr"] for t in targets()]


def serve_metric_names() -> set[str]:
    import ray.serve

    source = "".join(p.read_text(errors="replace") for p in Path(ray.serve.__file__).parent.rglob("*.py"))
    return {f"ray_{n}" for n in re.findall(r'"(serve_[a-z_]+)"', source)}


def test_every_expression_names_a_metric_that_exists() -> None:
    ours, serves = exported_names(), serve_metric_names()
    used = {name for expr in expressions() for name in _METRIC.findall(expr)}
    assert used, "the dashboard queries nothing"
    unknown = {n for n in used if n not in ours and n not in serves}
    assert not unknown, unknown
    # Every IIR metric is on the dashboard somewhere (retries may stay at zero, but have a panel).
    assert {m.name for m in metrics.ALL} <= {ours[n].name for n in used if n in ours}


def test_grouping_labels_are_labels_of_the_metric() -> None:
    ours = exported_names()
    for expr in expressions():
        for labels, name in _BY.findall(expr):
            if name in ours:
                wanted = {x.strip() for x in labels.split(",") if x.strip()} - {"le"}
                assert wanted <= set(ours[name].labels), (expr, wanted)


def test_label_matchers_and_legends_name_labels_the_query_has() -> None:
    ours = exported_names()
    for target in targets():
        expr = target["expr"]
        for name, matchers in _SELECTOR.findall(expr):
            if name in ours:
                assert set(_MATCHER.findall(matchers)) <= set(ours[name].labels), expr
        # A legend's {{label}} is empty when the query no longer groups by it (a renamed label).
        grouped = {x.strip() for labels in _GROUPING.findall(expr) for x in labels.split(",")}
        assert set(_PLACEHOLDER.findall(target.get("legendFormat", ""))) <= grouped, target


def test_priority_metrics_have_their_own_row_by_class() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"] + [len(panels)]
    start = next(i for i in rows[:-1] if panels[i]["title"] == "Priority under overload")
    end = rows[rows.index(start) + 1]
    exprs = [t["expr"] for p in panels[start + 1:end] for t in p.get("targets", [])]
    names = {n for expr in exprs for n in _METRIC.findall(expr)}
    wanted = {metrics.QUEUED, metrics.QUEUE_WAIT, metrics.SHED, metrics.PREEMPTIONS}
    assert {m.name for m in wanted} <= {exported_names()[n].name for n in names if n in exported_names()}
    assert all("priority_class" in expr for expr in exprs), exprs


def test_the_dashboard_is_well_formed_for_provisioning() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
    provider = yaml.safe_load((REPO / "configs/grafana/provisioning/dashboards/iir.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((REPO / "configs/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"


def test_prometheus_scrapes_rays_metrics_port() -> None:
    config = yaml.safe_load((REPO / "configs/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["ray"]["static_configs"][0]["targets"] == ["iir:8080"]
    compose = (REPO / "docker-compose.yml").read_text()
    assert "--metrics-export-port=8080" in compose
