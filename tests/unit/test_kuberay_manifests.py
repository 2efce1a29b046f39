"""The KubeRay manifests (deployments/kuberay/), checked offline.

Kubernetes' own objects, and every pod template inside the custom resources, are validated
by kubernetes-validate against the Kubernetes API schema (strict: unknown fields fail). The
ray.io resources are validated against KubeRay's own CRDs, vendored verbatim in
deployments/kuberay/crds (KubeRay v1.6.2, pinned by sha256), read as the API server with
strict field validation (kubectl's default) would: a field the server would prune is an
error. Then what ties the files to dgpt: the same head spec in both custom resources, the
digits app as deployments/digits.yaml has it, and ports, paths and settings as dgpt reads them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dgpt.config import load_settings, node_ports
from dgpt.head.paths import head_paths

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deployments" / "kuberay"
CRDS = KUBERAY / "crds"
KUBERNETES_VERSION = "1.33.0"
#: The schema version kubernetes-validate answers it validated against.
SCHEMA_VERSION = "1.33"
CRD_GROUP = "ray.io"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = _documents()


def _is_custom(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] == CRD_GROUP


# --- KubeRay's CRDs as JSON Schema --------------------------------------------------------

#: Kept as they are: OpenAPI v3.0 and JSON Schema mean the same by them.
_SAME_KEYWORDS = ("type", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum",
                  "multipleOf", "minItems", "maxItems", "uniqueItems", "minProperties",
                  "maxProperties", "required", "default")


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    """One node of a CRD's structural schema as JSON Schema, refusing what the server prunes.

    An object's fields outside `properties` are pruned by the API server, and reported as
    unknown fields under strict field validation: here they fail. `nullable` admits null,
    int-or-string is already an `anyOf`, a `set` list wants unique items, and a `map` list
    and CEL rules keep their x-kubernetes keywords, which `_VALIDATOR` checks.
    """
    out = {k: node[k] for k in _SAME_KEYWORDS if k in node}
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if node.get(exclusive) is True:  # a flag on the bound in OpenAPI v3.0, the bound itself here
            out[exclusive] = out.pop(bound)
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_strict(n) for n in node[key]]
    if "not" in node:
        out["not"] = _strict(node["not"])
    if "properties" in node:
        out["properties"] = {name: _strict(n) for name, n in node["properties"].items()}
    if "items" in node:
        out["items"] = _strict(node["items"])
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = _strict(extra)
    elif extra is not None:
        out["additionalProperties"] = extra
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    elif node.get("x-kubernetes-list-type") == "map":
        out["x-kubernetes-list-map-keys"] = node["x-kubernetes-list-map-keys"]
    if "x-kubernetes-validations" in node:
        out["x-kubernetes-validations"] = node["x-kubernetes-validations"]
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """A `map` list: the API server refuses two items with the same keys (defaults filled in)."""
    if not validator.is_type(instance, "array"):
        return
    fields = schema.get("items", {}).get("properties", {})
    seen: dict[tuple[Any, ...], int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, fields.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {i} have the same {dict(zip(keys, key, strict=True))}: "
                f"the keys {keys} must be unique in this list")
        seen.setdefault(key, i)


def _cel_rules(validator: Any, rules: list[dict[str, str]], instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """A field with CEL rules is refused: nothing here evaluates CEL, and it must not pass unchecked.

    Rules on `oldSelf` alone apply to updates, never to a create, so they are no reason to refuse.
    """
    on_create = [r["message"] for r in rules if "oldSelf" not in r["rule"]]
    if on_create:
        yield jsonschema.ValidationError(
            f"this field carries KubeRay's CEL rules {on_create}, which this offline check "
            "cannot evaluate: leave it unset, or check the manifest with `kubectl apply --dry-run=server`")


_VALIDATOR = jsonschema.validators.extend(jsonschema.Draft202012Validator, {
    "x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-validations": _cel_rules})


def _pinned_sums() -> dict[str, str]:
    sums = {}
    for line in (CRDS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the JSON Schema of that served version of a vendored CRD."""
    schemas = {}
    for name in _pinned_sums():
        crd = yaml.load((CRDS / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML: libyaml when present
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version["served"]:
                continue
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schema = _strict(version["schema"]["openAPIV3Schema"])
            # The root as the API server has it: apiVersion and kind are this CRD's, metadata
            # is an ObjectMeta (checked by kubernetes-validate), status is KubeRay's to write.
            schema["properties"].pop("status")
            schema["properties"]["apiVersion"] = {"const": api_version}
            schema["properties"]["kind"] = {"const": kind}
            schema["properties"]["metadata"] = {"type": "object"}
            schema["required"] = ["apiVersion", "kind", "metadata"]
            schemas[(api_version, kind)] = schema
    return schemas


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    """What KubeRay's CRD refuses in a ray.io resource, each as `json path: message`."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schemas = _crd_schemas()
    if key not in schemas:
        return [f"$: no vendored KubeRay CRD serves apiVersion {key[0]!r} kind {key[1]!r}; "
                f"served: {sorted(schemas)}"]
    return [f"{e.json_path}: {e.message}" for e in _VALIDATOR(schemas[key]).iter_errors(doc)]


def _metadata_as_kubernetes_object(doc: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _cluster_specs() -> list[dict[str, Any]]:
    return [_one("RayCluster")["spec"], _one("RayService")["spec"]["rayClusterConfig"]]


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


def _as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}


def test_the_manifests_hold_what_the_readme_promises() -> None:
    kinds = sorted(d["kind"] for _, d in DOCS)
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayService", "Service", "Service"]


def test_the_vendored_crds_are_kuberays_as_pinned() -> None:
    sums = _pinned_sums()
    assert sorted(sums) == ["ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"]
    for name, digest in sums.items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == digest, (
            f"deployments/kuberay/crds/{name} is not the file pinned in SHA256SUMS: "
            "vendor KubeRay's file unchanged (crds/README.md says how)")
    assert (CRDS / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert set(_crd_schemas()) == {(f"ray.io/{v}", k) for k in ("RayCluster", "RayJob", "RayService")
                                   for v in ("v1", "v1alpha1")}


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in DOCS if not _is_custom(d)],
                         ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_kubernetes_objects_are_valid(name: str, doc: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == SCHEMA_VERSION  # raises on an invalid object


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in DOCS if _is_custom(d)],
                         ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_kuberay_resources_match_kuberays_crds_and_their_pods_kubernetes(name: str, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1"  # v1alpha1 is served, but deprecated upstream
    assert _crd_errors(doc) == []
    assert kubernetes_validate.validate(_metadata_as_kubernetes_object(doc), KUBERNETES_VERSION,
                                        strict=True) == SCHEMA_VERSION
    templates = _pod_templates(doc)
    assert templates, "a head pod template at least"
    for template in templates:
        assert kubernetes_validate.validate(_as_pod_template(template), KUBERNETES_VERSION, strict=True) == SCHEMA_VERSION


def _broken(change: Any) -> list[str]:
    bad = copy.deepcopy(_one("RayCluster"))
    change(bad["spec"])
    return _crd_errors(bad)


def test_kuberays_crds_refuse_mistakes_and_name_the_field() -> None:
    misspelt = _broken(lambda s: s.update(headGroupSpecs=s.pop("headGroupSpec")))
    assert sorted(misspelt) == ["$.spec: 'headGroupSpec' is a required property",
                                "$.spec: Additional properties are not allowed ('headGroupSpecs' was unexpected)"]
    assert _broken(lambda s: s["authOptions"].update(mode="password")) == [
        "$.spec.authOptions.mode: 'password' is not one of ['disabled', 'token']"]
    head = "$.spec.headGroupSpec.template.spec.containers[0]"
    assert _broken(lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(resourcez={})) == [
        f"{head}: Additional properties are not allowed ('resourcez' was unexpected)"]
    wrong_type = _broken(lambda s: s["headGroupSpec"]["rayStartParams"].update(port=6379))
    assert wrong_type == ["$.spec.headGroupSpec.rayStartParams.port: 6379 is not of type 'string'"]
    # A `map` list keyed by (containerPort, protocol): protocol defaults to TCP.
    twice = _broken(lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append(
        {"name": "again", "containerPort": 6379, "protocol": "TCP"}))
    assert len(twice) == 1 and twice[0].startswith(f"{head}.ports: items 1 and 8 have the same")
    assert "'containerPort': 6379, 'protocol': 'TCP'" in twice[0]
    # A field guarded by CEL rules is refused rather than passed unchecked.
    cel = _broken(lambda s: s.update(managedBy="ray.io/kuberay-operator"))
    assert len(cel) == 1 and cel[0].startswith("$.spec.managedBy: this field carries KubeRay's CEL rules")
    status = copy.deepcopy(_one("RayCluster")) | {"status": {"state": "ready"}}
    assert _crd_errors(status) == ["$: Additional properties are not allowed ('status' was unexpected)"]
    assert _crd_errors(copy.deepcopy(_one("RayCluster")) | {"kind": "RayClusters"})[0].startswith(
        "$: no vendored KubeRay CRD serves apiVersion 'ray.io/v1' kind 'RayClusters'")


def test_openapi_keywords_that_json_schema_spells_differently_are_translated() -> None:
    # None of KubeRay v1.6.2's CRDs uses these; a later one that does must still be checked.
    positive = _VALIDATOR(_strict({"type": "integer", "minimum": 0, "exclusiveMinimum": True}))
    assert not positive.is_valid(0) and positive.is_valid(1)
    maybe = _VALIDATOR(_strict({"type": "object", "nullable": True, "properties": {"a": {"type": "string"}}}))
    assert maybe.is_valid(None) and maybe.is_valid({"a": "x"}) and not maybe.is_valid({"b": "x"})


def test_kubernetes_validate_refuses_mistakes_in_pods_and_metadata() -> None:
    template = copy.deepcopy(_one("RayCluster")["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["livenessProbe"]["tcpSocket"]["hostz"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="hostz"):
        kubernetes_validate.validate(_as_pod_template(template), KUBERNETES_VERSION, strict=True)
    bad = copy.deepcopy(_one("RayCluster"))
    bad["metadata"]["annotation"] = bad["metadata"].pop("annotations")
    with pytest.raises(kubernetes_validate.ValidationError, match="annotation"):
        kubernetes_validate.validate(_metadata_as_kubernetes_object(bad), KUBERNETES_VERSION, strict=True)


def test_both_custom_resources_run_the_same_head_only_cluster_with_token_auth() -> None:
    cluster, service = _cluster_specs()
    assert cluster == service
    assert cluster["workerGroupSpecs"] == []  # every worker is a donor outside the cluster
    assert cluster["authOptions"] == {"mode": "token", "secretName": "dgpt-ray-auth"}
    for doc in (_one("RayCluster"), _one("RayService")):
        assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


def test_the_rayservice_serves_the_digits_app_as_deployments_has_it() -> None:
    served = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])
    assert served == yaml.safe_load((ROOT / "deployments" / "digits.yaml").read_text())
    assert served["applications"][0]["import_path"] == "deployments.digits.app:app"


def _head(spec: dict[str, Any]) -> dict[str, Any]:
    (head,) = [c for c in spec["headGroupSpec"]["template"]["spec"]["containers"] if c["name"] == "ray-head"]
    return head


def test_the_head_runs_dgpt_with_its_settings_and_the_token_where_dgpt_reads_it() -> None:
    spec = _one("RayCluster")["spec"]
    head = _head(spec)
    assert head["args"][-1].endswith("exec dgpt head start --foreground")
    config = _one("ConfigMap", "dgpt-head-settings")["data"]
    settings = load_settings(env=config)  # dgpt itself accepts every value
    token_mount = next(m for m in head["volumeMounts"] if m["name"] == "ray-auth")
    assert Path(token_mount["mountPath"]) == head_paths(settings.home)["ray_token"]
    assert token_mount["readOnly"] and token_mount["subPath"] == "auth_token"
    volumes = {v["name"]: v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert volumes["ray-auth"]["secret"]["secretName"] == spec["authOptions"]["secretName"]
    state = next(m for m in head["volumeMounts"] if m["name"] == "state")
    assert Path(state["mountPath"]) == settings.home
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == _one("PersistentVolumeClaim")["metadata"]["name"]
    # The ports KubeRay and the Services are told are those dgpt's head listens on.
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    fixed = node_ports(settings.ray_node_port_base)
    assert (ports["gcs-server"], ports["dashboard"], ports["serve"], ports["api"]) == (
        settings.ray_port, settings.dashboard_port, settings.http_port, settings.api_port)
    assert (ports["node-manager"], ports["object-manager"], ports["client"]) == (
        fixed["node manager"], fixed["object manager"], fixed["Ray client server"])
    params = spec["headGroupSpec"]["rayStartParams"]
    assert int(params["port"]) == settings.ray_port and int(params["dashboard-port"]) == settings.dashboard_port
    assert int(params["dashboard-agent-listen-port"]) == fixed["dashboard agent HTTP"]
    assert float(params["num-cpus"]) == settings.head_cpus == 0  # no user work on the head
    # The API speaks HTTPS in the pod (it listens beyond loopback): the probes must too.
    assert settings.tls_enabled
    for doc in (_one("RayCluster"), _one("RayService")):
        probes = [p["httpGet"] for p in (_head(doc["spec"].get("rayClusterConfig", doc["spec"]))
                                         .get(k) for k in ("startupProbe", "readinessProbe")) if p and "httpGet" in p]
        assert probes and all(g["port"] == "api" and g["scheme"] == "HTTPS" for g in probes), probes


def test_the_head_container_runs_the_overlay_with_net_admin_and_the_tun_device() -> None:
    settings = load_settings(env=_one("ConfigMap", "dgpt-head-settings")["data"])
    assert settings.overlay_enabled  # `dgpt head start` brings the WireGuard interface up itself
    for spec in _cluster_specs():
        pod = spec["headGroupSpec"]["template"]["spec"]
        assert "initContainers" not in pod and [c["name"] for c in pod["containers"]] == ["ray-head"]
        head = _head(spec)
        assert head["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
        assert "/dev/net/tun" in [m["mountPath"] for m in head["volumeMounts"]]
        assert {"containerPort": settings.overlay_port, "name": "wireguard", "protocol": "UDP"} in head["ports"]


def _commands(node: Any) -> list[list[str]]:
    """Every container's command line (command + args) anywhere in a document."""
    out: list[list[str]] = []
    if isinstance(node, dict):
        if "image" in node and ("command" in node or "args" in node):
            out.append([*node.get("command", []), *node.get("args", [])])
        for value in node.values():
            out += _commands(value)
    elif isinstance(node, list):
        for value in node:
            out += _commands(value)
    return out


def _env_names(node: Any) -> set[str]:
    if isinstance(node, dict):
        names = {e["name"] for e in node.get("env", []) if isinstance(e, dict) and "name" in e}
        return names | {n for v in node.values() for n in _env_names(v)}
    if isinstance(node, list):
        return {n for v in node for n in _env_names(v)}
    return set()


def test_every_dgpt_command_and_setting_the_manifests_use_exists() -> None:
    from typer.testing import CliRunner

    from dgpt.cli.main import app
    from dgpt.config import ENV_PREFIX, Settings

    invocations = []
    for _, doc in DOCS:
        for argv in _commands(doc):
            for part in " ".join(argv).split(";"):
                words = shlex.split(part.strip())
                if "dgpt" in words:
                    invocations.append(words[words.index("dgpt") + 1:])
    assert ["head", "start", "--foreground"] in invocations
    for words in invocations:
        result = CliRunner().invoke(app, [*[w for w in words if not w.startswith("-")], "--help"])
        assert result.exit_code == 0, f"`dgpt {' '.join(words)}`: {result.output[-500:]}"
        flags = [w.split("=")[0] for w in words if w.startswith("--")]
        assert all(f in result.output for f in flags), f"`dgpt {' '.join(words)}`: unknown flag among {flags}"
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    used = _env_names([d for _, d in DOCS]) | set(_one("ConfigMap", "dgpt-head-settings")["data"])
    dgpt_vars = {n for n in used if n.startswith(ENV_PREFIX)}
    assert dgpt_vars and dgpt_vars <= fields, f"not dgpt settings: {sorted(dgpt_vars - fields)}"


def test_the_image_the_manifests_run_is_the_one_the_dockerfile_builds() -> None:
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for spec in _cluster_specs() for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    assert images == {f"dgpt-head:{version}"}
    assert f"-t dgpt-head:{version} ." in dockerfile
    for tool in ("wireguard-go", "wireguard-tools", "nftables", "iproute2"):  # the overlay's
        assert tool in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert '-c constraints.txt ".[ml]"' in dockerfile  # the pinned versions, CPU torch


def test_services_reach_the_head_pod_on_ports_it_opens() -> None:
    spec = _one("RayCluster")["spec"]
    pod = spec["headGroupSpec"]["template"]
    labels = {**pod["metadata"]["labels"], "ray.io/node-type": "head"}  # KubeRay adds the node type
    opened = {(p["containerPort"], p.get("protocol", "TCP"))
              for c in [*pod["spec"]["containers"], *pod["spec"].get("initContainers", [])] for p in c.get("ports", [])}
    services = [d for _, d in DOCS if d["kind"] == "Service"]
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert (port["targetPort"], port["protocol"]) in opened, (svc["metadata"]["name"], port)
    exposed = {p["targetPort"] for svc in services for p in svc["spec"]["ports"]}
    # Ray's own ports stay inside: donors reach them through the overlay.
    assert not exposed & {6379, 6380, 6381}
