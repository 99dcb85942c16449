"""deploy/kubernetes validates offline against the published schemas, and its parts fit together.

- Core kinds (Deployment, Service, ConfigMap, RBAC, PersistentVolumeClaim) are checked with
  kubernetes-validate, strict (an unknown field is an error), against each Kubernetes minor
  version in K8S_VERSIONS.
- Custom resources (InferencePool, InferenceObjective, HTTPRoute, Gateway) are checked against
  the `openAPIV3Schema` of their CRD in deploy/kubernetes/crds/, the upstream files verbatim at
  the versions in CRDS (their git blob ids are checked). A custom kind with no CRD there fails.
  The API server does more than JSON Schema does, and so does `crd_problems`:
    * unknown fields: Kubernetes prunes fields a structural schema does not declare, silently
      on a plain `kubectl apply`, as an error under `--validate=strict` (server-side field
      validation). `unknown_fields` walks the schema's `properties` (and
      `additionalProperties`, `x-kubernetes-preserve-unknown-fields`) the way pruning does and
      reports every field it would drop;
    * `metadata` is the apiserver's ObjectMeta, checked with kubernetes-validate's definition;
    * defaults (`default:`) are applied before the rules below, as the apiserver does;
    * `x-kubernetes-list-type` set / map uniqueness;
    * CEL rules (`x-kubernetes-validations`): each rule reached by our manifests must have a
      Python translation in CEL_RULES, keyed by its exact text, or the test fails (a rule added
      by a CRD update, or reached by a new field, then needs translating). Transition rules
      (oldSelf) apply to updates only and are skipped.
  Everything else (types, enums, patterns, lengths, required, min/max) is jsonschema's.
- The endpoint picker's EndpointPickerConfig (in the ConfigMap of epp.yaml) is no Kubernetes
  object and upstream publishes no schema for it: EPP_CONFIG_SCHEMA transcribes its Go types
  (decoded strictly by the picker), and plugin types and parameters are checked against
  llm-d-router's source at the targeted version.
- Cross-references: the pool selects the Deployment's pods on its container port, names the
  picker's Service and port, the route and objectives name the pool, the grace period covers
  --shutdown-timeout, the probes hit /health and /ready on the serving port, keys come from the
  Secret, /metrics stays open for the picker.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
CRD_DIR = K8S / "crds"

# The oldest and the newest Kubernetes minor release upstream supports as this is written
# (August 2026: 1.34 to 1.37); kubernetes-validate 1.37.0 bundles both.
K8S_VERSIONS = ("1.34", "1.37")

# The CRDs, verbatim: file -> (git blob id, source repository, tag, commit, path there).
CRDS = {
    "inference.networking.k8s.io_inferencepools.yaml": (
        "363f7dfad904874cdb4140ff0fb470ad9d248793", "kubernetes-sigs/gateway-api-inference-extension", "v1.5.0",
        "df9f8909fe06fe2dfd4a6fc0bd0c01a0acabf849", "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"),
    "llm-d.ai_inferenceobjectives.yaml": (
        "e072d4783e4ea629b9f1c4e1e56406dbdccf5d9a", "llm-d/llm-d-router", "v0.10.0",
        "71f4f0999f95b96c49a9d0c4afbd18dfdb943c26", "config/crd/bases/llm-d.ai_inferenceobjectives.yaml"),
    "gateway.networking.k8s.io_httproutes.yaml": (
        "9439f4e5855d347a26675839530c57daa5072bbd", "kubernetes-sigs/gateway-api", "v1.5.1",
        "e7677b70ae75d14a4448fba94870e7deea6cf0ad", "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"),
    "gateway.networking.k8s.io_gateways.yaml": (
        "ebcd948aa2e9dd7d8dd438c9fbdc693306f517eb", "kubernetes-sigs/gateway-api", "v1.5.1",
        "e7677b70ae75d14a4448fba94870e7deea6cf0ad", "config/crd/standard/gateway.networking.k8s.io_gateways.yaml"),
}
EPP_IMAGE = "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"
LLMD_ROUTER_COMMIT = "71f4f0999f95b96c49a9d0c4afbd18dfdb943c26"


# -- loading ------------------------------------------------------------------------------------

def manifest_files() -> list[Path]:
    """Every manifest: the top level (what `kubectl apply -f deploy/kubernetes/` applies) and
    examples/; not crds/."""
    return sorted(K8S.glob("*.yaml")) + sorted((K8S / "examples").glob("*.yaml"))


def load_docs() -> list[tuple[str, dict]]:
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((str(path.relative_to(K8S)), doc))
    return out


DOCS = load_docs()


def find(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def load_crds() -> dict[tuple[str, str, str], dict]:
    """(group, kind, version) -> that version's entry (served, schema.openAPIV3Schema)."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            assert crd["kind"] == "CustomResourceDefinition", path
            for version in crd["spec"]["versions"]:
                out[(crd["spec"]["group"], crd["spec"]["names"]["kind"], version["name"])] = version
    return out


CRD_VERSIONS = load_crds()


# -- custom resources against their CRD ---------------------------------------------------------

def _definitions(version: str):
    return kv_utils.schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version)


def object_meta_validator(version: str = K8S_VERSIONS[-1]):
    defs = _definitions(version)
    registry = Resource.from_contents(defs) @ Registry()
    ref = {"$ref": defs["$id"] + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(ref, registry=registry)


def to_json_schema(node):
    """An openAPIV3Schema node as JSON Schema: `nullable` widens the type, the Kubernetes
    extensions go (their meaning is checked separately)."""
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for key in ("properties", "patternProperties"):
        if key in node:
            out[key] = {k: to_json_schema(v) for k, v in node[key].items()}
    return out


def unknown_fields(value, schema: dict, path: str) -> list[str]:
    """The fields Kubernetes would prune from `value` under `schema` (structural schema pruning):
    keys of an object not in its `properties`, unless `additionalProperties` or
    `x-kubernetes-preserve-unknown-fields` keeps them; an object schema with neither properties
    nor additionalProperties keeps none."""
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields") is True
        for key, sub in value.items():
            here = f"{path}.{key}"
            if props is not None and key in props:
                found += unknown_fields(sub, props[key], here)
            elif isinstance(extra, dict):
                found += unknown_fields(sub, extra, here)
            elif extra is True or keep:
                continue
            else:
                found.append(here)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def apply_defaults(value, schema: dict):
    """Structural defaulting, as the apiserver does before validation: a missing property with a
    `default` gets it (then defaulted in turn)."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    return value


def list_type_problems(value, schema: dict, path: str) -> list[str]:
    """x-kubernetes-list-type: `set` items and `map` items' keys must be unique."""
    found = []
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "set" and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            found.append(f"{path}: duplicate items in a list of type set")
        if kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(json.dumps(item.get(k)) for k in keys) for item in value if isinstance(item, dict)]
            if len(set(seen)) != len(seen):
                found.append(f"{path}: duplicate entries for keys {keys} in a list of type map")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                found += list_type_problems(item, schema["items"], f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                found += list_type_problems(value[key], sub, f"{path}.{key}")
    return found


# CEL rules our manifests reach, translated. `self` is the node the rule is on (after defaults);
# has(x.f) is `"f" in x`; `__namespace__` is CEL's escape of the field name `namespace`.

def _has(obj, key: str) -> bool:
    return isinstance(obj, dict) and key in obj


def _empty(obj, key: str) -> bool:
    return not _has(obj, key) or obj[key] == ""


DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _duration(text: str) -> float:
    """CEL duration(): Go's time.ParseDuration syntax."""
    if text in ("0", "+0", "-0"):
        return 0.0
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    if not body or DURATION.sub("", body):
        raise ValueError(f"invalid duration {text!r}")
    return sign * sum(float(n) * DURATION_UNITS[u] for n, u in DURATION.findall(body))


def _same_parent(p1, p2) -> bool:
    both_unset = _empty(p1, "namespace") and _empty(p2, "namespace")
    both_set = _has(p1, "namespace") and _has(p2, "namespace") and p1["namespace"] == p2["namespace"]
    return (p1.get("group") == p2.get("group") and p1.get("kind") == p2.get("kind")
            and p1.get("name") == p2.get("name") and (both_unset or both_set))


def _same_section(p1, p2) -> bool:
    both_unset = _empty(p1, "sectionName") and _empty(p2, "sectionName")
    both_set = _has(p1, "sectionName") and _has(p2, "sectionName") and p1["sectionName"] == p2["sectionName"]
    return both_unset or both_set


def _prefix_rewrite(filters, field: str) -> bool:
    return any(_has(f, field) and _has(f[field], "path") and f[field]["path"].get("type") == "ReplacePrefixMatch"
               and _has(f[field]["path"], "replacePrefixMatch") for f in filters)


def _exists_one(items, pred) -> bool:
    return sum(1 for i in items if pred(i)) == 1


def _single_prefix_match(rule) -> bool:
    m = rule.get("matches", [])
    return len(m) == 1 and _has(m[0], "path") and m[0]["path"].get("type") == "PathPrefix"


def _path_rule(check):
    return lambda s: check(s["value"]) if s.get("type") in ("Exact", "PathPrefix") else True


PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")

CEL_RULES = {
    # HTTPRoute spec.parentRefs
    "self.all(p1, self.all(p2, p1.group == p2.group && p1.kind == p2.kind && p1.name == p2.name && (((!has(p1.__namespace__) || p1.__namespace__ == '') && (!has(p2.__namespace__) || p2.__namespace__ == '')) || (has(p1.__namespace__) && has(p2.__namespace__) && p1.__namespace__ == p2.__namespace__ )) ? ((!has(p1.sectionName) || p1.sectionName == '') == (!has(p2.sectionName) || p2.sectionName == '')) : true))":  # noqa: E501
        lambda s: all(_empty(p1, "sectionName") == _empty(p2, "sectionName") for p1 in s for p2 in s
                      if _same_parent(p1, p2)),
    "self.all(p1, self.exists_one(p2, p1.group == p2.group && p1.kind == p2.kind && p1.name == p2.name && (((!has(p1.__namespace__) || p1.__namespace__ == '') && (!has(p2.__namespace__) || p2.__namespace__ == '')) || (has(p1.__namespace__) && has(p2.__namespace__) && p1.__namespace__ == p2.__namespace__ )) && (((!has(p1.sectionName) || p1.sectionName == '') && (!has(p2.sectionName) || p2.sectionName == '')) || (has(p1.sectionName) && has(p2.sectionName) && p1.sectionName == p2.sectionName))))":  # noqa: E501
        lambda s: all(_exists_one(s, lambda p2: _same_parent(p1, p2) and _same_section(p1, p2)) for p1 in s),
    # HTTPRoute spec.rules: at most 128 matches over the first 16 rules
    " + ".join(f"(self.size() > {i} ? self[{i}].matches.size() : 0)" for i in range(16)) + " <= 128":
        lambda s: sum(len(r.get("matches", [])) for r in s[:16]) <= 128,
    # HTTPRoute spec.rules[]
    "(has(self.backendRefs) && size(self.backendRefs) > 0) ? (!has(self.filters) || self.filters.all(f, !has(f.requestRedirect))): true":  # noqa: E501
        lambda s: not s.get("backendRefs") or all(not _has(f, "requestRedirect") for f in s.get("filters", [])),
    "(has(self.filters) && self.filters.exists_one(f, has(f.requestRedirect) && has(f.requestRedirect.path) && f.requestRedirect.path.type == 'ReplacePrefixMatch' && has(f.requestRedirect.path.replacePrefixMatch))) ? ((size(self.matches) != 1 || !has(self.matches[0].path) || self.matches[0].path.type != 'PathPrefix') ? false : true) : true":  # noqa: E501
        lambda s: not (_has(s, "filters") and _exists_one(s["filters"], lambda f: _prefix_rewrite([f], "requestRedirect"))) or _single_prefix_match(s),  # noqa: E501
    "(has(self.filters) && self.filters.exists_one(f, has(f.urlRewrite) && has(f.urlRewrite.path) && f.urlRewrite.path.type == 'ReplacePrefixMatch' && has(f.urlRewrite.path.replacePrefixMatch))) ? ((size(self.matches) != 1 || !has(self.matches[0].path) || self.matches[0].path.type != 'PathPrefix') ? false : true) : true":  # noqa: E501
        lambda s: not (_has(s, "filters") and _exists_one(s["filters"], lambda f: _prefix_rewrite([f], "urlRewrite"))) or _single_prefix_match(s),  # noqa: E501
    "(has(self.backendRefs) && self.backendRefs.exists_one(b, (has(b.filters) && b.filters.exists_one(f, has(f.requestRedirect) && has(f.requestRedirect.path) && f.requestRedirect.path.type == 'ReplacePrefixMatch' && has(f.requestRedirect.path.replacePrefixMatch))) )) ? ((size(self.matches) != 1 || !has(self.matches[0].path) || self.matches[0].path.type != 'PathPrefix') ? false : true) : true":  # noqa: E501
        lambda s: not (_has(s, "backendRefs") and _exists_one(s["backendRefs"], lambda b: _has(b, "filters") and _exists_one(b["filters"], lambda f: _prefix_rewrite([f], "requestRedirect")))) or _single_prefix_match(s),  # noqa: E501
    "(has(self.backendRefs) && self.backendRefs.exists_one(b, (has(b.filters) && b.filters.exists_one(f, has(f.urlRewrite) && has(f.urlRewrite.path) && f.urlRewrite.path.type == 'ReplacePrefixMatch' && has(f.urlRewrite.path.replacePrefixMatch))) )) ? ((size(self.matches) != 1 || !has(self.matches[0].path) || self.matches[0].path.type != 'PathPrefix') ? false : true) : true":  # noqa: E501
        lambda s: not (_has(s, "backendRefs") and _exists_one(s["backendRefs"], lambda b: _has(b, "filters") and _exists_one(b["filters"], lambda f: _prefix_rewrite([f], "urlRewrite")))) or _single_prefix_match(s),  # noqa: E501
    # HTTPRoute spec.rules[].matches[].path
    "(self.type in ['Exact','PathPrefix']) ? self.value.startsWith('/') : true": _path_rule(lambda v: v.startswith("/")),
    "(self.type in ['Exact','PathPrefix']) ? !self.value.contains('//') : true": _path_rule(lambda v: "//" not in v),
    "(self.type in ['Exact','PathPrefix']) ? !self.value.contains('/./') : true": _path_rule(lambda v: "/./" not in v),
    "(self.type in ['Exact','PathPrefix']) ? !self.value.contains('/../') : true": _path_rule(lambda v: "/../" not in v),
    "(self.type in ['Exact','PathPrefix']) ? !self.value.contains('%2f') : true": _path_rule(lambda v: "%2f" not in v),
    "(self.type in ['Exact','PathPrefix']) ? !self.value.contains('%2F') : true": _path_rule(lambda v: "%2F" not in v),
    "(self.type in ['Exact','PathPrefix']) ? !self.value.contains('#') : true": _path_rule(lambda v: "#" not in v),
    "(self.type in ['Exact','PathPrefix']) ? !self.value.endsWith('/..') : true": _path_rule(lambda v: not v.endswith("/..")),
    "(self.type in ['Exact','PathPrefix']) ? !self.value.endsWith('/.') : true": _path_rule(lambda v: not v.endswith("/.")),
    "self.type in ['Exact','PathPrefix'] || self.type == 'RegularExpression'":
        lambda s: s.get("type") in ("Exact", "PathPrefix", "RegularExpression"),
    "(self.type in ['Exact','PathPrefix']) ? self.value.matches(r\"\"\"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$\"\"\") : true":  # noqa: E501
        _path_rule(lambda v: bool(PATH_CHARS.match(v))),
    # HTTPRoute backendRefs[]: a Service needs a port
    "(size(self.group) == 0 && self.kind == 'Service') ? has(self.port) : true":
        lambda s: not (s.get("group", "") == "" and s.get("kind") == "Service") or _has(s, "port"),
    # HTTPRoute rules[].timeouts
    "!(has(self.request) && has(self.backendRequest) && duration(self.request) != duration('0s') && duration(self.backendRequest) > duration(self.request))":  # noqa: E501
        lambda s: not (_has(s, "request") and _has(s, "backendRequest") and _duration(s["request"]) != 0
                       and _duration(s["backendRequest"]) > _duration(s["request"])),
    # Gateway spec.listeners
    "self.all(l, l.protocol in ['HTTP', 'TCP', 'UDP'] ? !has(l.tls) : true)":
        lambda s: all(not _has(ls, "tls") for ls in s if ls.get("protocol") in ("HTTP", "TCP", "UDP")),
    "self.all(l, (l.protocol == 'HTTPS' && has(l.tls)) ? (l.tls.mode == '' || l.tls.mode == 'Terminate') : true)":
        lambda s: all(ls["tls"].get("mode") in ("", "Terminate") for ls in s if ls.get("protocol") == "HTTPS" and _has(ls, "tls")),  # noqa: E501
    "self.all(l, (l.protocol == 'TLS' ? has(l.tls) && has(l.tls.mode) && l.tls.mode != '' : true))":
        lambda s: all(_has(ls, "tls") and not _empty(ls["tls"], "mode") for ls in s if ls.get("protocol") == "TLS"),
    "self.all(l, l.protocol in ['TCP', 'UDP']  ? (!has(l.hostname) || l.hostname == '') : true)":
        lambda s: all(_empty(ls, "hostname") for ls in s if ls.get("protocol") in ("TCP", "UDP")),
    "self.all(l1, self.exists_one(l2, l1.name == l2.name))":
        lambda s: all(_exists_one(s, lambda l2: l1["name"] == l2["name"]) for l1 in s),
    "self.all(l1, self.exists_one(l2, l1.port == l2.port && l1.protocol == l2.protocol && (has(l1.hostname) && has(l2.hostname) ? l1.hostname == l2.hostname : !has(l1.hostname) && !has(l2.hostname))))":  # noqa: E501
        lambda s: all(_exists_one(s, lambda l2: l1["port"] == l2["port"] and l1["protocol"] == l2["protocol"] and (
            l1["hostname"] == l2["hostname"] if _has(l1, "hostname") and _has(l2, "hostname")
            else not _has(l1, "hostname") and not _has(l2, "hostname"))) for l1 in s),
    # InferencePool
    "self.all(p1, self.exists_one(p2, p1.number==p2.number))":
        lambda s: all(_exists_one(s, lambda p2: p1["number"] == p2["number"]) for p1 in s),
    "self.kind != 'Service' || has(self.port)":
        lambda s: s.get("kind") != "Service" or _has(s, "port"),
}


def cel_problems(value, schema: dict, path: str, reached: set | None = None) -> list[str]:
    """Evaluate the translated x-kubernetes-validations rules on every node present in `value`."""
    found = []
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule["rule"]
        if "oldSelf" in text:       # a transition rule: checked on updates only
            continue
        if reached is not None:
            reached.add(text)
        check = CEL_RULES.get(text)
        if check is None:
            found.append(f"{path}: CEL rule without a translation in CEL_RULES: {text}")
        elif not check(value):
            found.append(f"{path}: {rule.get('message') or text}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                found += cel_problems(value[key], sub, f"{path}.{key}", reached)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                found += cel_problems(value[key], extra, f"{path}.{key}", reached)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += cel_problems(item, schema["items"], f"{path}[{i}]", reached)
    return found


def crd_problems(doc: dict, reached: set | None = None) -> list[str]:
    """Everything the apiserver (with --validate=strict) would refuse in a custom resource."""
    group, version = split_api_version(doc["apiVersion"])
    entry = CRD_VERSIONS.get((group, doc["kind"], version))
    if entry is None:
        return [f"{doc['kind']} {doc['apiVersion']}: no CRD for it in {CRD_DIR.relative_to(ROOT)}"]
    if not entry.get("served"):
        return [f"{doc['kind']} {doc['apiVersion']}: the CRD does not serve this version"]
    schema = entry["schema"]["openAPIV3Schema"]
    kind = doc["kind"]
    found = [f"{kind}: unknown field {p}" for p in unknown_fields(
        {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}, schema, kind)]
    for error in object_meta_validator().iter_errors(doc.get("metadata", {})):
        found.append(f"{kind}.metadata{dotted(error.absolute_path)}: {error.message}")
    body = {k: v for k, v in doc.items() if k != "metadata"}
    json_schema = to_json_schema({**schema, "properties": {k: v for k, v in schema["properties"].items()
                                                           if k != "metadata"}})
    for error in jsonschema.Draft7Validator(json_schema).iter_errors(body):
        found.append(f"{kind}{dotted(error.absolute_path)}: {error.message}")
    defaulted = apply_defaults(copy.deepcopy(body), schema)
    found += list_type_problems(defaulted, schema, kind)
    found += cel_problems(defaulted, schema, kind, reached)
    return found


def dotted(parts) -> str:
    """A jsonschema error path as `.a[0].b`."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def core_problems(doc: dict, version: str) -> list[str]:
    try:
        used = kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}{dotted(e.path)}: {e.message}"]
    assert used == version, (used, version)
    return []


CRD_KINDS = {(group, kind) for group, kind, _ in CRD_VERSIONS}


def is_core(doc: dict) -> bool:
    """A kind Kubernetes itself serves: not one of our CRDs' kinds, and kubernetes-validate has a
    schema for it. (Anything else is a custom kind, which then needs its CRD here.)"""
    if (split_api_version(doc["apiVersion"])[0], doc["kind"]) in CRD_KINDS:
        return False
    try:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    except kubernetes_validate.utils.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        pass
    return True


def problems(doc: dict) -> list[str]:
    if is_core(doc):
        return [p for v in K8S_VERSIONS for p in core_problems(doc, v)]
    return crd_problems(doc)


# -- the manifests validate ---------------------------------------------------------------------

def test_the_crds_are_the_upstream_files_at_the_targeted_versions():
    assert sorted(p.name for p in CRD_DIR.glob("*.yaml")) == sorted(CRDS)
    readme = (K8S / "README.md").read_text()
    for name, (blob, repo, tag, commit, path) in CRDS.items():
        assert git_blob_id((CRD_DIR / name).read_bytes()) == blob, f"{name} differs from {repo} {tag}:{path}"
        for text in (blob, repo, tag, commit):
            assert text in readme, (name, text)
    assert EPP_IMAGE in readme and LLMD_ROUTER_COMMIT in readme


@pytest.mark.parametrize("where,doc", DOCS, ids=[f"{w}:{d['kind']}/{d['metadata']['name']}" for w, d in DOCS])
def test_every_manifest_validates(where, doc):
    assert problems(doc) == [], where


def test_every_kind_is_checked_and_every_cel_rule_reached_is_translated():
    core = {d["kind"] for _, d in DOCS if is_core(d)}
    custom = {d["kind"] for _, d in DOCS if not is_core(d)}
    assert core == {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                    "PersistentVolumeClaim"}
    assert custom == {"InferencePool", "InferenceObjective", "HTTPRoute", "Gateway"}
    reached: set[str] = set()
    for _, doc in DOCS:
        if not is_core(doc):
            assert crd_problems(doc, reached) == []
    assert reached and reached <= set(CEL_RULES)
    # no translation is left over from an older CRD: each is a rule of a CRD kept here
    in_crds = {r["rule"] for v in CRD_VERSIONS.values() for r in _all_rules(v["schema"]["openAPIV3Schema"])}
    assert set(CEL_RULES) <= in_crds, set(CEL_RULES) - in_crds


def _all_rules(node):
    if isinstance(node, dict):
        yield from node.get("x-kubernetes-validations", [])
        for value in node.values():
            yield from _all_rules(value)
    elif isinstance(node, list):
        for value in node:
            yield from _all_rules(value)


# -- ... and wrong ones do not --------------------------------------------------------------------

SUBJECT = {"Deployment": "loraplex", "InferenceObjective": "chat"}   # the one broken, where several


def subject(kind: str) -> dict:
    return find(kind, SUBJECT.get(kind))


def mutated(kind: str, change) -> dict:
    doc = copy.deepcopy(subject(kind))
    change(doc)
    return doc


def container(doc: dict, index: int = 0) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][index]


CORE_BREAKAGES = {
    "misspelled field": lambda d: container(d).__setitem__("readinesProbe", container(d).pop("readinessProbe")),
    "unknown top-level spec field": lambda d: d["spec"].__setitem__("replica", 2),
    "wrong type": lambda d: d["spec"].__setitem__("replicas", "two"),
    "wrong type deep down": lambda d: container(d)["ports"][0].__setitem__("containerPort", "8000"),
    "missing required field": lambda d: container(d).pop("name"),
}


@pytest.mark.parametrize("breakage", CORE_BREAKAGES)
def test_a_broken_core_manifest_fails(breakage):
    doc = mutated("Deployment", CORE_BREAKAGES[breakage])
    for version in K8S_VERSIONS:
        assert core_problems(doc, version), (breakage, version)
    assert problems(subject("Deployment")) == []


CUSTOM_BREAKAGES = {
    # (kind, change, what the problem says)
    "pool: misspelled field": ("InferencePool", lambda d: d["spec"]["selector"].__setitem__(
        "matchLables", d["spec"]["selector"].pop("matchLabels")), "unknown field InferencePool.spec.selector.matchLables"),
    "pool: unknown field": ("InferencePool", lambda d: d["spec"].__setitem__("targetPort", 8000),
                            "unknown field InferencePool.spec.targetPort"),
    "pool: wrong type": ("InferencePool", lambda d: d["spec"]["targetPorts"][0].__setitem__("number", "8000"),
                         "is not of type 'integer'"),
    "pool: out of range": ("InferencePool", lambda d: d["spec"]["targetPorts"][0].__setitem__("number", 70000),
                           "greater than the maximum"),
    "pool: bad enum": ("InferencePool", lambda d: d["spec"]["endpointPickerRef"].__setitem__("failureMode", "Open"),
                       "is not one of"),
    "pool: CEL, a Service ref without a port": ("InferencePool", lambda d: d["spec"]["endpointPickerRef"].pop("port"),
                                                "port is required"),
    "pool: CEL, duplicate ports": ("InferencePool", lambda d: d["spec"]["targetPorts"].append({"number": 8000}),
                                   "port number must be unique"),
    "objective: wrong type": ("InferenceObjective", lambda d: d["spec"].__setitem__("priority", "high"),
                              "is not of type 'integer'"),
    "objective: misspelled field": ("InferenceObjective", lambda d: d["spec"].__setitem__("poolref", d["spec"].pop("poolRef")),
                                    "unknown field InferenceObjective.spec.poolref"),
    "objective: missing required": ("InferenceObjective", lambda d: d["spec"].pop("poolRef"),
                                    "'poolRef' is a required property"),
    "route: misspelled field": ("HTTPRoute", lambda d: d["spec"]["rules"][0].__setitem__(
        "backendRef", d["spec"]["rules"][0].pop("backendRefs")), "unknown field HTTPRoute.spec.rules[0].backendRef"),
    "route: CEL, a Service backend without a port": ("HTTPRoute", lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(
        group="", kind="Service"), "Must have port for Service reference"),
    "route: CEL, a relative path": ("HTTPRoute", lambda d: d["spec"]["rules"][0]["matches"][0]["path"].__setitem__(
        "value", "v1"), "must be an absolute path"),
    "route: bad duration": ("HTTPRoute", lambda d: d["spec"]["rules"][0]["timeouts"].__setitem__("request", "10 min"),
                            "does not match"),
    "gateway: wrong type": ("Gateway", lambda d: d["spec"]["listeners"][0].__setitem__("port", "80"),
                            "is not of type 'integer'"),
    "metadata: unknown field": ("InferencePool", lambda d: d["metadata"].__setitem__("label", {"a": "b"}),
                                "InferencePool.metadata"),
    "metadata: wrong type": ("HTTPRoute", lambda d: d["metadata"].__setitem__("labels", ["a"]), "HTTPRoute.metadata.labels"),
}


@pytest.mark.parametrize("breakage", CUSTOM_BREAKAGES)
def test_a_broken_custom_resource_fails(breakage):
    kind, change, expected = CUSTOM_BREAKAGES[breakage]
    found = crd_problems(mutated(kind, change))
    assert found and any(expected in p for p in found), found
    assert crd_problems(subject(kind)) == []


def test_a_custom_kind_without_a_crd_fails():
    doc = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "x"},
           "spec": {"host": "loraplex-epp"}}
    assert not is_core(doc)
    assert "no CRD for it" in problems(doc)[0]
    pool = mutated("InferencePool", lambda d: d.__setitem__("apiVersion", "inference.networking.x-k8s.io/v1alpha2"))
    assert "no CRD for it" in problems(pool)[0]


def test_an_untranslated_cel_rule_fails():
    schema = {"type": "object", "properties": {"a": {"type": "string"}},
              "x-kubernetes-validations": [{"rule": "self.a.size() > 2"}, {"rule": "self.a == oldSelf.a"}]}
    assert cel_problems({"a": "xyz"}, schema, "X") == ["X: CEL rule without a translation in CEL_RULES: self.a.size() > 2"]


def test_pruning_and_defaulting_helpers():
    schema = {"type": "object", "properties": {
        "m": {"type": "object", "additionalProperties": {"type": "string"}},
        "p": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"k": {"type": "object"}}},
        "o": {"type": "object"},
        "l": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["n"],
              "items": {"type": "object", "properties": {"n": {"type": "string"}, "d": {"type": "string", "default": "x"}}}},
    }}
    value = {"m": {"any": "thing"}, "p": {"free": 1, "k": {"pruned": 1}}, "o": {"pruned": 1},
             "l": [{"n": "a"}, {"n": "a", "bad": 1}]}
    assert unknown_fields(value, schema, "X") == ["X.p.k.pruned", "X.o.pruned", "X.l[1].bad"]
    defaulted = apply_defaults(copy.deepcopy(value), schema)
    assert defaulted["l"][0] == {"n": "a", "d": "x"}
    assert list_type_problems(defaulted, schema, "X") == ["X.l: duplicate entries for keys ['n'] in a list of type map"]
    assert _duration("1h30m") == 5400 and _duration("600s") == 600 and _duration("0") == 0
    with pytest.raises(ValueError):
        _duration("10 min")


# -- the endpoint picker's configuration --------------------------------------------------------

# EndpointPickerConfig, llm-d.ai/v1alpha1, transcribed from llm-d/llm-d-router @ v0.10.0
# (71f4f09) apix/config/v1alpha1/endpointpickerconfig_types.go: the picker decodes it with the
# apimachinery strict decoder (pkg/epp/config/loader/configloader.go decodeRawConfig:
# serializer.EnableStrict), so an unknown field fails its startup.
_REF = {"type": "object", "additionalProperties": False, "required": ["pluginRef"],
        "properties": {"pluginRef": {"type": "string"}}}
_QUANTITY = {"type": ["string", "integer"]}
_BAND = {"type": "object", "additionalProperties": False, "properties": {
    "priority": {"type": "integer"}, "maxBytes": _QUANTITY, "maxRequests": _QUANTITY,
    "fairnessPolicyRef": {"type": "string"}, "orderingPolicyRef": {"type": "string"}}}
EPP_CONFIG_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "plugins"],
    "properties": {
        "apiVersion": {"enum": ["llm-d.ai/v1alpha1"]},
        "kind": {"enum": ["EndpointPickerConfig"]},
        "featureGates": {"type": "array", "items": {"type": "string"}},
        "plugins": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["type"],
            "properties": {"name": {"type": "string"}, "type": {"type": "string"}, "parameters": {}}}},
        "schedulingProfiles": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "plugins"],
            "properties": {"name": {"type": "string"}, "plugins": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["pluginRef"],
                "properties": {"pluginRef": {"type": "string"}, "weight": {"type": "number"}}}}}}},
        "dataLayer": {"type": "object", "additionalProperties": False, "properties": {
            "injectDefaults": {"type": "boolean"},
            "sources": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["pluginRef", "extractors"],
                "properties": {"pluginRef": {"type": "string"}, "extractors": {"type": "array", "items": _REF}}}},
            "discovery": _REF, "crossReplicaSyncerPluginRef": {"type": "string"},
            "crossReplicaSyncInterval": {"type": "string"}}},
        "flowControl": {"type": "object", "additionalProperties": False, "properties": {
            "maxBytes": _QUANTITY, "maxRequests": _QUANTITY, "defaultRequestTTL": {"type": "string"},
            "defaultPriorityBand": _BAND, "defaultNegativePriorityBand": _BAND,
            "priorityBands": {"type": "array", "items": _BAND}, "usageLimitPolicyPluginRef": {"type": "string"},
            "saturationDetector": {"type": "object", "additionalProperties": False,
                                   "properties": {"pluginRef": {"type": "string"}}},
            "enableEviction": {"type": "boolean"}}},
        "requestHandler": {"type": "object", "additionalProperties": False,
                           "properties": {"parsers": {"type": "array", "items": _REF}}},
        "saturationDetector": {"type": "object", "additionalProperties": False,
                               "properties": {"pluginRef": {"type": "string"}}},
        "parser": _REF,
    },
}
# Plugin types registered by the picker at v0.10.0 that this config may use (cmd/epp/runner/
# runner.go registerInTreePlugins; the type constants in each plugin's package), all Beta (no
# --allow-experimental-plugins), with the parameters their factories decode strictly
# (fwkplugin.StrictDecoder): None = the factory takes none.
_SPEC = {"type": "string"}
EPP_PLUGINS = {
    "queue-scorer": None,                       # scorer/queuedepth/queue.go
    "kv-cache-utilization-scorer": None,        # scorer/kvcacheutilization/kvcache_utilization.go
    "lora-affinity-scorer": None,               # scorer/loraaffinity/lora_affinity.go (factory ignores any)
    "prefix-cache-scorer": {"type": "object"},  # scorer/prefix/plugin.go (its own parameters)
    "max-score-picker": None,
    "single-profile-handler": None,
    "metrics-data-source": {                    # datalayer/source/metrics/datasource.go metricsDatasourceParams
        "type": "object", "additionalProperties": False, "properties": {
            "scheme": {"enum": ["http", "https"]}, "path": {"type": "string"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "insecureSkipVerify": {"type": "boolean"},
            "caCertPath": {"type": "string"}, "clientCertPath": {"type": "string"},
            "clientKeyPath": {"type": "string"}, "interval": {"type": "string"}}},
    "core-metrics-extractor": {                 # datalayer/extractor/metrics/factories.go modelServerExtractorParams
        "type": "object", "additionalProperties": False, "properties": {
            "engineLabelKey": {"type": "string"}, "defaultEngine": {"type": "string"},
            "engineConfigs": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name"], "properties": {
                    "name": {"type": "string", "minLength": 1, "not": {"const": "default"}},
                    "queuedRequestsSpec": _SPEC, "runningRequestsSpec": _SPEC, "kvUsageSpec": _SPEC,
                    "loraSpec": _SPEC, "cacheInfoSpec": _SPEC, "cacheBlockSizeLabelName": _SPEC,
                    "cacheNumBlocksLabelName": _SPEC, "cacheBlockSizeSpec": _SPEC, "cacheNumBlocksSpec": _SPEC,
                    "customMetrics": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"attributeKey": _SPEC, "metricSpec": _SPEC}}}}}}}},
}
SCORERS = {"queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer", "prefix-cache-scorer"}


def epp_config() -> dict:
    return yaml.safe_load(find("ConfigMap", "loraplex-epp")["data"]["epp-config.yaml"])


def epp_config_problems(config: dict) -> list[str]:
    """What the picker would refuse at startup (LoadRawConfig, InstantiateAndConfigure)."""
    from tests.server.test_picker_metrics import parse_string_to_spec

    found = [f"config{dotted(e.absolute_path)}: {e.message}"
             for e in jsonschema.Draft7Validator(EPP_CONFIG_SCHEMA).iter_errors(config)]
    if found:
        return found
    names = {}
    for plugin in config["plugins"]:
        name = plugin.get("name") or plugin["type"]    # applyStaticDefaults
        if name in names:
            found.append(f"plugin name {name!r} used twice")
        names[name] = plugin["type"]
        if plugin["type"] not in EPP_PLUGINS:
            found.append(f"plugin type {plugin['type']!r} is not one the picker registers")
            continue
        params_schema = EPP_PLUGINS[plugin["type"]]
        if "parameters" in plugin and params_schema is not None:
            found += [f"{name}.parameters{dotted(e.absolute_path)}: {e.message}"
                      for e in jsonschema.Draft7Validator(params_schema).iter_errors(plugin["parameters"])]
        if plugin["type"] == "core-metrics-extractor" and not found:
            params = plugin.get("parameters", {})
            engines = {e["name"]: e for e in params.get("engineConfigs", [])}
            default = params.get("defaultEngine") or "vllm"
            if default not in engines and default not in ("vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm",
                                                          "triton"):
                found.append(f"defaultEngine {default!r} not found in engineConfigs")
            for engine in engines.values():
                for key, spec in engine.items():
                    if key.endswith("Spec"):
                        try:
                            parse_string_to_spec(spec)
                        except ValueError as e:
                            found.append(f"engine {engine['name']}: {key}: {e}")
    for profile in config.get("schedulingProfiles", []):
        for ref in profile["plugins"]:
            if ref["pluginRef"] not in names:
                found.append(f"profile {profile['name']}: pluginRef {ref['pluginRef']!r} names no plugin")
            elif "weight" in ref and names[ref["pluginRef"]] not in SCORERS:
                found.append(f"profile {profile['name']}: {ref['pluginRef']} is no scorer and takes no weight")
    return found


def test_the_epp_config_is_what_the_picker_accepts():
    config = epp_config()
    assert epp_config_problems(config) == []
    types = {p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer", "metrics-data-source",
            "core-metrics-extractor"} <= types
    profile = {r["pluginRef"]: r.get("weight") for r in config["schedulingProfiles"][0]["plugins"]}
    # upstream's default profile (routerlib _config.yaml, loader/defaults.go), plus LoRA affinity
    assert profile == {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3,
                       "lora-affinity-scorer": 1}
    source = next(p for p in config["plugins"] if p["type"] == "metrics-data-source")
    assert source["parameters"] == {"scheme": "http", "path": "/metrics"}


EPP_BREAKAGES = {
    "unknown top-level field": (lambda c: c.__setitem__("schedulingProfile", []), "Additional properties"),
    "misspelled plugin field": (lambda c: c["plugins"][0].__setitem__("parameter", {}), "Additional properties"),
    "unknown plugin type": (lambda c: c["plugins"].append({"type": "lora-affinity"}), "not one the picker registers"),
    "dangling pluginRef": (lambda c: c["schedulingProfiles"][0]["plugins"].append({"pluginRef": "nope"}),
                           "names no plugin"),
    "weight on a data source": (lambda c: c["schedulingProfiles"][0]["plugins"].append(
        {"pluginRef": "metrics-data-source", "weight": 1}), "is no scorer"),
    "wrong parameter type": (lambda c: next(p for p in c["plugins"] if p["type"] == "metrics-data-source")[
        "parameters"].__setitem__("insecureSkipVerify", "yes"), "is not of type 'boolean'"),
    "unknown engine field": (lambda c: next(p for p in c["plugins"] if p["type"] == "core-metrics-extractor")[
        "parameters"]["engineConfigs"][0].__setitem__("queueSpec", "x"), "Additional properties"),
    "bad metric spec": (lambda c: next(p for p in c["plugins"] if p["type"] == "core-metrics-extractor")[
        "parameters"]["engineConfigs"][0].__setitem__("kvUsageSpec", "vllm-kv"), "not a valid metric specification"),
    "missing default engine": (lambda c: next(p for p in c["plugins"] if p["type"] == "core-metrics-extractor")[
        "parameters"].__setitem__("defaultEngine", "other"), "not found in engineConfigs"),
    "old apiVersion": (lambda c: c.__setitem__("apiVersion", "inference.networking.x-k8s.io/v1alpha1"), "is not one of"),
}


@pytest.mark.parametrize("breakage", EPP_BREAKAGES)
def test_a_broken_epp_config_fails(breakage):
    change, expected = EPP_BREAKAGES[breakage]
    config = epp_config()
    change(config)
    found = epp_config_problems(config)
    assert found and any(expected in p for p in found), found


# -- the parts fit together -----------------------------------------------------------------------

def serve_settings(deployment: dict, monkeypatch):
    """The settings `loraplex serve` would run with in the loraplex container: its args through
    the real parser, with the container's literal environment (Secret values stand in)."""
    from loraplex.cli import build_parser
    from loraplex.server.config import normalize_vllm_argv

    c = container(deployment)
    for name in [n for n in os.environ if n.startswith(("LORAPLEX_", "VLLM_"))]:
        monkeypatch.delenv(name)
    for env in c.get("env", []):
        monkeypatch.setenv(env["name"], env.get("value", "from-the-secret"))
    return build_parser().parse_args(["serve", *normalize_vllm_argv(c["args"])])


def named_port(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p.get("name") == port)


def test_the_loraplex_deployment(monkeypatch):
    d = find("Deployment", "loraplex")
    pod = d["spec"]["template"]["spec"]
    c = container(d)
    args = serve_settings(d, monkeypatch)
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert args.model == "/models/base" and args.adapter_root == ["/models/adapters"]
    assert all(path.startswith("/models/adapters/") for _, path in args.adapter)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
    assert port == args.port == 8000
    # probes: liveness and startup on /health (answers while the model loads), readiness on /ready
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert c[probe]["httpGet"]["path"] == path, probe
        assert named_port(c, c[probe]["httpGet"]["port"]) == port, probe
    # the grace period covers the drain: --shutdown-timeout, then 10 s for aborted requests' last
    # chunks (ServerState.drain) and 5 s of uvicorn's graceful close (cli.serve), with room for
    # the engine process to stop
    grace = pod["terminationGracePeriodSeconds"]
    assert args.shutdown_timeout == 30 and grace == args.shutdown_timeout + 30
    assert grace >= args.shutdown_timeout + 10 + 5
    # the models read-only, both in the mount and the claim
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    claim = find("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    # keys from the Secret, by environment, never as flags; /metrics left open for the picker
    env = {e["name"]: e for e in c["env"]}
    for name, key in (("LORAPLEX_API_KEY", "api-key"), ("LORAPLEX_ADMIN_KEY", "admin-key")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "loraplex-keys", "key": key}
    assert "LORAPLEX_METRICS_KEY" not in env and args.metrics_key is None
    assert not any(a.startswith(("--api-key", "--admin-key", "--metrics-key")) for a in c["args"])
    assert args.api_key_env == ["from-the-secret"] and args.admin_key == "from-the-secret"
    # the picker's scrapes (every 50 ms) and the probes stay out of the access log
    assert set(args.disable_access_log_for_endpoints.split(",")) >= {"/metrics", "/health", "/ready"}
    # the image's user, so the ~/.cache volume is writable
    assert pod["securityContext"]["runAsUser"] == 10001
    assert "USER loraplex" in (ROOT / "Dockerfile").read_text() and "--uid 10001" in (ROOT / "Dockerfile").read_text()


def test_the_pool_selects_the_pods_and_names_the_picker():
    pool, d = find("InferencePool", "loraplex"), find("Deployment", "loraplex")
    labels = d["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items() and selector.items() <= d["spec"]["selector"]["matchLabels"].items()
    # no other Deployment's pods fall under the pool
    for other in (x for _, x in DOCS if x["kind"] == "Deployment" and x is not d):
        assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [container(d)["ports"][0]["containerPort"]]
    ref = pool["spec"]["endpointPickerRef"]
    service = find("Service", ref["name"])
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    epp = find("Deployment", "loraplex-epp")
    epp_c = container(epp)
    assert service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    assert named_port(epp_c, service_port["targetPort"]) == 9002
    assert f"--grpc-port={named_port(epp_c, service_port['targetPort'])}" in epp_c["args"]
    assert ref.get("kind", "Service") == "Service"
    # the picker serves this pool: its name and group; its namespace is the pod's (NAMESPACE)
    assert f"--pool-name={pool['metadata']['name']}" in epp_c["args"]
    assert f"--pool-group={split_api_version(pool['apiVersion'])[0]}" in epp_c["args"]
    assert not any(a.startswith("--pool-namespace") for a in epp_c["args"])
    assert next(e for e in epp_c["env"] if e["name"] == "NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.namespace"
    # the pods' engine label picks our metric mapping
    extractor = next(p for p in epp_config()["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    assert labels[extractor["engineLabelKey"]] in {e["name"] for e in extractor["engineConfigs"]}


def test_the_picker_deployment():
    epp = find("Deployment", "loraplex-epp")
    spec = epp["spec"]["template"]["spec"]
    c = container(epp)
    assert c["image"] == EPP_IMAGE
    config_map = find("ConfigMap", "loraplex-epp")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert next(v for v in spec["volumes"] if v["name"] == "config")["configMap"]["name"] == config_map["metadata"]["name"]
    config_file = next(a for a in c["args"] if a.startswith("--config-file=")).split("=", 1)[1]
    assert config_file == f"{mount['mountPath']}/epp-config.yaml" and "epp-config.yaml" in config_map["data"]
    # upstream: the picker's grace period at least the pool pods'
    assert spec["terminationGracePeriodSeconds"] >= \
        find("Deployment", "loraplex")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert f"--grpc-health-port={c[probe]['grpc']['port']}" in c["args"]
    # RBAC: what it watches, for its ServiceAccount
    assert spec["serviceAccountName"] == find("ServiceAccount")["metadata"]["name"]
    binding, role = find("RoleBinding"), find("Role")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"]}]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               if {"get", "watch", "list"} <= set(rule["verbs"])}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools"),
            ("llm-d.ai", "inferenceobjectives")} <= granted


def test_the_route_and_objectives_name_the_pool():
    pool, route, gateway = find("InferencePool"), find("HTTPRoute"), find("Gateway")
    group = split_api_version(pool["apiVersion"])[0]
    target = {"group": group, "kind": "InferencePool", "name": pool["metadata"]["name"]}
    for rule in route["spec"]["rules"]:
        assert rule["backendRefs"] == [target]
        assert all(m["path"]["value"].startswith("/v1") for m in rule["matches"])
    parent = route["spec"]["parentRefs"][0]
    assert (parent["kind"], parent["name"]) == ("Gateway", gateway["metadata"]["name"])
    objectives = [d for _, d in DOCS if d["kind"] == "InferenceObjective"]
    assert {o["metadata"]["name"] for o in objectives} == {"chat", "sql", "summarize"}
    # one per adapter family the Deployment registers
    d = find("Deployment", "loraplex")
    registered = {a.split("=", 2)[1] for a in container(d)["args"] if a.startswith("--adapter=")}
    assert {o["metadata"]["name"] for o in objectives} == registered
    for o in objectives:
        # the picker matches objectives on the pool's name and group (inferenceobjective_reconciler.go)
        assert o["spec"]["poolRef"] == target
        assert isinstance(o["spec"]["priority"], int)
    assert len({o["spec"]["priority"] for o in objectives}) == len(objectives)


def test_nothing_applied_by_default_holds_a_secret_or_a_placeholder_claim():
    # keys are made with `kubectl create secret` (deploy/README.md); the claim depends on the
    # cluster's storage: examples/ only, which `kubectl apply -f deploy/kubernetes/` leaves out
    assert not any(d["kind"] == "Secret" for _, d in DOCS)
    assert [w for w, d in DOCS if d["kind"] == "PersistentVolumeClaim"] == ["examples/models-pvc.yaml"]
