"""deploy/ray/*.yaml validated offline: Ray's own config checks and schema, then ours (the head
serves, node types fit the tensor-parallel sizes, torch is pinned and the right build)."""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pagedserve.cli_serve import add_serve_arguments

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "ray"
YAMLS = sorted(DEPLOY.glob("*.yaml"))
SHARED_SCHEMA = REPO.parent / "shared" / "reference" / "ray-schema.json"
WHEEL_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
LAUNCHED = [p for p in YAMLS if p.name != "fake-multinode.yaml"]
"""The configs `ray up` launches (fake-multinode.yaml is started by `ray start`)."""
TP_TYPE = re.compile(r"gpu_tp(\d+)$")
TORCH_PIN = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def serve_args(cfg: dict) -> argparse.Namespace:
    """The head's `pagedserve serve` command, parsed by the CLI's own parser."""
    lines = [c for c in cfg["head_start_ray_commands"] if "pagedserve serve " in c]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0])
    argv = words[words.index("serve") + 1:]
    argv = argv[:next((i for i, w in enumerate(argv) if w in (">", "&", "<")), len(argv))]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_the_expected_files_are_there():
    assert [p.name for p in YAMLS] == ["cluster.yaml", "fake-multinode.yaml", "local.yaml"]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_ray_validates_it(path, monkeypatch):
    monkeypatch.chdir(REPO)  # file_mounts' local paths are relative to the repository root
    cfg = load(path)
    schema = json.loads((SHARED_SCHEMA if SHARED_SCHEMA.exists() else WHEEL_SCHEMA).read_text())
    jsonschema.validate(cfg, schema)
    if cfg["provider"]["type"] == "fake_multinode":
        # The Ray 2.60 wheel lacks this provider's defaults file, which prepare_config merges,
        # and Ray's monitor reads the file as it is: so it must be complete already.
        defaults = load(Path(ray.__file__).parent / "autoscaler" / "local" / "defaults.yaml")
        assert set(defaults) - {"head_node", "worker_nodes"} <= set(cfg)
        validate_config(copy.deepcopy(cfg))
    else:
        validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("path", LAUNCHED, ids=lambda p: p.name)
def test_the_head_starts_ray_then_serves_the_cluster(path):
    cfg = load(path)
    start = cfg["head_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(start) if "ray start --head" in c)
    serve = next(i for i, c in enumerate(start) if "pagedserve serve " in c)
    assert ray_start < serve
    assert "--num-gpus=0" in start[ray_start]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start[ray_start]
    args = serve_args(cfg)
    assert args.host == "0.0.0.0"
    assert args.address == "auto"
    # The head has no GPU when the server starts: "auto" would pick CPU ranks.
    assert args.device == "cuda"
    assert 1 <= args.min_replicas <= args.max_replicas
    assert args.model.startswith("~/models/")
    downloads = [c for c in cfg["head_setup_commands"] + cfg["worker_setup_commands"]
                 if c.startswith("hf download ")]
    assert len(downloads) == 2 and all(c.endswith(f"--local-dir {args.model}")
                                       for c in downloads)


def test_cloud_node_types_fit_their_tensor_parallel_size():
    cfg = load(DEPLOY / "cluster.yaml")
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    sizes = {}
    for name, node_type in types.items():
        if name == cfg["head_node_type"]:
            continue
        match = TP_TYPE.match(name)
        assert match, f"worker type {name} is not gpu_tp<N>"
        sizes[name] = int(match.group(1))
        # One replica per node: its TP bundles {GPU: 1, CPU: 1} take every GPU.
        assert node_type["resources"]["GPU"] == sizes[name], name
        assert node_type["resources"]["CPU"] >= sizes[name], name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert sorted(sizes.values()) == [1, 2, 8]
    assert cfg["max_workers"] == sum(t["max_workers"] for n, t in types.items() if n in sizes)
    args = serve_args(cfg)
    serving = f"gpu_tp{args.tensor_parallel_size}"
    # The served size's node type is the one kept warm, and holds --max-replicas replicas.
    assert [n for n in sizes if types[n]["min_workers"] > 0] == [serving]
    assert types[serving]["min_workers"] == args.min_replicas
    assert types[serving]["max_workers"] == args.max_replicas


def test_fake_cluster_mirrors_the_cloud_node_types():
    cloud, fake = load(DEPLOY / "cluster.yaml"), load(DEPLOY / "fake-multinode.yaml")
    assert fake["head_node_type"] == "ray.head.default"
    assert "GPU" not in fake["available_node_types"]["ray.head.default"]["resources"]
    for name, node_type in cloud["available_node_types"].items():
        if name == cloud["head_node_type"]:
            continue
        assert fake["available_node_types"][name]["resources"]["GPU"] == \
            node_type["resources"]["GPU"]
    assert fake["provider"]["disable_node_updaters"] is True
    assert fake["provider"]["use_node_id_as_ip"] is True


@pytest.mark.parametrize("path", LAUNCHED, ids=lambda p: p.name)
def test_torch_is_pinned_first_and_cpu_only_on_the_head(path):
    cfg = load(path)
    assert not any("torch" in c for c in cfg["setup_commands"])
    for role, cpu in (("head_setup_commands", True), ("worker_setup_commands", False)):
        commands = cfg[role]
        torch = [i for i, c in enumerate(commands) if re.search(r"\btorch\b", c)]
        assert len(torch) == 1, (role, commands)
        line = commands[torch[0]]
        assert f"pip install -q torch=={TORCH_PIN}" in line, line
        assert (CPU_INDEX in line) is cpu, line
        if not cpu:
            assert "--index-url" not in line  # PyPI's default Linux wheel: the CUDA build
        install = next(i for i, c in enumerate(commands) if "~/pagedserve" in c)
        assert torch[0] < install, role
        assert f'"ray[default]=={ray.__version__}"' in commands[install], commands[install]


@pytest.mark.parametrize("path", LAUNCHED, ids=lambda p: p.name)
def test_file_mounts_ship_what_pip_installs(path):
    cfg = load(path)
    mounts = cfg["file_mounts"]
    assert mounts.pop("~/.ray/auth_token") == "~/.ray/auth_token"
    for remote, local in mounts.items():
        assert remote == f"~/pagedserve/{local}"
        assert (REPO / local).exists(), local
    assert {"pyproject.toml", "README.md", "pagedserve"} == set(mounts.values())
