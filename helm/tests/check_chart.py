#!/usr/bin/env python3
"""Checks the credbroker chart offline with real tools: Helm v4's linter and
renderer (helm-python-sdk), Kubernetes' published schemas in strict mode
(kubernetes-validate), and the facts a platform team relies on, read from
the parsed manifests.

    check_chart.py                       lint, render, validate, facts
    check_chart.py --scrape FILE         also: every metric the PrometheusRule
                                         and the dashboard use is in FILE (a
                                         real scrape of the broker)
    check_chart.py --metrics-only --scrape FILE

Exits non-zero with a message naming the first broken fact.
"""

import argparse
import json
import pathlib
import re
import sys
import tomllib

import helm_python
import kubernetes_validate
import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent / "credbroker"
ALL_FEATURES = CHART / "examples" / "values-all-features.yaml"
KUBE_VERSION = "1.30.0"
# Custom resources have no schema in Kubernetes' published set; their
# shape is asserted below instead.
CRD_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")


def fail(msg):
    print(f"check_chart: {msg}", file=sys.stderr)
    sys.exit(1)


def render(values):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values, name="credbroker", namespace="credbroker", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def lint(values, label):
    report = helm_python.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
    errors = list(report.get("errors") or [])
    errors += [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
    if errors:
        fail(f"helm lint ({label}): {errors}")


def validate(docs, label):
    for path, doc in docs:
        if doc.get("apiVersion", "").startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{label}: {path} {doc['kind']} does not match Kubernetes {KUBE_VERSION}: {e.message}")


def kinds(docs):
    out = {}
    for _, d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def locked_down(ctx, where):
    want = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    for k, v in want.items():
        if ctx.get(k) != v:
            fail(f"{where}: securityContext.{k} must be {v}")
    if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
        fail(f"{where}: capabilities must drop ALL")
    if ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(f"{where}: seccompProfile must be RuntimeDefault")


def facts(docs, label, features):
    k = kinds(docs)
    (dep,) = k["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if "grpc" not in c.get(probe, {}):
            fail(f"{label}: {probe} must be a native gRPC probe")
    health_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    if c["readinessProbe"]["grpc"]["port"] != health_port:
        fail(f"{label}: the readiness probe must use the plaintext health port")
    if c["readinessProbe"]["grpc"].get("service") != "credbroker.v1.CredentialBroker":
        fail(f"{label}: readiness must ask for the broker's service")
    locked_down(c["securityContext"], f"{label}: broker container")
    if not spec["securityContext"].get("runAsNonRoot"):
        fail(f"{label}: pod must run as non-root")
    if "resources" not in c or "limits" not in c["resources"] or "requests" not in c["resources"]:
        fail(f"{label}: requests and limits are required")
    anti = spec["affinity"]["podAntiAffinity"]
    if not anti:
        fail(f"{label}: pod anti-affinity missing")
    if "topologySpreadConstraints" not in spec:
        fail(f"{label}: topology spread missing")
    config = next(d for d in k["ConfigMap"] if d["metadata"]["name"] == "credbroker")
    toml = tomllib.loads(config["data"]["credbroker.toml"])
    grace = toml["server"]["shutdown_grace_secs"]
    if spec["terminationGracePeriodSeconds"] <= grace:
        fail(f"{label}: terminationGracePeriodSeconds must exceed the broker's drain ({grace} s)")
    if not features and dep["spec"].get("replicas") != 3:
        fail(f"{label}: 3 replicas by default")
    if "PodDisruptionBudget" not in k:
        fail(f"{label}: PodDisruptionBudget missing")
    # No secret in any ConfigMap: the secret-bearing keys are absent, and
    # every secret reaches the pod as a secretKeyRef.
    for cm in k["ConfigMap"]:
        for key, text in cm.get("data", {}).items():
            if key.endswith(".toml"):
                t = tomllib.loads(text)
                leaks = [
                    ("vault.auth.token", t.get("vault", {}).get("auth", {}).get("token")),
                    ("vault.auth.secret_id", t.get("vault", {}).get("auth", {}).get("secret_id")),
                    ("postgres.url", t.get("postgres", {}).get("url")),
                    ("auth.hs256_secret", t.get("auth", {}).get("hs256_secret")),
                ]
                for name, v in leaks:
                    if v is not None:
                        fail(f"{label}: {name} is inlined in ConfigMap {cm['metadata']['name']}")
            if re.search(r"(?i)(password|secret_id|whsec_|BEGIN [A-Z ]*PRIVATE KEY)", text):
                fail(f"{label}: ConfigMap {cm['metadata']['name']}/{key} looks like it holds a secret")
    env = {e["name"]: e for e in c["env"]}
    pg = env.get("CREDBROKER__POSTGRES__URL", {})
    if "secretKeyRef" not in pg.get("valueFrom", {}):
        fail(f"{label}: the database URL must come from a Secret")
    for e in c["env"]:
        if e["name"].startswith("CREDBROKER__") and "value" in e:
            fail(f"{label}: {e['name']} is inlined instead of read from a Secret")
    svcs = {s["metadata"]["name"]: s for s in k["Service"]}
    if "credbroker" not in svcs or "credbroker-metrics" not in svcs:
        fail(f"{label}: gRPC and metrics Services required")
    (np,) = k["NetworkPolicy"]
    ports = sorted(p["port"] for r in np["spec"]["ingress"] for p in r.get("ports", []))
    if ports != sorted([50051, 9464, 50052]):
        fail(f"{label}: NetworkPolicy must admit exactly the gRPC, metrics and health ports, got {ports}")
    (job,) = k["Job"]
    hooks = job["metadata"]["annotations"]["helm.sh/hook"]
    if set(hooks.split(",")) != {"pre-install", "pre-upgrade"}:
        fail(f"{label}: migrations must run as a pre-install/pre-upgrade hook")
    if job["spec"]["template"]["spec"]["containers"][0]["args"] != ["migrate"]:
        fail(f"{label}: the migration job runs `credbroker migrate`")
    locked_down(job["spec"]["template"]["spec"]["containers"][0]["securityContext"], f"{label}: migrate job")
    policy = next(d for d in k["ConfigMap"] if d["metadata"]["name"] == "credbroker-vault-policy")
    if policy["data"]["credbroker.hcl"].strip() != (CHART / "files" / "vault-policy.hcl").read_text().strip():
        fail(f"{label}: the Vault policy ConfigMap must be the tested policy file")
    if features:
        for kind in ("HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Certificate", "Issuer"):
            if kind not in k:
                fail(f"{label}: {kind} missing with every feature on")
        if "replicas" in dep["spec"]:
            fail(f"{label}: with the HPA on, the Deployment must not pin replicas")
        rules = {r["alert"]: r for g in k["PrometheusRule"][0]["spec"]["groups"] for r in g["rules"]}
        severities = {
            "CredbrokerVaultSealed": "critical",
            "CredbrokerVaultNodeDown": "warning",
            "CredbrokerHealthCheckFailureRate": "warning",
            "CredbrokerValidationFailureSpike": "info",
        }
        for alert, sev in severities.items():
            if rules.get(alert, {}).get("labels", {}).get("severity") != sev:
                fail(f"{label}: the seed's alert {alert} ({sev}) is missing")
        if "0.05" not in rules["CredbrokerHealthCheckFailureRate"]["expr"]:
            fail(f"{label}: the health-check alert fires above 5 %")
        dash = next(d for d in k["ConfigMap"] if d["metadata"]["name"] == "credbroker-dashboard")
        json.loads(dash["data"]["credbroker.json"])
        vol_names = {v["name"] for v in spec["volumes"]}
        if "vault-ca" not in vol_names:
            fail(f"{label}: vault.caSecret must be mounted")
    else:
        for kind in ("HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Certificate"):
            if kind in k:
                fail(f"{label}: {kind} must be off by default")


METRIC = re.compile(r"\b((?:alphapulse|credbroker)_[a-zA-Z0-9_]+)")


def used_metrics():
    docs = render(yaml.safe_load(ALL_FEATURES.read_text()))
    names = set()
    for _, d in docs:
        if d["kind"] == "PrometheusRule":
            for g in d["spec"]["groups"]:
                for r in g["rules"]:
                    names |= set(METRIC.findall(r["expr"]))
    dash = json.loads((CHART / "dashboards" / "credbroker.json").read_text())
    for p in dash["panels"]:
        for t in p["targets"]:
            names |= set(METRIC.findall(t["expr"]))
    return names


def check_metrics(scrape_path):
    exported = set()
    for line in pathlib.Path(scrape_path).read_text().splitlines():
        if line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    used = used_metrics()
    if not used:
        fail("no metric found in the rules and the dashboard")
    missing = sorted(used - exported)
    if missing:
        fail(f"the rules or the dashboard use series the broker does not export: {missing}")
    print(f"check_chart: {len(used)} series used by the rules and the dashboard, all exported")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scrape")
    ap.add_argument("--metrics-only", action="store_true")
    a = ap.parse_args()
    if not a.metrics_only:
        all_features = yaml.safe_load(ALL_FEATURES.read_text())
        for label, values, features in (("defaults", {}, False), ("all features", all_features, True)):
            lint(values, label)
            docs = render(values)
            validate(docs, label)
            facts(docs, label, features)
            print(f"check_chart: {label}: {len(docs)} manifests lint, validate and hold")
        for example in ("trading-pod.yaml",):
            for doc in yaml.safe_load_all((CHART / "examples" / example).read_text()):
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        print("check_chart: examples validate")
    if a.scrape:
        check_metrics(a.scrape)


if __name__ == "__main__":
    main()
