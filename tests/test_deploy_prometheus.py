"""A real Prometheus scraping a real `tfb serve` (tiny model), loaded with the shipped rules.

Every query of the shipped dashboard and every rule must name metrics the live /metrics exports
(checked against the running server after traffic to each endpoint it offers) and evaluate in
Prometheus; the uncertainty histograms must reach Prometheus.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

import tiny
from deploy_helpers import (DOCKER, GENERATION_ROW, RULES, SCRAPE_SERIES, Prometheus, dashboard,
                            dashboard_exprs, exported_names, grafana_to_promql, metric_names, need_binary,
                            rules)
from server_helpers import bayesianized, start_cli, wait_for, wait_ready

QUESTION = {"question": "Which gas do plants absorb?", "choices": ["Oxygen", "Carbon dioxide", "Helium"]}
BAD = {"question": "bad", "choices": ["only one"]}  # a 400, for the error panels
# bodies per POST endpoint ("model" added); an endpoint not listed here still gets traffic (an empty body)
BODIES = {
    "/v1/choices": [QUESTION, {"items": [QUESTION, {"prompt": "2 + 2 =", "choices": [" 4", " 5"]}]}, BAD],
    "/v1/completions": [{"prompt": "The sky is", "max_tokens": 4, "temperature": 0},
                        {"prompt": "Once upon", "max_tokens": 3, "stream": True}],
    "/v1/chat/completions": [{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(server url, Prometheus, openapi paths, live /metrics text) after traffic to every endpoint."""
    need_binary("prometheus")
    root = tmp_path_factory.mktemp("deploy")
    base = tiny.make_llama(root / "base")
    post = bayesianized(base, tiny.make_lora(base, root / "lora"), root / "post", sigma=0.5)
    proc, url = start_cli("--model", str(base), "--adapter", str(post), "--samples", "3", "--log-level", "warning")
    prom = None
    try:
        wait_ready(url, proc=proc)
        prom = Prometheus(root, url.removeprefix("http://"), rule_files=[RULES]).start()
        assert prom.wait_for('up{job="tfb"} == 1', timeout=30), "Prometheus never scraped tfb"
        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
        failed = []
        with httpx.Client(base_url=url, timeout=120) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            for path, methods in paths.items():
                if "{" in path:
                    continue
                for method in methods:
                    for body in (BODIES.get(path, [{}]) if method == "post" else [None]):
                        extra = {"model": model} if path in BODIES and path != "/v1/choices" else {}
                        r = client.request(method.upper(), path, json=None if body is None else {**body, **extra})
                        if r.status_code >= 400 and body is not BAD and path in BODIES | {"/health": 0}:
                            failed.append(f"{method.upper()} {path}: {r.status_code} {r.text[:300]}")
        assert not failed, failed
        for name in ("tfb_mutual_information_count", "tfb_request_duration_seconds_count"):
            assert prom.wait_for(f"sum({name}) > 0", timeout=30), f"{name} never reached Prometheus"
        # rate() over the dashboards' 15 s window needs two scrapes after the traffic, and every
        # rule must have been evaluated once
        assert prom.wait_for("min(count_over_time(tfb_request_duration_seconds_count[15s])) >= 2", timeout=30)
        wait_for(lambda: all(r["health"] != "unknown" for g in prom.api("rules")["groups"] for r in g["rules"]),
                 timeout=30, what="every rule evaluated", poll=0.5)
        metrics_text = httpx.get(f"{url}/metrics").text
        yield url, prom, paths, metrics_text
    finally:
        if prom is not None:
            prom.stop()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_uncertainty_histograms_reach_prometheus(stack):
    _, prom, _, _ = stack
    for name in ("tfb_mutual_information_count", "tfb_predictive_entropy_count", "tfb_expected_entropy_count"):
        result = prom.query(f'{name}{{endpoint="/v1/choices"}}')
        assert result and float(result[0]["value"][1]) > 0, (name, result)
    assert float(prom.query("tfb_ready")[0]["value"][1]) == 1
    assert float(prom.query("tfb_posterior_sigma")[0]["value"][1]) == pytest.approx(0.5)


def check_exprs(prom, exported: set[str], exprs, allowed: set[str] = frozenset()) -> None:
    """Each expression names only exported metrics and returns samples from the real Prometheus."""
    problems = []
    for row, title, expr in exprs:
        names = metric_names(expr)
        missing = names - exported - allowed
        if not names or missing:
            problems.append(f"{row} / {title}: {expr}\n    names {sorted(names)}; not exported: {sorted(missing)}")
            continue
        try:
            if not prom.query(grafana_to_promql(expr)):
                problems.append(f"{row} / {title}: {expr}\n    no samples in Prometheus")
        except AssertionError as e:
            problems.append(f"{row} / {title}: {expr}\n    Prometheus: {e}")
    assert not problems, "\n".join(problems)


def test_dashboard_queries_resolve_against_the_live_server(stack):
    _, prom, _, metrics_text = stack
    exprs = [e for e in dashboard_exprs() if not e[0].startswith(GENERATION_ROW)]
    assert len(exprs) > 20
    check_exprs(prom, exported_names(metrics_text), exprs)
    for var in dashboard()["templating"]["list"]:  # label_values(METRIC, label)
        metric = var["definition"].removeprefix("label_values(").split(",")[0].strip()
        assert metric in exported_names(metrics_text), var


def test_dashboard_generation_row_resolves_against_the_live_server(stack):
    _, prom, paths, metrics_text = stack
    exprs = [e for e in dashboard_exprs() if e[0].startswith(GENERATION_ROW)]
    assert len(exprs) >= 5
    assert "/v1/completions" in paths, "the live server must serve generation for these panels"
    check_exprs(prom, exported_names(metrics_text), exprs)


def test_rules_load_evaluate_and_name_live_metrics(stack):
    _, prom, _, metrics_text = stack
    shipped = rules()
    recorded = {r["record"] for r in shipped if "record" in r}
    synthetic = {n for n in SCRAPE_SERIES if prom.query(f'{n}{{job="tfb"}}')}  # Prometheus's own, verified
    problems = []
    for r in shipped:
        names = metric_names(r["expr"])
        missing = names - exported_names(metrics_text) - recorded - synthetic
        if not names or missing:
            problems.append(f"{r.get('alert') or r.get('record')}: not exported: {sorted(missing)}")
        prom.query(r["expr"])  # evaluates without error (an alert's result may be empty)
    assert not problems, "\n".join(problems)

    loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert len(loaded) == len(shipped)
    bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not bad, bad
    # the MI-drift recording rule has a value for /v1/choices
    assert prom.wait_for('tfb:mutual_information:p90_1h{endpoint="/v1/choices"}', timeout=60)
    alerts = {r["name"]: r for r in loaded if r["type"] == "alerting"}
    assert {"TfbHighErrorRate", "TfbQueueSaturated", "TfbMutualInformationDrift"} <= set(alerts)
    # none fires; TfbDown may be pending after one scrape slower than its 1 s timeout (a loaded machine)
    states = {n: a["state"] for n, a in alerts.items()}
    assert all(s == "inactive" or (n == "TfbDown" and s == "pending") for n, s in states.items()), states


def test_mi_threshold_script_against_the_live_server(stack, tmp_path):
    url = stack[0]
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps(dict(QUESTION, answer=1, question=f"Q{i}: which gas?")) for i in range(5)))
    out = subprocess.run([sys.executable, str(DOCKER / "mi_threshold.py"), "--url", url, "--calibration", str(cal),
                          "--batch", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from server.metrics import MI_BUCKETS

    line = next(line for line in out.stdout.splitlines() if line.startswith("suggested threshold:"))
    assert float(line.split()[2]) in MI_BUCKETS, out.stdout
    assert "calibration: 5 answers" in out.stdout and "tfb:mutual_information:p90_1h" in out.stdout


def test_the_check_catches_a_wrong_name_and_a_bad_query(stack):
    _, prom, _, metrics_text = stack
    exported = exported_names(metrics_text)
    with pytest.raises(AssertionError, match="not exported"):
        check_exprs(prom, exported, [("row", "typo", "sum(rate(tfb_request_total[1m]))")])
    with pytest.raises(AssertionError, match="Prometheus"):
        check_exprs(prom, exported, [("row", "syntax", "sum(rate(tfb_requests_total[1m])")])
