"""The files in cluster/: every YAML parses and carries what its format needs (no Ray started)."""
import json
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
YAMLS = sorted(f for f in os.listdir(CLUSTER) if f.endswith((".yaml", ".yml")))


def load(name):
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def by_kind(kind):
    return [f for f in YAMLS if isinstance(load(f), dict) and load(f).get("kind") == kind]


LAUNCHER = [f for f in YAMLS if "provider" in load(f)]
RAYCLUSTERS = by_kind("RayCluster")
RAYJOBS = by_kind("RayJob")


def kuberay_trial_slots(params):
    """rayStartParams.resources in KubeRay's format: a JSON string literal holding the JSON."""
    return json.loads(json.loads(params["resources"]))["trial_slot"]


def test_cluster_dir_has_each_format():
    assert {"aws.yaml", "local.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"} <= set(YAMLS)
    assert LAUNCHER and RAYCLUSTERS and RAYJOBS


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_is_one_known_mapping(name):
    doc = load(name)
    assert isinstance(doc, dict), name
    assert "provider" in doc or doc.get("kind") in {"RayCluster", "RayJob", "PersistentVolumeClaim"}, name


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config(name):
    c = load(name)
    assert c["cluster_name"]
    ptype = c["provider"]["type"]
    assert c["auth"]["ssh_user"]
    if ptype == "local":
        # the local provider builds its node type itself and refuses these fields
        assert "available_node_types" not in c and "head_node_type" not in c
        assert c["provider"]["head_ip"] and c["provider"]["worker_ips"]
    else:
        types = c["available_node_types"]
        assert c["head_node_type"] in types
        for t, spec in types.items():
            assert spec["resources"]["trial_slot"] >= 1, t
            if ptype == "aws":
                assert spec["node_config"]["InstanceType"] and spec["node_config"]["ImageId"], t
        if ptype == "aws":
            assert c["provider"]["region"] and c["provider"]["availability_zone"]
            workers = [t for t in types if t != c["head_node_type"]]
            assert workers and all(types[t]["max_workers"] >= types[t]["min_workers"] >= 0 for t in workers)
            assert c["max_workers"] >= 1
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = "\n".join(c[key])
        assert "ray start" in text and "trial_slot" in text, (name, key)
    head = "\n".join(c["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    assert any(re.search(r"pip install (-e )?~/stackwise_ray\b", cmd) for cmd in c["setup_commands"])
    assert c["file_mounts"]["~/stackwise_ray"] == "."
    if ptype != "local":
        # the launcher passes each node type's resources to `ray start`: keep them in step
        slots = re.findall(r'"trial_slot":\s*(\d+)', head)
        assert [int(s) for s in slots] == [c["available_node_types"][c["head_node_type"]]["resources"]["trial_slot"]]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_validation(name):
    """The checks `ray up` runs before it touches a machine (schema + provider defaults)."""
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(load(name))
    assert util.validate_config(config) is None  # raises on a schema or provider error
    assert config["cluster_name"] == load(name)["cluster_name"]


def check_ray_cluster_spec(spec):
    head = spec["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    assert container["image"]
    assert kuberay_trial_slots(head["rayStartParams"]) >= 1
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups
    for g in spec["workerGroupSpecs"]:
        assert kuberay_trial_slots(g["rayStartParams"]) >= 1
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts.get("/mnt/shared") in claims
    # the image is built from cluster/Dockerfile on the Ray version the spec names
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        assert f"rayproject/ray:{spec['rayVersion']}-" in f.read()


@pytest.mark.parametrize("name", RAYCLUSTERS)
def test_raycluster(name):
    c = load(name)
    assert c["apiVersion"] == "ray.io/v1" and c["kind"] == "RayCluster"
    check_ray_cluster_spec(c["spec"])


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob(name):
    j = load(name)
    assert j["apiVersion"] == "ray.io/v1" and j["kind"] == "RayJob"
    entry = j["spec"]["entrypoint"]
    assert entry.startswith("python -m stackwise_ray.tune experiments/")
    experiment = entry.split()[3]
    assert os.path.isfile(os.path.join(ROOT, experiment)), experiment
    assert j["spec"]["shutdownAfterJobFinishes"] is True
    assert "working_dir" in yaml.safe_load(j["spec"]["runtimeEnvYAML"])
    check_ray_cluster_spec(j["spec"]["rayClusterSpec"])
    storage = entry.split("--storage", 1)[1].split()[0]
    assert storage.startswith("/mnt/shared/")


def test_dockerfile_ships_package_and_experiments():
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = f.read()
    assert "COPY experiments/" in text and "COPY stackwise_ray/" in text and "pip install" in text


def test_pvc_is_shared():
    for name in by_kind("PersistentVolumeClaim"):
        assert "ReadWriteMany" in load(name)["spec"]["accessModes"]


def test_readme():
    with open(os.path.join(CLUSTER, "README.md")) as f:
        text = f.read()
    for needle in ("ray up", "ray job submit", "storage_path", "trial_slot", "8265"):
        assert needle in text, needle
