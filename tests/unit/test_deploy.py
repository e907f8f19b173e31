"""deploy/: every YAML parses, the Azure cluster YAML passes Ray's own schema, token auth is
on for every node type, and no file holds a token."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from rlhf.orchestrator.cluster import jobs

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
YAMLS = sorted(DEPLOY.rglob("*.yaml"))


def _load(name: str) -> list:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def test_deploy_files_exist():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAMLS}
    assert {"azure/cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "runtime_env.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_azure_cluster_passes_rays_schema():
    """Ray's own check: ray-schema.json from the installed ray package, then with the provider's
    defaults merged in (what `ray up` itself does before launching anything)."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert (Path(ray.autoscaler.__file__).parent / "ray-schema.json").is_file()
    config = _load("azure/cluster.yaml")[0]
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_azure_node_types():
    config = _load("azure/cluster.yaml")[0]
    assert config["provider"]["type"] == "azure"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # The head runs no GPU work (and no CPU work: actors and tasks go to the workers).
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    vm = {name: t["node_config"]["azure_arm_parameters"]["vmSize"] for name, t in types.items()}
    workers = {vm[name]: t for name, t in types.items() if name != config["head_node_type"]}
    assert set(workers) == {"Standard_ND96isr_H100_v5", "Standard_ND96asr_v4"}
    for size, custom, gib in (("Standard_ND96isr_H100_v5", "gpu_h100", "79"),
                              ("Standard_ND96asr_v4", "gpu_a100", "39")):
        res = workers[size]["resources"]
        assert res["GPU"] == 8 and res[custom] == 8 and res["CPU"] == 96 and res["memory"] > 500 * 1024**3
        assert workers[size]["labels"]["gpu-memory-gib"] == gib


def test_azure_image_is_pinned_to_our_ray():
    import ray

    config = _load("azure/cluster.yaml")[0]
    image = config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py3") and "latest" not in image
    assert any("[gpu]" in cmd and "pip install" in cmd for cmd in config["setup_commands"])


def test_azure_token_auth_on_every_node_type():
    config = _load("azure/cluster.yaml")[0]
    # Every container (head and workers alike) starts with RAY_AUTH_MODE=token ...
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # ... and so does every `ray start`, in case a node type runs without Docker.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    for name, node_type in config["available_node_types"].items():
        # A node type may add run options but must not replace the start commands.
        assert not {"head_start_ray_commands", "worker_start_ray_commands"} & set(node_type), name
    # The token reaches each node as Ray's default token file, mounted from the launching machine.
    mounts = config["file_mounts"]
    assert mounts.get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    # Dashboard / job API only on the head's loopback (SSH tunnel).
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def _ray_cluster_specs():
    (pvc, cluster), (job,) = _load("kuberay/raycluster.yaml"), _load("kuberay/rayjob.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    return {"raycluster": cluster["spec"], "rayjob": job["spec"]["rayClusterSpec"]}


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_token_auth_and_gpus(which):
    spec = _ray_cluster_specs()[which]
    assert spec["authOptions"] == {"mode": "token", "secretName": "rlhf-ray-auth"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        for kind in ("requests", "limits"):
            assert container["resources"][kind]["nvidia.com/gpu"] == 8, group["groupName"]
        assert not container["image"].endswith(":latest")


def test_rayjob_shuts_down_and_retries():
    (job,) = _load("kuberay/rayjob.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1
    # A retry continues from the checkpoints on the shared volume.
    assert "--resume" in spec["entrypoint"] and "--out /mnt/runs/" in spec["entrypoint"]


def test_runtime_env_matches_rlhf_submit():
    (env,) = _load("runtime_env.yaml")
    assert env["excludes"] == jobs.WORKING_DIR_EXCLUDES
    assert jobs.JOB_ENV.items() <= env["env_vars"].items()


_LITERAL_TOKEN = [
    re.compile(r"RAY_AUTH_TOKEN\s*=\s*[^\s$\"']"),            # RAY_AUTH_TOKEN=abc (not =$VAR)
    re.compile(r"name:\s*RAY_AUTH_TOKEN\s*\n\s*value:"),      # k8s env with a literal value
    re.compile(r"^\s*(stringData|data):", re.M),               # a Secret with its content inline
    re.compile(r"\b[0-9a-f]{32,}\b"),                          # Ray tokens are long hex strings
]


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*") if p.is_file()),
                         ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_no_literal_token_in_any_file(path):
    text = path.read_text()
    for pattern in _LITERAL_TOKEN:
        assert not pattern.search(text), f"{path.name}: {pattern.pattern}"
    own = Path.home() / ".ray" / "auth_token"  # this machine's real token, if it has one
    if own.is_file() and own.read_text().strip():
        assert own.read_text().strip() not in text
