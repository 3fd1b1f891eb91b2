"""Helpers for the deployment tests: PromQL metric names, the shipped files, a real Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROM_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
RULES = DOCKER / "prometheus" / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "tfb.json"
GENERATION_ROW = "Generation"  # the dashboard row whose panels need /v1/completions
# series Prometheus writes itself for every target (not in the target's /metrics)
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
                 "scrape_samples_post_metric_relabeling"}


def need_modules(*names: str, why: str):
    """A skip mark where a Python package is missing locally; with CI=true a missing package
    fails the collection instead (``make test`` installs them)."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    reason = f"needs {why} ({', '.join(missing)} missing; make test installs them)"
    if missing and os.environ.get("CI", "").lower() == "true":
        raise RuntimeError(f"CI=true but the test {reason}")
    return pytest.mark.skipif(bool(missing), reason=reason)


def need_binary(name: str) -> str:
    """The binary's path; skip when it is missing locally, fail in CI (.ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (apt-get install prometheus brings prometheus and promtool)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {msg}; .ci/run should have installed it")
        pytest.skip(msg)
    return path


# --- PromQL -----------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels and numbers left out)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', " ", expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    s = re.sub(r"(?<![\w:])(0x[0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)(?![\w:])", " ", s)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group(0))
    return names


def grafana_to_promql(expr: str, rate_interval: str = "15s") -> str:
    """A dashboard expression with Grafana's variables replaced, ready for Prometheus's API."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    return re.sub(r"\$\{?model\}?", ".*", expr)


# --- the shipped files --------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict) -> list[tuple[str, dict]]:
    """(row title, panel) for every non-row panel, in order (expanded and collapsed rows)."""
    out, row = [], ""
    for p in dash["panels"]:
        if p["type"] == "row":
            row = p["title"]
            out += [(row, q) for q in p.get("panels", [])]
        else:
            out.append((row, p))
    return out


def dashboard_exprs(dash: dict | None = None) -> list[tuple[str, str, str]]:
    """(row title, panel title, expr) for every query of the dashboard."""
    return [(row, p["title"], t["expr"]) for row, p in dashboard_panels(dash or dashboard())
            for t in p.get("targets", []) if t.get("expr")]


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def exported_names(metrics_text: str) -> set[str]:
    """Every sample name in a /metrics exposition (tfb_x_bucket, tfb_x_count, tfb_y_total, ...)."""
    from server_helpers import scrape

    return {name for name, _ in scrape(metrics_text)}


# --- a real Prometheus --------------------------------------------------------------------------


class Prometheus:
    """``prometheus`` on a free 127.0.0.1 port, temp storage, scraping ``target`` every second."""

    def __init__(self, workdir: Path, target: str, rule_files: list[Path] = ()):
        from server_helpers import free_port

        self.binary = need_binary("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = workdir
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "tfb", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Prometheus":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                 "--storage.tsdb.retention.time=1h"],
                cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def api(self, path: str, **params) -> dict:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result (a vector's samples, or one scalar as a sample)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def wait_for(self, expr: str, timeout: float = 60) -> list[dict]:
        """Poll an instant query until it returns a sample."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
