"""Offline validation of the operator files (run through scripts/validate-manifests).

Kubernetes kinds are checked, strictly (unknown fields are errors), against the schemas that
kubernetes-validate bundles, for the oldest Kubernetes release the manifests support and the
newest bundled one. KEDA, cert-manager and kustomize kinds are checked against the schemas in
scripts/schemas/, which reuse the bundled Kubernetes definitions (ObjectMeta, the HPA
behavior), so the ScaledObject's behavior block is checked exactly like an HPA's.
"""

import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "scripts" / "schemas"
MANIFEST_DIRS = ["deploy", "deploy/kube-scale", "keda"]
# 1.33 is the first release whose HPA takes behavior.scaleUp.tolerance (keda/scaledobject.yaml).
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]
OWN_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("cert-manager.io/v1", "Issuer"): "cert-manager-issuer.json",
    ("cert-manager.io/v1", "Certificate"): "cert-manager-certificate.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization.json",
}
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
    where = f"{path.relative_to(ROOT)} document {index + 1}"
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
    for error in errors:
        print(f"ERROR {error}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) in the operator files.", file=sys.stderr)
        return 1
    versions = " and ".join(KUBERNETES_VERSIONS)
    print(f"{documents} manifests valid for Kubernetes {versions}; {dashboards} dashboard(s) valid.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
