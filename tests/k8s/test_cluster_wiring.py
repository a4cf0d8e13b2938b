"""The Ray side of the manifests: each overlay's tensor-parallel size is its worker pods' GPUs,
replica bounds agree between pagedserve and the worker group, one image runs everywhere, GPU
pods tolerate GPU taints and get a RAM-backed /dev/shm, the checkpoint is at the same path in
every pod, and the NetworkPolicies and PodDisruptionBudgets select the pods they mean."""

import pytest

from tests.k8s.manifests import (
    GPU_OVERLAYS,
    OVERLAYS,
    container,
    every,
    fleet_args,
    fleet_container,
    one,
    pod_templates,
    quantity,
    selects,
    serve_args,
)

pytestmark = pytest.mark.timeout(120)

GPU = "nvidia.com/gpu"
EXPECTED_TP = {"dev-cpu": 1, "gpu-8b": 1, "70b-tp2": 2, "70b-tp8": 8}
EXPECTED_IMAGE_TAG = {"dev-cpu": "0.1.0-cpu", "gpu-8b": "0.1.0-cuda", "70b-tp2": "0.1.0-cuda",
                      "70b-tp8": "0.1.0-cuda"}


def _workers(docs):
    return one(docs, "RayCluster")["spec"]["workerGroupSpecs"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tensor_parallel_size_is_the_worker_pods_gpu_count(rendered, overlay):
    docs = rendered[overlay]
    tp = fleet_args(docs).tensor_parallel_size  # the fleet starts the replicas
    assert tp == EXPECTED_TP[overlay]
    [group] = _workers(docs)
    resources = container(group["template"])["resources"]
    if overlay in GPU_OVERLAYS:
        # One worker pod is one Ray node holding one replica's STRICT_PACKed ranks.
        assert resources["requests"][GPU] == resources["limits"][GPU] == str(tp)
        assert quantity(resources["limits"]["cpu"]) >= tp  # a CPU per rank bundle
        assert "num-gpus" not in group["rayStartParams"]  # KubeRay derives it from the limit
    else:
        assert fleet_args(docs).device == "cpu"
        assert all(GPU not in str(pod) for pod in pod_templates(docs).values())
    head = container(pod_templates(docs)["ray-head"])
    assert GPU not in head["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replica_bounds_fit_the_worker_group(rendered, overlay):
    docs = rendered[overlay]
    args = fleet_args(docs)  # the fleet's autoscaler adds and removes the replicas
    [group] = _workers(docs)
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # --replicas/--min-replicas/--max-replicas come with the scale-out CLI (issue 13).
    assert args.min_replicas <= args.max_replicas
    assert group["minReplicas"] <= args.min_replicas
    assert args.max_replicas <= group["maxReplicas"]  # one replica per worker pod at most


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_runs_everywhere(rendered, overlay):
    """The coordinators and workers unpickle the gateway's pagedserve objects: same version."""
    pods = pod_templates(rendered[overlay])
    images = {spec["image"] for pod in pods.values() for spec in pod["spec"]["containers"]}
    assert images == {f"ghcr.io/pagedserve/pagedserve:{EXPECTED_IMAGE_TAG[overlay]}"}
    # KubeRay writes the Ray containers' `ray start` command; only the gateway has its own.
    commands = {role: (container(pod).get("command"), container(pod).get("args", [None])[0])
                for role, pod in pods.items()}
    assert commands == {role: (["pagedserve"], "serve") if role == "gateway" else (None, None)
                        for role in pods}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_share_the_gateways_ray_auth_and_model_cache(rendered, overlay):
    def env(pod):
        spec = container(pod)
        return {v["name"]: v.get("value", v.get("valueFrom")) for v in spec.get("env", [])}

    pods = pod_templates(rendered[overlay])
    gateway = env(pods["gateway"])
    assert gateway["RAY_AUTH_MODE"] == "token"
    fleet = {"spec": {"containers": [fleet_container(rendered[overlay])]}}
    for role, pod in [*pods.items(), ("fleet", fleet)]:
        shared = {k: env(pod).get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                               "PAGEDSERVE_CACHE")}
        assert shared == {k: gateway[k] for k in shared}, role
    # The autoscaler sidecar reaches GCS too; it needs the token, not the model cache.
    sidecar = env({"spec": {"containers": [
        one(rendered[overlay], "RayCluster")["spec"]["autoscalerOptions"]]}})
    assert {k: sidecar.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")} \
        == {k: gateway[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_have_a_memory_backed_shm_within_their_limit(rendered, overlay):
    pods = pod_templates(rendered[overlay])
    for role, pod in pods.items():
        if role == "gateway":
            continue
        spec = container(pod)
        [mount] = [m for m in spec["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        assert quantity(volume["emptyDir"]["sizeLimit"]) \
            <= quantity(spec["resources"]["limits"]["memory"]) / 2, role
        assert spec["resources"]["requests"] == spec["resources"]["limits"], role


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_workers_tolerate_gpu_taints_and_the_rest_need_not(rendered, overlay):
    pods = pod_templates(rendered[overlay])
    [worker] = [pod for role, pod in pods.items() if role.startswith("ray-worker")]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} \
        in worker["spec"]["tolerations"]
    assert "tolerations" not in pods["ray-head"]["spec"]
    assert "tolerations" not in pods["gateway"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_is_at_the_same_path_in_every_pod(rendered, overlay):
    docs = rendered[overlay]
    model = serve_args(docs).model
    if overlay == "dev-cpu":
        assert model is None  # the default model, under the shared $PAGEDSERVE_CACHE
        return
    assert fleet_args(docs).model == model
    claims = {c["metadata"]["name"] for c in every(docs, "PersistentVolumeClaim")}
    pods = pod_templates(docs)
    for role, pod, spec in [*((r, p, container(p)) for r, p in pods.items()),
                            ("fleet", pods["ray-head"], fleet_container(docs))]:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = [m for m in spec.get("volumeMounts", [])
                  if model.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1, role
        claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] in claims and claim["readOnly"] is True, role
        assert mounts[0]["readOnly"] is True


def _pods_selected(docs, selector):
    return sorted(role.split(":")[0] for role, pod in pod_templates(docs).items()
                  if selects(selector, pod["metadata"]["labels"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_is_reachable_from_outside(rendered, overlay):
    docs = rendered[overlay]
    policies = {p["metadata"]["name"]: p["spec"] for p in every(docs, "NetworkPolicy")}
    assert set(policies) == {"pagedserve-gateway", "pagedserve-ray"}
    gateway, ray = policies["pagedserve-gateway"], policies["pagedserve-ray"]
    assert _pods_selected(docs, gateway["podSelector"]) == ["gateway"]
    assert _pods_selected(docs, ray["podSelector"]) == ["ray-head", "ray-worker"]
    # The gateway: open to anyone, on its two ports only.
    [rule] = gateway["ingress"]
    assert "from" not in rule
    assert sorted(p["port"] for p in rule["ports"]) == ["grpc", "http"]
    # Ray: every port (Ray picks many), but only from pagedserve's own pods, gateway included.
    assert gateway["policyTypes"] == ray["policyTypes"] == ["Ingress"]
    [rule] = ray["ingress"]
    assert "ports" not in rule
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector: this namespace only
    assert _pods_selected(docs, peer["podSelector"]) == ["gateway", "ray-head", "ray-worker"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_select_their_pods(rendered, overlay):
    docs = rendered[overlay]
    budgets = {p["metadata"]["name"]: p["spec"] for p in every(docs, "PodDisruptionBudget")}
    chosen = {name: _pods_selected(docs, spec["selector"]) for name, spec in budgets.items()}
    assert chosen == {"pagedserve-gateway": ["gateway"], "pagedserve-ray-head": ["ray-head"],
                      "pagedserve-ray-worker": ["ray-worker"]}
    assert budgets["pagedserve-ray-head"] == {**budgets["pagedserve-ray-head"],
                                             "maxUnavailable": 0}
    assert budgets["pagedserve-ray-worker"]["maxUnavailable"] == 1
    # A drain must be able to proceed: minAvailable 1 needs at least two gateways.
    gateway = budgets["pagedserve-gateway"]
    hpa_min = one(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "minAvailable" in gateway:
        assert gateway["minAvailable"] < hpa_min
    else:
        assert gateway["maxUnavailable"] >= 1
