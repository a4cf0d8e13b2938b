"""The gateway's manifests agree with pagedserve and with each other: its serve command and the
fleet's parse with the CLI's own arguments and take their roles over the same model, its ports,
probes, Secrets and Service line up, and the ServiceMonitor scrapes what the Service
exposes."""

from pathlib import Path, PurePosixPath

import pytest
import yaml

from pagedserve.cli_serve import replica_options
from pagedserve.cluster.launcher import ServeOptions
from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    container,
    every,
    fleet_args,
    fleet_container,
    one,
    pod_templates,
    port_number,
    selects,
    serve_args,
)

pytestmark = pytest.mark.timeout(120)

HEAD_SERVICE_SUFFIX = "-head-svc"  # KubeRay names the head's Service <RayCluster name>-head-svc


def _gateway(docs):
    return container(pod_templates(docs)["gateway"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_command_parses_and_validates(rendered, overlay):
    # ValueError naming the flag on an unknown one.
    args, fleet = serve_args(rendered[overlay]), fleet_args(rendered[overlay])
    # What `serve` builds from them, with its own checks (ports, replica bounds, roles, ...).
    options = {which: ServeOptions(
        host=a.host, port=a.port, http_port=a.http_port, ray_address=a.address,
        max_queue_per_replica=a.max_queue_per_replica, role=a.role,
        discovery_interval_s=a.discovery_interval_s, discovery_timeout_s=a.discovery_timeout_s,
        **replica_options(a)) for which, a in (("gateway", args), ("fleet", fleet))}
    assert options["fleet"].autoscaler.enabled  # every overlay autoscales between its bounds
    assert options["fleet"].replicas == fleet.min_replicas
    assert options["gateway"].autoscaler is None  # the gateway starts no replica
    assert args.host == "0.0.0.0"
    assert args.log_level == fleet.log_level == "info"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateways_route_to_the_head_s_fleet_of_the_same_model(rendered, overlay):
    docs = rendered[overlay]
    args, fleet = serve_args(docs), fleet_args(docs)
    assert (args.role, fleet.role) == ("gateway", "fleet")
    # The fleet's replicas are named after the served model: both must name it alike.
    assert (args.model, args.served_model_name) == (fleet.model, fleet.served_model_name)
    # Flags only the fleet acts on are left off the gateway (they would mislead there).
    for flag in ("replicas", "min_replicas", "max_replicas"):
        assert getattr(args, flag) is None, flag
    head = container(pod_templates(docs)["ray-head"])
    assert fleet.address == f"ray://127.0.0.1:{port_number(head, 'client')}"
    # It waits for this pod's Ray (the GCS port) and then runs the serve arguments as they are.
    command = fleet_container(docs)["command"]
    assert command[:2] == ["sh", "-c"] and command[2].endswith('exec pagedserve "$@"')
    assert f"--address=127.0.0.1:{port_number(head, 'gcs-server')}" in command[2]
    # A gateway waits for the fleet's first replica as long as its startup probe allows.
    probe = _gateway(docs)["startupProbe"]
    assert args.discovery_timeout_s == probe["periodSeconds"] * probe["failureThreshold"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_joins_the_ray_head_through_ray_client(rendered, overlay):
    docs = rendered[overlay]
    cluster = one(docs, "RayCluster")
    head = container(pod_templates(docs)["ray-head"])
    expected = f"ray://{cluster['metadata']['name']}{HEAD_SERVICE_SUFFIX}:" \
               f"{port_number(head, 'client')}"
    assert serve_args(docs).address == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_ports_are_the_container_ports(rendered, overlay):
    docs = rendered[overlay]
    args, gateway = serve_args(docs), _gateway(docs)
    assert port_number(gateway, "grpc") == args.port
    assert port_number(gateway, "http") == args.http_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_grpc_health_and_http_health_on_real_ports(rendered, overlay):
    docs = rendered[overlay]
    args, gateway = serve_args(docs), _gateway(docs)
    tls = args.tls_cert is not None
    for kind in ("startupProbe", "livenessProbe"):
        probe = gateway[kind]
        if tls:  # native gRPC probes speak plaintext only
            assert "grpc" not in probe
            assert port_number(gateway, probe["tcpSocket"]["port"]) == args.port
        else:
            assert set(probe) & {"grpc", "tcpSocket", "httpGet", "exec"} == {"grpc"}
            # No `service`: the overall health, SERVING while the process answers.
            assert probe["grpc"] == {"port": args.port}
    readiness = gateway["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/health"
    assert port_number(gateway, readiness["port"]) == args.http_port
    assert readiness.get("scheme", "HTTP") == ("HTTPS" if tls else "HTTP")


def _mounted_secret_file(docs, pod, container_spec, path):
    """(Secret, key) that a file path in `container_spec` comes from, through a volume."""
    path = PurePosixPath(path)
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for mount in container_spec.get("volumeMounts", []):
        if path.parent == PurePosixPath(mount["mountPath"]):
            source = volumes[mount["name"]]["secret"]
            items = {i["path"]: i["key"] for i in source.get("items", [])}
            key = items.get(path.name, path.name) if items else path.name
            return one(docs, "Secret", source["secretName"]), key
    raise AssertionError(f"{path} is under no mounted volume of {container_spec['name']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_token_and_tls_files_come_from_rendered_secrets(rendered, overlay):
    docs = rendered[overlay]
    args, pod = serve_args(docs), pod_templates(docs)["gateway"]
    gateway = container(pod)
    secret, key = _mounted_secret_file(docs, pod, gateway, args.auth_token_file)
    assert key in secret["stringData"]
    if overlay == "dev-cpu":
        assert (args.tls_cert, args.tls_key) == (None, None)
        return
    for path, expected_key in ((args.tls_cert, "tls.crt"), (args.tls_key, "tls.key")):
        secret, key = _mounted_secret_file(docs, pod, gateway, path)
        assert (secret["type"], key) == ("kubernetes.io/tls", expected_key)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_reference_resolves(rendered, overlay):
    docs = rendered[overlay]
    secrets = {s["metadata"]["name"]: s for s in every(docs, "Secret")}
    for role, pod in pod_templates(docs).items():
        for spec in pod["spec"]["containers"]:
            for variable in spec.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (role, ref)
        for volume in pod["spec"].get("volumes", []):
            if "secret" in volume:
                secret = secrets[volume["secret"]["secretName"]]
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret["stringData"], (role, item)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_selects_the_gateway_and_targets_its_ports(rendered, overlay):
    docs = rendered[overlay]
    service = one(docs, "Service", "pagedserve-gateway")
    pods = pod_templates(docs)
    chosen = [role for role, pod in pods.items()
              if selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])]
    assert chosen == ["gateway"]
    args, gateway = serve_args(docs), _gateway(docs)
    targets = {p["name"]: port_number(gateway, p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {"grpc": args.port, "http": args.http_port}


def test_servicemonitor_scrapes_the_gateway_services_http_port(rendered):
    monitor = yaml.safe_load(Path(K8S / "monitoring" / "servicemonitor.yaml").read_text())
    service = one(rendered["gpu-8b"], "Service", "pagedserve-gateway")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "http"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_gateway_on_cpu_requests(rendered, overlay):
    docs = rendered[overlay]
    hpa = one(docs, "HorizontalPodAutoscaler")
    deployment = one(docs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # Utilization is measured against the request: without one the HPA cannot act.
    assert "cpu" in _gateway(docs)["resources"]["requests"]
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] \
        <= hpa["spec"]["maxReplicas"]
