"""The cluster configs, offline: cluster.yaml against the JSON schema Ray's cluster launcher
validates with (shipped in the installed package) plus the project's own expectations, and
deploy/rayjob.yaml checked by hand for the fields KubeRay requires -- not validated against a
Kubernetes API server, which CI does not have."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from vspw_ray.config import load_config
from vspw_ray.resources import worker_request

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "rayjob.yaml"
DRIVER = "driver"  # the head's resource for job entrypoints (--entrypoint-resources)
TUNE_DRIVER = "tune_driver"  # on-demand nodes only: Tune trial drivers


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB_YAML.read_text())


def _fits(node: dict, request: dict) -> bool:
    return all(float(node.get(k, 0)) >= float(v) for k, v in request.items())


def _workers(cluster: dict) -> dict[str, dict]:
    return {name: t for name, t in cluster["available_node_types"].items()
            if name != cluster["head_node_type"]}


def _is_spot(node_type: dict) -> bool:
    market = node_type["node_config"].get("InstanceMarketOptions", {})
    return market.get("MarketType") == "spot"


def _overrides(entrypoint: str) -> dict[str, object]:
    """The ``section.key=value`` overrides of a ``vspw-ray`` command line, values parsed as the
    CLI parses them (YAML)."""
    pairs = (a.partition("=") for a in shlex.split(entrypoint) if "." in a.split("=")[0])
    return {k: yaml.safe_load(v) for k, sep, v in pairs if sep}


def test_cluster_yaml_is_valid_for_rays_cluster_launcher(cluster):
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cluster), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_a_broken_cluster_yaml_is_caught_by_the_schema(cluster):
    """The schema check above can fail: a misspelt key and a fractional resource are refused."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    broken = {**cluster, "idle_timeout_minute": 5}
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)
    types = {**cluster["available_node_types"]}
    types["gpu_spot"] = {**types["gpu_spot"], "resources": {"CPU": 46, "GPU": 0.5}}
    broken = {**cluster, "available_node_types": types}
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_head_runs_drivers_and_keeps_work_off(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"]["GPU"] == 0
    assert head["resources"][DRIVER] >= 1
    assert not any(DRIVER in t["resources"] for t in _workers(cluster).values())
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--head" in start and "--autoscaling-config" in start


def test_every_worker_type_has_gpus_and_one_is_spot(cluster):
    workers = _workers(cluster)
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    assert all(0 <= t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]
    spot = [name for name, t in workers.items() if _is_spot(t)]
    ondemand = [name for name, t in workers.items() if not _is_spot(t)]
    assert spot and ondemand, (spot, ondemand)
    assert cluster["idle_timeout_minutes"] > 0


def test_tune_drivers_fit_on_demand_nodes_only(cluster, rayjob):
    """The documented tune.driver_resources (the RayJob's entrypoint) fits every on-demand
    type and no spot type or head; a GPU training worker fits both GPU types."""
    cfg = load_config(REPO / "experiments" / "vspw_seed.yaml",
                      [f"{k}={json.dumps(v)}" for k, v in
                       _overrides(rayjob["spec"]["entrypoint"]).items()
                       if k.startswith(("tune.", "train."))])
    request = dict(cfg.tune.driver_resources)
    assert TUNE_DRIVER in request
    workers = _workers(cluster)
    fits = {name for name, t in workers.items() if _fits(t["resources"], request)}
    assert fits == {name for name, t in workers.items() if not _is_spot(t)}
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert not _fits(head["resources"], request)
    assert cfg.train.use_gpu
    assert all(_fits(t["resources"], worker_request(cfg)) for t in workers.values())
    assert not _fits(head["resources"], worker_request(cfg))


def test_setup_installs_a_pinned_package_and_mounts_weights_and_token(cluster):
    assert cluster["docker"]["image"].startswith("rayproject/ray:2.60.")  # the pinned Ray
    setup = " ".join(cluster["setup_commands"])
    assert "vspw_ray" in setup and ("@v" in setup or "==" in setup), setup
    seed = load_config(REPO / "experiments" / "vspw_seed.yaml")
    weights_dir = str(Path(seed.model.pretrained).parent)
    assert weights_dir in cluster["file_mounts"], cluster["file_mounts"]
    assert any(remote.endswith("auth_token") for remote in cluster["file_mounts"])
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        env = " ".join(cluster[commands])
        for var in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH=", "VSPW_STORAGE=s3://",
                    "MLFLOW_TRACKING_URI=http://", "VSPW_OPTUNA_STORAGE=postgresql://"):
            assert var in env, (commands, var)


def test_rayjob_has_the_fields_kuberay_requires(rayjob):
    """Checked by hand against KubeRay's ray.io/v1 RayJob: what its CRD requires, and what
    this deployment relies on."""
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("vspw-ray pipeline ")
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and not {"pip", "uv", "conda"} & set(runtime_env)
    # `ray job stop` takes Ctrl-C's path with time to end cleanly; a re-run resumes, so retry
    stop = runtime_env["env_vars"]
    assert stop["RAY_JOB_STOP_SIGNAL"] == "SIGINT" and int(stop["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30
    assert spec["backoffLimit"] >= 1
    assert json.loads(spec["entrypointResources"]) == {DRIVER: 1}
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60.")
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert DRIVER in json.loads(json.loads(head["rayStartParams"]["resources"]))
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups) >= 2
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert "rayStartParams" in group
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
    with_driver = [g["groupName"] for g in groups if TUNE_DRIVER in
                   json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"')))]
    assert with_driver == ["gpu-ondemand"]


def test_rayjob_entrypoint_is_a_valid_cluster_run(rayjob):
    """The entrypoint's overrides load into a config that passes the cluster checks."""
    from vspw_ray.storage import check_cluster_settings

    args = shlex.split(rayjob["spec"]["entrypoint"])
    assert args[:2] == ["vspw-ray", "pipeline"]
    overrides = [a for a in args[3:] if "=" in a]
    cfg = load_config(REPO / args[2], overrides)
    check_cluster_settings(cfg, "10.0.0.1:6379")
    assert cfg.storage.path.startswith("s3://") and cfg.tune.storage.startswith("postgresql://")
