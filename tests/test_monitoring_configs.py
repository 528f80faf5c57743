"""The dev stack's configs, checked without a Docker engine.

Parse every YAML/JSON file, check the compose structure the docs promise, run
``docker-compose config`` and ``promtool`` when installed (skipped otherwise), and make sure every
metric a dashboard or alert queries is one ``/metrics`` really exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from orchestrator_site import metrics
from tests.conftest import ROOT

COMPOSE = ROOT / "compose" / "docker-compose.dev.yml"
MONITORING = ROOT / "monitoring"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
METRIC_RE = re.compile(r"\b((?:llm_orchestrator|django|rq)_[a-zA-Z0-9_]+)")


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def compose() -> dict:
    return load_yaml(COMPOSE)


def test_every_yaml_and_json_file_parses():
    files = [*ROOT.joinpath("compose").glob("*.yml"), *MONITORING.rglob("*.yml"), *MONITORING.rglob("*.yaml")]
    assert len(files) >= 6
    for path in files:
        assert isinstance(load_yaml(path), dict), path
    assert DASHBOARDS
    for path in DASHBOARDS:
        assert json.loads(path.read_text())["panels"], path


def test_compose_file_says_it_is_for_development_only():
    head = COMPOSE.read_text().splitlines()[0]
    assert "DEVELOPMENT ONLY" in head


def test_compose_has_the_whole_stack():
    doc = compose()
    assert "name" not in doc and "include" not in doc  # Compose v1 (and older engines) reject them
    services = doc["services"]
    assert {"app", "redis", "postgres", "otel-collector", "prometheus", "grafana"} <= services.keys()
    workers = {name: svc for name, svc in services.items() if name.startswith("worker-")}
    assert {svc["environment"]["WORKER_QUEUES"] for svc in workers.values()} == {"high", "normal", "low"}
    assert "gunicorn" in services["app"]["command"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    env = services["app"]["environment"]
    assert env["DATABASE_URL"].startswith("postgres://") and env["REDIS_URL"].startswith("redis://redis:")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")


def test_compose_starts_in_order_on_healthy_dependencies():
    services = compose()["services"]
    for name in ("postgres", "redis", "app", "ollama"):
        assert services[name]["healthcheck"]["test"], name
    init = services["init"]
    assert "migrate --noinput" in " ".join(init["command"]) and "bootstrap_demo" in " ".join(init["command"])
    assert init["restart"] == "no"
    # Everything that runs our code waits for an answering database and Redis, and for init.
    ours = [name for name, svc in services.items() if "build" in svc]
    assert {"app", "init", "worker-high", "worker-normal", "worker-low"} <= set(ours)
    for name in ours:
        deps = services[name]["depends_on"]
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
        if name != "init":
            assert deps["init"]["condition"] == "service_completed_successfully", name
    assert services["prometheus"]["depends_on"]["app"]["condition"] == "service_healthy"


def test_compose_app_runs_in_production_mode_and_answers_prometheus():
    env = compose()["services"]["app"]["environment"]
    assert env["DEBUG"] == "0" and env["SECRET_KEY"]
    allowed = env["ALLOWED_HOSTS"].split(",")
    for job in load_yaml(MONITORING / "prometheus.yml")["scrape_configs"]:
        if job["job_name"].startswith("llmo-"):
            for target in job["static_configs"][0]["targets"]:
                assert target.rsplit(":", 1)[0] in allowed, target


def test_compose_publishes_ports_on_this_machine_only():
    # Fixed dev passwords and tokens: nothing of the stack may answer the network by default.
    published = [(name, port) for name, svc in compose()["services"].items() for port in svc.get("ports", [])]
    assert published
    for name, port in published:
        assert port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_has_the_ollama_server_the_docs_name():
    docs = (ROOT / "README.md").read_text() + (ROOT / "compose" / "README.md").read_text()
    assert "ollama:11434" in docs  # the base_url to register; it must resolve inside the stack
    ollama = compose()["services"]["ollama"]
    assert ollama["image"].startswith("ollama/ollama:") and "127.0.0.1:11434:11434" in ollama["ports"]


def test_compose_builds_and_mounts_files_that_exist():
    base = COMPOSE.parent
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build:
            context = (base / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (base / source).exists(), f"{name}: {source}"


def test_prometheus_scrapes_both_metrics_scopes_with_the_token():
    doc = load_yaml(MONITORING / "prometheus.yml")
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    token = compose()["services"]["app"]["environment"]["METRICS_TOKEN"]
    assert jobs["llmo-web"]["params"]["scope"] == ["process"]
    assert jobs["llmo-fleet"]["params"]["scope"] == ["fleet"]
    for name in ("llmo-web", "llmo-fleet"):
        assert jobs[name]["metrics_path"] == "/metrics"
        assert jobs[name]["authorization"]["credentials"] == token


def test_otel_collector_pipelines_use_defined_components():
    doc = load_yaml(MONITORING / "otel-collector.yaml")
    for pipeline in doc["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in doc[kind], f"{kind}: {component}"
    assert "4318" in doc["receivers"]["otlp"]["protocols"]["http"]["endpoint"]


def test_grafana_provisioning_points_at_the_dashboards():
    prov = MONITORING / "grafana" / "provisioning"
    ds = load_yaml(prov / "datasources" / "datasources.yaml")["datasources"]
    uids = {d["uid"] for d in ds}
    providers = load_yaml(prov / "dashboards" / "dashboards.yaml")["providers"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert any(m.endswith(":" + providers[0]["options"]["path"] + ":ro") for m in mounts)
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] in uids, panel["title"]


def test_dashboard_has_the_promised_panels():
    titles = " | ".join(p["title"] for path in DASHBOARDS for p in json.loads(path.read_text())["panels"])
    for wanted in ("P50 / P95 / P99", "heatmap", "Queue depth", "Throughput", "Routing breakdown", "Backend health"):
        assert wanted in titles, wanted


def exported_now(client: Client, settings) -> set[str]:
    """Every family and sample name a real scrape of /metrics shows (both scopes)."""
    settings.METRICS_TOKEN = "t"
    client.get("/healthz")
    client.get("/nope")  # a 404 so per-status families have a sample
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer t").content.decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names | metrics.exported_names()


def queries() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            out += [(f"{path.name}: {panel['title']}", t["expr"]) for t in panel.get("targets", [])]
        for var in dash.get("templating", {}).get("list", []):
            out.append((f"{path.name}: ${var['name']}", var["definition"]))
    for group in load_yaml(MONITORING / "alerts.yml")["groups"]:
        out += [(f"alert {rule['alert']}", rule["expr"]) for rule in group["rules"]]
    return out


@pytest.mark.django_db
def test_every_metric_in_dashboards_and_alerts_is_exported(client, settings, dev_backend):
    exported = exported_now(client, settings)
    used = set()
    for where, expr in queries():
        for name in METRIC_RE.findall(expr):
            assert name in exported, f"{where} queries {name}, which /metrics does not export"
            used.add(name)
    # the seed's names are all on the dashboard
    for seed_name in ("jobs_created_total", "jobs_enqueued_total", "job_latency_seconds_bucket", "queue_depth"):
        assert metrics.PREFIX + seed_name in used
    assert metrics.PREFIX + "routing_decisions_total" in used


def test_docker_compose_config_validates():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    proc = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_promtool_checks_config_and_alert_rules():
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    proc = subprocess.run(
        [exe, "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
