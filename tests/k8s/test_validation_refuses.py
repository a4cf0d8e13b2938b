"""The validation can fail: mistyped fields, wrong types and bad values in copies of the
rendered manifests are refused, by kubernetes-validate and by the strict CRD schema."""

import copy

import jsonschema
import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.k8s import crd_schema
from tests.k8s.manifests import one

pytestmark = pytest.mark.timeout(120)


def _validate(doc):
    return kubernetes_validate.validate(doc, "1.33", strict=True)


def test_mistyped_probe_in_a_deployment_is_refused(rendered):
    deployment = copy.deepcopy(one(rendered["gpu-8b"], "Deployment"))
    assert _validate(deployment) == "1.33"
    gateway = deployment["spec"]["template"]["spec"]["containers"][0]
    gateway["readinesProbe"] = gateway.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        _validate(deployment)


@pytest.mark.parametrize(("kind", "mutate", "mentions"), [
    ("HorizontalPodAutoscaler", lambda d: d["spec"].update(minReplicas="2"), "'2'"),
    ("Service", lambda d: d["spec"]["ports"][0].update(targetPrt=50051), "targetPrt"),
    ("NetworkPolicy", lambda d: d["spec"].update(policyType=["Ingress"]), "policyType"),
    ("PodDisruptionBudget", lambda d: d["spec"].update(minAvaliable=1), "minAvaliable"),
])
def test_mistakes_in_other_builtin_kinds_are_refused(rendered, kind, mutate, mentions):
    doc = copy.deepcopy(next(d for d in rendered["gpu-8b"] if d["kind"] == kind))
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError, match=mentions):
        _validate(doc)


def _worker(cluster):
    return cluster["spec"]["workerGroupSpecs"][0]


UNKNOWN_FIELDS = {
    "a top-level typo": (lambda c: c["spec"].update(enableInTreeAutoScaling=True),
                         "spec", "enableInTreeAutoScaling"),
    "a worker group typo": (lambda c: _worker(c).update(maxReplica=4),
                            "spec.workerGroupSpecs.0", "maxReplica"),
    "a typo deep in the pod template": (
        lambda c: _worker(c)["template"]["spec"]["containers"][0].update(
            resoruces={"limits": {"nvidia.com/gpu": "1"}}),
        "spec.workerGroupSpecs.0.template.spec.containers.0", "resoruces"),
    "a typo in the autoscaler options": (
        lambda c: c["spec"]["autoscalerOptions"].update(idleTimeout=60),
        "spec.autoscalerOptions", "idleTimeout"),
}
BAD_VALUES = {
    "a string replica count": (lambda c: _worker(c).update(minReplicas="1"),
                               "spec.workerGroupSpecs.0.minReplicas"),
    "a GPU count that is no quantity": (
        lambda c: _worker(c)["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            {"nvidia.com/gpu": "one"}),
        "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.nvidia.com/gpu"),
    "an unknown upscaling mode": (lambda c: c["spec"]["autoscalerOptions"].update(
        upscalingMode="Fast"), "spec.autoscalerOptions.upscalingMode"),
    "a probe port that is neither a number nor a name": (
        lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            livenessProbe={"tcpSocket": {"port": [6379]}}),
        "spec.headGroupSpec.template.spec.containers.0.livenessProbe.tcpSocket.port"),
    "rayStartParams that are not strings": (
        lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 8}),
        "spec.headGroupSpec.rayStartParams.num-cpus"),
}


@pytest.mark.parametrize("case", sorted(UNKNOWN_FIELDS))
def test_unknown_crd_fields_are_refused(rendered, case):
    mutate, path, field = UNKNOWN_FIELDS[case]
    cluster = copy.deepcopy(one(rendered["gpu-8b"], "RayCluster"))
    mutate(cluster)
    assert crd_schema.errors(cluster) == [
        f"{path}: Additional properties are not allowed ('{field}' was unexpected)"]
    # The CRD as published lets it through: the strict closing is what catches it.
    published = crd_schema.crd_schema(crd_schema.CRD_FILES["ray.io", "RayCluster"])
    assert list(jsonschema.Draft202012Validator(published).iter_errors(cluster)) == []


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_crd_values_are_refused(rendered, case):
    mutate, path = BAD_VALUES[case]
    cluster = copy.deepcopy(one(rendered["gpu-8b"], "RayCluster"))
    mutate(cluster)
    problems = crd_schema.errors(cluster)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: "), problems


def test_int_or_string_ports_take_a_number_or_a_name(rendered):
    cluster = copy.deepcopy(one(rendered["gpu-8b"], "RayCluster"))
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for port in (6379, "gcs-server"):
        head["livenessProbe"] = {"tcpSocket": {"port": port}}
        assert crd_schema.errors(cluster) == []


def test_strict_closes_objects_and_spells_int_or_string():
    schema = {"type": "object", "properties": {
        "spec": {"type": "object", "properties": {"n": {"type": "integer"}}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "free": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "port": {"x-kubernetes-int-or-string": True},
        "items": {"type": "array", "items": {"type": "object",
                                             "properties": {"b": {"type": "string"}}}},
    }}
    assert crd_schema.strict(schema) == {"type": "object", "additionalProperties": False,
                                         "properties": {
        "spec": {"type": "object", "properties": {"n": {"type": "integer"}},
                 "additionalProperties": False},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "free": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "port": {"x-kubernetes-int-or-string": True,
                 "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "items": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                             "properties": {"b": {"type": "string"}}}},
    }}
    assert "additionalProperties" not in schema  # the input is left as it was


def _closed_objects(doc, schema, path=()):
    """Paths of the objects in `doc` whose strict schema refuses unknown fields."""
    if isinstance(doc, dict) and schema.get("additionalProperties") is False:
        yield path, set(schema["properties"])
        for key, value in doc.items():
            yield from _closed_objects(value, schema["properties"][key], (*path, key))
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for index, value in enumerate(doc):
            yield from _closed_objects(value, schema["items"], (*path, index))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_unknown_field_anywhere_is_refused_there(rendered, data):
    overlay = data.draw(st.sampled_from(sorted(rendered)))
    cluster = copy.deepcopy(one(rendered[overlay], "RayCluster"))
    schema = crd_schema.validator("ray.io", "RayCluster", "v1").schema
    targets = list(_closed_objects(cluster, schema))
    path, known = data.draw(st.sampled_from(targets))
    field = data.draw(st.text(st.characters(codec="ascii", categories=["L", "N", "P"]),
                              min_size=1, max_size=12).filter(lambda f: f not in known))
    node = cluster
    for step in path:
        node = node[step]
    node[field] = {"x": 1}
    where = ".".join(map(str, path)) or "<root>"
    assert crd_schema.errors(cluster) == [
        f"{where}: Additional properties are not allowed ({field!r} was unexpected)"]
