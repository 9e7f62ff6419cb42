"""Offline validation of the operator files (run through scripts/validate-manifests).

Kubernetes kinds are checked, strictly (unknown fields are errors), against the schemas that
kubernetes-validate bundles, for the oldest Kubernetes release the manifests support and the
newest bundled one. KEDA, cert-manager and kustomize kinds are checked against the schemas in
scripts/schemas/, which reuse the bundled Kubernetes definitions (ObjectMeta, the HPA
behavior), so the ScaledObject's behavior block is checked exactly like an HPA's.

The Helm chart (charts/egress-scaler) is linted and rendered with Helm's own Go library
(helm-python-sdk bundles it): with its default values it must render the objects of deploy/ and
keda/ as their kustomizations apply them (less the example egress Deployment), every object it
renders for the default values and for each values file in its ci/ folder is checked like the
manifests, and each file of scripts/chart-invalid-values/ must be rejected with the reason its
first line names.
"""

import copy
import json
import sys
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "scripts" / "schemas"
MANIFEST_DIRS = ["deploy", "deploy/kube-scale", "keda"]
# What the chart renders with its default values: the overlay deploy/kube-scale/ is the
# chart's `kubeScale.enabled`, off by default.
DEFAULT_DIRS = ["deploy", "keda"]
# 1.33 is the first release whose HPA takes behavior.scaleUp.tolerance (keda/scaledobject.yaml).
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]
OWN_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("cert-manager.io/v1", "Issuer"): "cert-manager-issuer.json",
    ("cert-manager.io/v1", "Certificate"): "cert-manager-certificate.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator-servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator-podmonitor.json",
}
CHART = ROOT / "charts" / "egress-scaler"
INVALID_VALUES = ROOT / "scripts" / "chart-invalid-values"
# The release the kustomizations correspond to: its name and namespace.
RELEASE, NAMESPACE = "egress-scaler", "livekit"
# Labels only Helm's objects carry (never in selectors), left out when comparing with kustomize.
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance")
# Objects of deploy/ the chart does not install: it scales the egress Deployment that LiveKit's
# egress chart (or the operator) installs.
NOT_IN_CHART = {("apps/v1", "Deployment", "egress")}
# Files deliberately left out of a kustomization, with the reason a reader sees in them.
NOT_IN_KUSTOMIZATION = {
    "deploy/secret.example.yaml",  # an example to fill in, never applied as is
    "keda/scaledobject-pull.yaml",  # the alternative to keda/scaledobject.yaml
}


def kubernetes_definitions(version):
    directory = "v%s-local-strict" % version
    return schema_contents(f"kubernetes-json-schema/{directory}/_definitions.json", version)


def own_validator(schema_file, version):
    schema = json.loads((SCHEMAS / schema_file).read_text())
    registry = Resource.from_contents(kubernetes_definitions(version)) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def check_document(path, index, document, errors):
    where = f"{path.relative_to(ROOT)} document {index + 1}" if isinstance(path, Path) else path
    if not isinstance(document, dict) or "kind" not in document or "apiVersion" not in document:
        errors.append(f"{where}: not a Kubernetes object (apiVersion and kind are required)")
        return None
    key = (document["apiVersion"], document["kind"])
    for version in KUBERNETES_VERSIONS:
        if key in OWN_SCHEMAS:
            validator = own_validator(OWN_SCHEMAS[key], version)
            for error in sorted(validator.iter_errors(document), key=lambda e: list(e.path)):
                field = ".".join(str(part) for part in error.path) or "(root)"
                errors.append(f"{where} ({key[1]}, Kubernetes {version}): {field}: {error.message}")
        else:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError as error:
                errors.append(f"{where}: no schema: {error.message}")
                return key
            except kubernetes_validate.ValidationError as error:
                field = ".".join(str(part) for part in error.path) or "(root)"
                errors.append(f"{where} ({key[1]}, Kubernetes {version}): {field}: {error.message}")
    return key


def check_kustomization(path, document, errors):
    directory = path.parent
    listed = set()
    for resource in document.get("resources", []):
        target = directory / resource
        listed.add(target.resolve())
        # A directory is another kustomization (an overlay's base).
        if target.is_dir() and (target / "kustomization.yaml").is_file():
            continue
        if not target.is_file():
            errors.append(f"{path.relative_to(ROOT)}: resource {resource} does not exist")
    for manifest in sorted(directory.glob("*.yaml")):
        relative = str(manifest.relative_to(ROOT))
        if manifest == path or relative in NOT_IN_KUSTOMIZATION:
            continue
        if manifest.resolve() not in listed:
            errors.append(f"{path.relative_to(ROOT)}: {manifest.name} is not listed in resources")


def check_dashboards(errors):
    schema = json.loads((SCHEMAS / "grafana-dashboard.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    dashboards = sorted((ROOT / "dashboards").glob("*.json"))
    for path in dashboards:
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            errors.append(f"{path.relative_to(ROOT)}: not JSON: {error}")
            continue
        for error in validator.iter_errors(document):
            field = ".".join(str(part) for part in error.path) or "(root)"
            errors.append(f"{path.relative_to(ROOT)}: {field}: {error.message}")
    return len(dashboards)


def kustomized(directory, errors):
    """The objects `kubectl apply -k directory` creates: its resources with the kustomization's
    namespace, labels (metadata only, as `labels` without includeSelectors does) and images."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization.get("resources", []):
        if (directory / resource).is_dir():
            continue  # a base, read on its own
        for document in yaml.safe_load_all((directory / resource).read_text()):
            if document is None:
                continue
            document = copy.deepcopy(document)
            metadata = document.setdefault("metadata", {})
            if "namespace" in kustomization:
                metadata["namespace"] = kustomization["namespace"]
            for group in kustomization.get("labels", []):
                if group.get("includeSelectors") or group.get("includeTemplates"):
                    errors.append(f"{directory.name}/kustomization.yaml: labels beyond metadata are not compared")
                metadata.setdefault("labels", {}).update(group["pairs"])
            for image in kustomization.get("images", []):
                spec = document.get("spec", {}).get("template", {}).get("spec", {})
                for container in spec.get("containers", []):
                    if container.get("image") == image["name"]:
                        name = image.get("newName", image["name"])
                        container["image"] = f"{name}:{image['newTag']}"
            objects.append(document)
    return objects


def object_key(document):
    return (document.get("apiVersion"), document.get("kind"), document.get("metadata", {}).get("name"))


def render_chart(values, errors, where):
    """The chart's objects for `values` (a dict), or None when Helm refused them."""
    chart = helm_python.Chart.load(CHART)
    try:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm_python.HelmError as error:
        errors.append(f"{where}: Helm refused to render: {error}")
        return None
    objects = []
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        try:
            objects.extend(d for d in yaml.safe_load_all(text) if d is not None)
        except yaml.YAMLError as error:
            errors.append(f"{where}: {template} renders invalid YAML: {error}")
    return objects


def env_of(objects, deployment_name):
    for document in objects:
        if object_key(document) == ("apps/v1", "Deployment", deployment_name):
            container = document["spec"]["template"]["spec"]["containers"][0]
            return {entry["name"]: entry for entry in container.get("env", [])}, container
    return {}, {}


def check_chart_defaults(objects, errors):
    """The chart with default values renders exactly what deploy/ and keda/ apply."""
    expected = {}
    for name in DEFAULT_DIRS:
        for document in kustomized(ROOT / name, errors):
            if object_key(document) not in NOT_IN_CHART:
                expected[object_key(document)] = document
    actual = {}
    for document in objects:
        document = copy.deepcopy(document)
        labels = document.get("metadata", {}).get("labels", {})
        for label in HELM_LABELS:
            labels.pop(label, None)
        actual[object_key(document)] = document
    for key in sorted(set(expected) - set(actual), key=str):
        errors.append(f"chart defaults: {key} is in deploy/ or keda/ but not rendered")
    for key in sorted(set(actual) - set(expected), key=str):
        errors.append(f"chart defaults: {key} is rendered but not in deploy/ or keda/")
    for key in sorted(set(expected) & set(actual), key=str):
        for difference in differences(expected[key], actual[key], ""):
            errors.append(f"chart defaults: {key[1]} {key[2]}: {difference}")


def differences(expected, actual, path):
    if isinstance(expected, dict) and isinstance(actual, dict):
        for field in sorted(set(expected) | set(actual)):
            here = f"{path}.{field}" if path else field
            if field not in actual:
                yield f"{here}: missing from the chart (kustomize: {expected[field]!r})"
            elif field not in expected:
                yield f"{here}: only in the chart ({actual[field]!r})"
            else:
                yield from differences(expected[field], actual[field], here)
    elif isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for index, (left, right) in enumerate(zip(expected, actual)):
            yield from differences(left, right, f"{path}[{index}]")
    elif expected != actual:
        yield f"{path}: kustomize {expected!r}, chart {actual!r}"


# What each representative value set must render, beyond valid objects.
def expect_sentinel(objects, errors):
    env, container = env_of(objects, RELEASE)
    url = env.get("REDIS_URL", {}).get("value")
    wanted = (
        "redis+sentinel://:$(REDIS_PASSWORD)@"
        "redis-node-0.redis-headless.livekit.svc.cluster.local:26379,"
        "redis-node-1.redis-headless.livekit.svc.cluster.local:26379,"
        "redis-node-2.redis-headless.livekit.svc.cluster.local:26379"
        "/mymaster/0?wait_replicas=1&sentinel_password=$(REDIS_SENTINEL_PASSWORD)"
    )
    if url != wanted:
        errors.append(f"ci/sentinel-values.yaml: REDIS_URL {url!r}, expected {wanted!r}")
    names = list(env)
    if not names.index("REDIS_PASSWORD") < names.index("REDIS_URL"):
        errors.append("ci/sentinel-values.yaml: REDIS_PASSWORD must precede REDIS_URL for $(...) expansion")
    if "--kube-scale=livekit/livekit-egress" not in container.get("args", []):
        errors.append("ci/sentinel-values.yaml: serve is not given --kube-scale")
    kinds = {object_key(d)[:2] for d in objects}
    for kind in [("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
                 ("monitoring.coreos.com/v1", "ServiceMonitor"), ("v1", "ConfigMap")]:
        if kind not in kinds:
            errors.append(f"ci/sentinel-values.yaml: no {kind[1]} rendered")
    for document in objects:
        if object_key(document)[1] == "Role":
            rules = document["rules"]
            if rules != [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                          "resourceNames": ["livekit-egress"], "verbs": ["get", "patch"]}]:
                errors.append(f"ci/sentinel-values.yaml: the Role grants {rules}")
        if object_key(document)[1] == "ConfigMap":
            shipped = json.loads((ROOT / "dashboards" / "egress-scaler.json").read_text())
            if json.loads(document["data"]["egress-scaler.json"]) != shipped:
                errors.append("ci/sentinel-values.yaml: the dashboard ConfigMap differs from dashboards/")
        if object_key(document)[1] == "ScaledObject" and document["spec"]["scaleTargetRef"]["name"] != "livekit-egress":
            errors.append("ci/sentinel-values.yaml: the ScaledObject does not scale livekit-egress")


def expect_prometheus(objects, errors):
    env, container = env_of(objects, "recordings-scaler")
    facts = {
        "REDIS_URL": "rediss://egress-scaler:$(REDIS_PASSWORD)@redis-master.livekit.svc.cluster.local:6379/2",
        "EGRESS_SCALER_PROMETHEUS_URL": "http://prometheus-operated.monitoring.svc:9090",
        "EGRESS_SCALER_COST": "room_composite=2,web=2.5",
        "EGRESS_SCALER_QUEUE": "default,priority",
        "EGRESS_SCALER_WARM_POOL": "1",
        "EGRESS_SCALER_MAX_REPLICAS": "20",
    }
    for name, value in facts.items():
        if env.get(name, {}).get("value") != value:
            errors.append(f"ci/prometheus-values.yaml: {name} is {env.get(name)!r}, expected {value!r}")
    if "EGRESS_SCALER_EGRESS_DNS" in env:
        errors.append("ci/prometheus-values.yaml: two fleet sources")
    for document in objects:
        key = object_key(document)
        if key[1] == "ScaledObject":
            trigger = document["spec"]["triggers"][0]
            if (trigger["type"], trigger["metadata"]["queue"], document["spec"]["maxReplicaCount"]) != ("external", "priority", 20):
                errors.append(f"ci/prometheus-values.yaml: ScaledObject trigger {trigger}")
        if key[1] == "Certificate" and document["spec"]["issuerRef"] != {"name": "internal-ca", "kind": "ClusterIssuer"}:
            errors.append(f"ci/prometheus-values.yaml: {key[2]} is not issued by the ClusterIssuer")
        if key[1] in ("Issuer", "PodDisruptionBudget") or key == ("v1", "Service", "egress-metrics"):
            errors.append(f"ci/prometheus-values.yaml: {key} should not be rendered")


def expect_plain(objects, errors):
    env, _ = env_of(objects, RELEASE)
    if env.get("REDIS_URL", {}).get("value") != "redis://redis.livekit.svc.cluster.local:6379/0":
        errors.append(f"ci/plain-redis-values.yaml: REDIS_URL {env.get('REDIS_URL')!r}")
    if env.get("EGRESS_SCALER_EGRESS_METRICS", {}).get("value") != "http://10.0.0.11:9090/,http://10.0.0.12:9090/":
        errors.append("ci/plain-redis-values.yaml: static egress metrics URLs not passed")
    for document in objects:
        if object_key(document)[0] in ("keda.sh/v1alpha1", "cert-manager.io/v1") or object_key(document)[1] == "ServiceAccount":
            errors.append(f"ci/plain-redis-values.yaml: {object_key(document)} should not be rendered")


def check_chart_kube_scale(errors):
    """`kubeScale.enabled` grants what the overlay deploy/kube-scale/ grants: the same Role rules
    for the same egress Deployment, and the same flag."""
    overlay = {object_key(d)[1]: d for d in kustomized(ROOT / "deploy/kube-scale", errors) if d.get("kind") in ("Role", "RoleBinding")}
    objects = render_chart({"kubeScale": {"enabled": True, "deployment": "egress"}}, errors, "kubeScale.enabled") or []
    chart = {object_key(d)[1]: d for d in objects if d.get("kind") in ("Role", "RoleBinding")}
    if overlay.get("Role", {}).get("rules") != chart.get("Role", {}).get("rules"):
        errors.append("chart kubeScale.enabled: its Role's rules differ from deploy/kube-scale/role.yaml")
    if "RoleBinding" not in chart or "RoleBinding" not in overlay:
        errors.append("chart kubeScale.enabled or deploy/kube-scale/: no RoleBinding")
    _, container = env_of(objects, "egress-scaler")
    if not any(arg.startswith("--kube-scale=") and arg.endswith("/egress") for arg in container.get("args", [])):
        errors.append("chart kubeScale.enabled: serve is not given --kube-scale=<namespace>/egress")


EXPECTATIONS = {
    "sentinel-values.yaml": expect_sentinel,
    "prometheus-values.yaml": expect_prometheus,
    "plain-redis-values.yaml": expect_plain,
}


def check_chart(errors):
    """Lints and renders the chart; returns how many value sets rendered valid objects."""
    report = helm_python.lint(CHART, strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    for message in report["messages"]:
        if message["severity"] >= 2:  # warnings and errors; "icon is recommended" is info
            errors.append(f"helm lint: {message['path']}: {message['error']}")
    for error in report["errors"]:
        errors.append(f"helm lint: {error}")
    shipped = ROOT / "dashboards" / "egress-scaler.json"
    if (CHART / "dashboards" / "egress-scaler.json").read_bytes() != shipped.read_bytes():
        errors.append("charts/egress-scaler/dashboards/egress-scaler.json differs from dashboards/egress-scaler.json")
    value_sets = [("default values", {})] + [
        (f"ci/{path.name}", yaml.safe_load(path.read_text()) or {})
        for path in sorted((CHART / "ci").glob("*.yaml"))
    ]
    rendered = 0
    for where, values in value_sets:
        objects = render_chart(values, errors, where)
        if objects is None:
            continue
        rendered += 1
        for index, document in enumerate(objects):
            check_document(f"chart ({where}) object {index + 1}", index, document, errors)
        if where == "default values":
            check_chart_defaults(objects, errors)
            check_chart_kube_scale(errors)
        elif where.removeprefix("ci/") in EXPECTATIONS:
            EXPECTATIONS[where.removeprefix("ci/")](objects, errors)
        else:
            errors.append(f"{where}: no expectations written for it in validate_manifests.py")
    for path in sorted(INVALID_VALUES.glob("*.yaml")):
        text = path.read_text()
        reason = text.splitlines()[0].removeprefix("# rejected:").strip()
        where = str(path.relative_to(ROOT))
        try:
            helm_python.Chart.load(CHART).render(
                yaml.safe_load(text) or {}, name=RELEASE, namespace=NAMESPACE, is_install=True
            )
        except helm_python.HelmError as error:
            if reason not in str(error):
                errors.append(f"{where}: rejected, but not for {reason!r}: {error}")
            continue
        errors.append(f"{where}: Helm rendered it; the chart must reject it ({reason})")
    return rendered


def main():
    errors = []
    documents = 0
    for name in MANIFEST_DIRS:
        for path in sorted((ROOT / name).glob("*.yaml")):
            try:
                loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            except yaml.YAMLError as error:
                errors.append(f"{path.relative_to(ROOT)}: not YAML: {error}")
                continue
            for index, document in enumerate(loaded):
                documents += 1
                key = check_document(path, index, document, errors)
                if key == ("kustomize.config.k8s.io/v1beta1", "Kustomization"):
                    check_kustomization(path, document, errors)
    dashboards = check_dashboards(errors)
    renders = check_chart(errors)
    for error in errors:
        print(f"ERROR {error}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) in the operator files.", file=sys.stderr)
        return 1
    versions = " and ".join(KUBERNETES_VERSIONS)
    print(f"{documents} manifests valid for Kubernetes {versions}; {dashboards} dashboard(s) valid.")
    print(
        f"Helm chart ({helm_python.helm_sdk_version()}): lint clean, {renders} value sets render "
        f"valid objects, the defaults render deploy/ and keda/, "
        f"{len(list(INVALID_VALUES.glob('*.yaml')))} malformed value sets rejected."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
