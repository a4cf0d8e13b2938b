"""Offline validation of custom resources against their CRD's openAPIV3Schema, refusing unknown
fields.

A structural CRD schema lets unknown fields through (the API server prunes them silently), so a
typo such as `enableInTreeAutoScaling` would pass. `strict` closes every object schema that
lists `properties` (additionalProperties: false) unless it says
x-kubernetes-preserve-unknown-fields, and spells x-kubernetes-int-or-string as JSON Schema's
anyOf. CEL rules (x-kubernetes-validations) are not checked.

The CRDs are copies of KubeRay's (ray-operator/config/crd/bases, controller-gen v0.16.5) in
data/, so the tests need nothing outside the repository.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DATA = Path(__file__).with_name("data")
CRD_FILES = {("ray.io", "RayCluster"): DATA / "ray.io_rayclusters.yaml"}
"""The custom kinds the manifests may use; another kind needs its CRD copied here first."""

_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` that refuses unknown fields and knows int-or-string."""
    schema = copy.deepcopy(schema)
    _close(schema)
    return schema


def _close(node: dict[str, Any]) -> None:
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in node:
        node["additionalProperties"] = False
    for child in node.get("properties", {}).values():
        _close(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _close(node[key])
    for key in _SUBSCHEMA_LISTS:
        for child in node.get(key, []):
            _close(child)


@functools.cache
def crd_schema(path: Path, version: str = "v1") -> dict[str, Any]:
    """The openAPIV3Schema of `version` in the CRD file at `path`, as published (shared: do not
    modify it)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the file is about 1 MB
    crd = next(doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc)
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in served:
        raise KeyError(f"{path.name} has no version {version!r} (it has {sorted(served)})")
    return served[version]["schema"]["openAPIV3Schema"]


@functools.cache
def validator(group: str, kind: str, version: str) -> jsonschema.protocols.Validator:
    """A strict validator of `group/version` `kind` resources."""
    if (group, kind) not in CRD_FILES:
        raise KeyError(f"no CRD for {group} {kind}: copy it into {DATA} and list it in "
                       "CRD_FILES")
    schema = strict(crd_schema(CRD_FILES[group, kind], version))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def errors(resource: dict[str, Any]) -> list[str]:
    """Each way `resource` breaks its CRD's strict schema, as 'path: message' (empty: valid)."""
    group, _, version = resource["apiVersion"].rpartition("/")
    found = validator(group, resource["kind"], version).iter_errors(resource)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in found)
