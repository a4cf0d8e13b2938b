"""`ray up deploy/ray/cluster.yaml`, run by Ray's own CLI-test method: `ray.scripts.scripts.up`
through click's CliRunner, AWS mocked by moto, every ssh and rsync the launcher runs answered by
a fake `subprocess.Popen` that records it. Asserts what the head is launched as and given: the
instance, the files, and exactly our setup and start commands, in order."""

from __future__ import annotations

import copy
import io
import json
import shlex
import subprocess
from pathlib import Path

import moto
import pytest
import yaml
from ray.autoscaler._private.aws import node_provider as aws_node_provider

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "deploy" / "ray" / "cluster.yaml"
LOCAL_YAML = REPO / "deploy" / "ray" / "local.yaml"
REGION = "us-west-2"
RAY_ROLE = "ray-autoscaler-v1"
"""Ray's default head instance profile and role; made beforehand, as in an account where the
launcher ran before (creating them, Ray sleeps 2 x 15 s for IAM propagation)."""


class RecordingPopen:
    """Stands in for subprocess.Popen: records argv, runs nothing, exits 0 with no output.
    The source of each rsync is read at call time (the launcher deletes its temp files)."""

    calls: list[list[str]] = []
    synced: dict[str, bytes] = {}

    def __init__(self, args, *_, **kwargs) -> None:
        argv = [args] if isinstance(args, str) else [str(a) for a in args]
        RecordingPopen.calls.append(argv)
        if argv[0] == "rsync" and Path(argv[-2]).is_file():
            RecordingPopen.synced[argv[-1]] = Path(argv[-2]).read_bytes()
        text = kwargs.get("universal_newlines") or kwargs.get("text")

        def stream():
            return io.StringIO("") if text else io.BytesIO(b"")

        self.args, self.returncode, self.pid = args, 0, 0
        self.stdin = stream() if kwargs.get("stdin") == subprocess.PIPE else None
        self.stdout = stream() if kwargs.get("stdout") == subprocess.PIPE else None
        self.stderr = stream() if kwargs.get("stderr") == subprocess.PIPE else None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def communicate(self, input=None, timeout=None):
        return (self.stdout.read() if self.stdout else None,
                self.stderr.read() if self.stderr else None)

    def wait(self, timeout=None):
        return 0

    def poll(self):
        return 0

    def kill(self):
        pass

    terminate = kill


def remote_command(argv: list[str]) -> str:
    """The command an `ssh ... host bash --login -c -i '...'` argv runs on the node."""
    script = shlex.split(argv[-1])[0]
    prefix = "export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ("
    assert prefix in script and script.endswith(")"), script
    return script.split(prefix, 1)[1][:-1]


def assert_head_ran(cfg: dict, host: str, head_resources: str | None) -> None:
    """Every ssh went to `host`, and ran there exactly the config's setup commands, then its
    head start commands (the server among them), in order, and no GPU node's own command."""
    ssh = [argv for argv in RecordingPopen.calls if argv[0] == "ssh"]
    assert ssh and all(host in argv for argv in ssh)
    commands = [remote_command(argv) for argv in ssh]
    ours = [c for c in commands if c != "uptime" and not c.startswith("mkdir -p ")]
    setup = cfg["setup_commands"] + cfg["head_setup_commands"]
    start = cfg["head_start_ray_commands"]
    assert ours[:len(setup)] == setup
    assert len(ours) == len(setup) + len(start)
    for ran, expected in zip(ours[len(setup):], start, strict=True):
        # Ray puts its environment in front of each start command: the node's type and, where
        # the config declares them, its resources (what the head's raylet reports).
        assert ran.endswith("; " + expected), (ran, expected)
        if head_resources is not None:
            assert "export RAY_NODE_TYPE_NAME=head;" in ran
            assert f"export RAY_OVERRIDE_RESOURCES='{head_resources}';" in ran
    assert sum("pagedserve serve " in c for c in ours[len(setup):]) == 1
    # The GPU nodes' own commands (their CUDA torch) never run on the head.
    worker_only = set(cfg["worker_setup_commands"]) - set(cfg["head_setup_commands"])
    assert worker_only and not worker_only & set(ours)


@pytest.fixture
def launcher_sandbox(tmp_path, monkeypatch):
    """HOME and Ray's temp dir in tmp_path (the launcher writes its ssh key, cluster state and
    locks there; the Ray token that file_mounts ships comes from there), cwd at the repository
    root (file_mounts' local paths are relative to it), and Popen recorded."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.chdir(REPO)
    (tmp_path / "ray-tmp").mkdir()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0123456789abcdef" * 4)
    RecordingPopen.calls, RecordingPopen.synced = [], {}
    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    return tmp_path


@pytest.fixture
def aws_sandbox(launcher_sandbox, monkeypatch):
    """`launcher_sandbox` plus AWS mocked by moto, with fake credentials (boto3 must never reach
    AWS); yields an EC2 client of the mock."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_SECURITY_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    with moto.mock_aws():
        import boto3

        iam = boto3.client("iam", region_name=REGION)
        iam.create_role(RoleName=RAY_ROLE, AssumeRolePolicyDocument=json.dumps(
            {"Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                            "Principal": {"Service": "ec2.amazonaws.com"}}]}))
        iam.create_instance_profile(InstanceProfileName=RAY_ROLE)
        iam.add_role_to_instance_profile(InstanceProfileName=RAY_ROLE, RoleName=RAY_ROLE)
        ec2 = boto3.client("ec2", region_name=REGION)
        named = [t["node_config"]["InstanceType"] for t in
                 yaml.safe_load(CLUSTER_YAML.read_text())["available_node_types"].values()]

        def list_named_instance_types(region, aws_credentials=None):
            """EC2's data (moto ships AWS's) on the types the config names: listing all of
            them, as Ray does, costs moto 5-20 s."""
            return ec2.describe_instance_types(InstanceTypes=named)["InstanceTypes"]

        monkeypatch.setattr(aws_node_provider, "list_ec2_instances", list_named_instance_types)
        yield ec2


def run_ray_up(path: Path) -> None:
    from click.testing import CliRunner
    from ray.scripts.scripts import up

    result = CliRunner().invoke(up, [str(path), "--no-config-cache", "-y",
                                     "--log-style=record"])
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_ray_up_launches_the_head_with_our_setup_and_start_commands(aws_sandbox):
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    run_ray_up(CLUSTER_YAML)

    instances = [i for r in aws_sandbox.describe_instances()["Reservations"]
                 for i in r["Instances"]]
    assert len(instances) == 1
    head = instances[0]
    tags = {t["Key"]: t["Value"] for t in head["Tags"]}
    head_config = cfg["available_node_types"]["head"]["node_config"]
    assert tags["ray-user-node-type"] == "head"
    assert tags["ray-node-status"] == "up-to-date"
    assert head["InstanceType"] == head_config["InstanceType"] == "m7i.2xlarge"
    assert head["ImageId"] == head_config["ImageId"]
    assert head["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{RAY_ROLE}")
    host = f"{cfg['auth']['ssh_user']}@{head['PublicIpAddress']}"

    assert_head_ran(cfg, host, head_resources='{"CPU":8,"GPU":0}')

    rsync = {argv[-1].split(":", 1)[1].rstrip("/"): argv[-2] for argv in RecordingPopen.calls
             if argv[0] == "rsync"}
    for remote, local in cfg["file_mounts"].items():
        expected = str(Path(local).expanduser()) if local.startswith("~") else local
        assert rsync[remote].rstrip("/") == expected, (remote, rsync[remote])
    bootstrap = yaml.safe_load(RecordingPopen.synced[f"{host}:~/ray_bootstrap_config.yaml"])
    # The head's autoscaler gets our worker types, and the files from the head's own copies.
    for name in ("gpu_tp1", "gpu_tp2", "gpu_tp8"):
        ours_type, theirs = cfg["available_node_types"][name], \
            bootstrap["available_node_types"][name]
        assert theirs["min_workers"] == ours_type["min_workers"]
        assert theirs["max_workers"] == ours_type["max_workers"]
        assert theirs["resources"]["GPU"] == ours_type["resources"]["GPU"]
        assert theirs["resources"]["CPU"] == ours_type["resources"]["CPU"]
    # Ray folds setup_commands into each role's commands.
    assert bootstrap["worker_setup_commands"] == \
        cfg["setup_commands"] + cfg["worker_setup_commands"]
    assert bootstrap["file_mounts"] == {remote: remote for remote in cfg["file_mounts"]}


def test_declared_resources_match_the_instance_types(aws_sandbox):
    """What Ray would detect from EC2's instance data (moto ships AWS's) equals what each node
    type declares: a TP=N type has N GPUs, and the head none."""
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    undeclared = copy.deepcopy(cfg)
    for node_type in undeclared["available_node_types"].values():
        del node_type["resources"]
    detected = aws_node_provider.AWSNodeProvider.fillout_available_node_types_resources(
        undeclared)
    for name, node_type in cfg["available_node_types"].items():
        found = detected["available_node_types"][name]["resources"]
        assert found["CPU"] == node_type["resources"]["CPU"], name
        assert found.get("GPU", 0) == node_type["resources"]["GPU"], name


def test_ray_up_on_premise_sets_up_the_head_address(launcher_sandbox):
    """local.yaml: no cloud API; the head is the configured address, the workers the others."""
    cfg = yaml.safe_load(LOCAL_YAML.read_text())
    key = Path(cfg["auth"]["ssh_private_key"]).expanduser()
    key.parent.mkdir()
    key.write_text("not a real key: ssh is faked\n")
    run_ray_up(LOCAL_YAML)
    host = f"{cfg['auth']['ssh_user']}@{cfg['provider']['head_ip']}"
    assert_head_ran(cfg, host, head_resources=None)
    bootstrap = yaml.safe_load(RecordingPopen.synced[f"{host}:~/ray_bootstrap_config.yaml"])
    workers = bootstrap["available_node_types"]["local.cluster.node"]
    assert workers["min_workers"] == workers["max_workers"] == len(cfg["provider"]["worker_ips"])
    assert bootstrap["provider"]["worker_ips"] == cfg["provider"]["worker_ips"]
