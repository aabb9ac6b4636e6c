"""The files in cluster/: every YAML parses and carries what its format needs (no Ray started)."""
import json
import os
import re
import shlex

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


def kuberay_operator_resources(value):
    """rayStartParams.resources as the KubeRay operator (v1.3+) reads it before it adds
    --num-gpus from the GPU limit: ray-operator/controllers/ray/common/pod.go, getResourcesMap,
    called by addWellKnownAcceleratorResources from generateRayStartCommand, trims
    `strings.Trim(value, "'\"` ")` and then `json.Unmarshal`s into a map[string]float64. When
    that fails the operator logs "failed to add accelerator resources to rayStartParams" and
    the pod starts without --num-gpus."""
    trimmed = value.strip("'\"` ")  # str.strip(chars) is Go's strings.Trim(s, cutset)

    def no_constant(name):  # Go's encoding/json knows no NaN/Infinity
        raise ValueError(name)

    parsed = json.loads(trimmed, parse_constant=no_constant)
    assert isinstance(parsed, dict)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed.values()), parsed
    return parsed


def ray_start_resources(value):
    """What `ray start` receives: convertParamMap (same file) writes ` --resources=<value> `
    into the command line that the container's `bash -lc` runs, and `ray start` json.loads
    the argument (ray._private.utils.parse_resources_json)."""
    args = shlex.split(f"ray start --resources={value}")
    assert len(args) == 3, args  # the shell must hand the JSON over as one argument
    return json.loads(args[2].removeprefix("--resources="))


def kuberay_trial_slots(group):
    """The group's trial_slot count, once the operator and the shell + `ray start` read the
    same resources from it."""
    value = group["rayStartParams"]["resources"]
    resources = kuberay_operator_resources(value)
    assert ray_start_resources(value) == resources
    return resources["trial_slot"]


def test_cluster_dir_has_each_format():
    assert {"aws.yaml", "local.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"} <= set(YAMLS)
    assert LAUNCHER and RAYCLUSTERS and RAYJOBS


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_is_one_known_mapping(name):
    doc = load(name)
    assert isinstance(doc, dict), name
    assert "provider" in doc or doc.get("kind") in {"RayCluster", "RayJob", "PersistentVolumeClaim"}, name


def test_kuberay_resources_checks_catch_what_breaks_a_pod():
    # the form KubeRay's own samples show: the operator trims it to {\"trial_slot\": 1}
    with pytest.raises(json.JSONDecodeError):
        kuberay_operator_resources('"{\\"trial_slot\\": 1}"')
    # bare JSON passes the operator, but the shell splits it at the space
    assert kuberay_operator_resources('{"trial_slot": 1}') == {"trial_slot": 1}
    with pytest.raises(AssertionError):
        ray_start_resources('{"trial_slot": 1}')


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
    assert c["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token every node joins with
    assert "RAY_AUTH_MODE=token ray start" in head
    if "docker" in c:
        # nodes run the image cluster/Dockerfile builds, which has the package and torch:
        # nothing is installed at start
        assert set(c["docker"]) & {"head_image", "worker_image"} == set()
        assert c["docker"]["image"].rsplit("/", 1)[-1] == dockerfile_image()
        assert not any("pip install" in cmd for cmd in c["setup_commands"])
    else:
        assert any(re.search(r"pip install (-e )?~/stackwise_ray\b", cmd) for cmd in c["setup_commands"])
        assert c["file_mounts"]["~/stackwise_ray"] == "."
    if ptype != "local":
        # the launcher passes each node type's resources to `ray start`: keep them in step
        slots = re.findall(r'"trial_slot":\s*(\d+)', head)
        assert [int(s) for s in slots] == [c["available_node_types"][c["head_node_type"]]["resources"]["trial_slot"]]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_matches_rays_schema(name):
    """The file as written, against the schema that ships with Ray (no field Ray does not know)."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    assert list(jsonschema.Draft7Validator(schema).iter_errors(load(name))) == []


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_validation(name):
    """The checks `ray up` runs before it touches a machine (schema + provider defaults)."""
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(load(name))
    assert util.validate_config(config) is None  # raises on a schema or provider error
    assert config["cluster_name"] == load(name)["cluster_name"]


def check_autoscaled_group(group, is_head, trial_slots):
    """Ray's KubeRay autoscaler reads the group's resources with its own parser (it drops the
    value's first and last character): it must see the same trial_slots and the GPU."""
    autoscaling_config = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    seen = autoscaling_config._get_ray_resources_from_group_spec(group, is_head)
    assert seen["trial_slot"] == trial_slots
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
    assert seen.get("GPU", 0) == gpus


def check_ray_cluster_spec(spec):
    head = spec["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    assert container["image"] == dockerfile_image()
    groups = [(head, True)] + [(g, False) for g in spec["workerGroupSpecs"]]
    for group, is_head in groups:
        slots = kuberay_trial_slots(group)
        assert slots >= 1
        if spec.get("enableInTreeAutoscaling"):
            check_autoscaled_group(group, is_head, slots)
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups
    for g in spec["workerGroupSpecs"]:
        assert g["template"]["spec"]["containers"][0]["image"] == dockerfile_image()
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        # without the autoscaler KubeRay keeps `replicas` and a range means nothing
        assert g["minReplicas"] == g["maxReplicas"] or spec.get("enableInTreeAutoscaling") is True, g["groupName"]
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


def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", "".join(line for line in f if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def dockerfile_image():
    """The image name the Dockerfile's build command gives (the manifests and aws.yaml run it)."""
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        return re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", f.read()).group(1)


def test_dockerfile_ships_package_and_experiments():
    copied = {src for op, args in dockerfile_instructions() if op == "COPY"
              for src in args.split()[:-1] if not src.startswith("--")}
    assert {"pyproject.toml", "stackwise_ray/", "experiments/"} <= copied
    assert any(op == "RUN" and "pip install" in args for op, args in dockerfile_instructions())


def test_dockerfile_builds_as_ray_in_a_directory_ray_owns():
    """The base image runs as `ray`; `pip install .` writes build/ next to the sources. Only
    BuildKit creates WORKDIR's directory as the current user, and COPY without --chown gives
    root's files on every builder, so pip fails elsewhere (legacy builder, kaniko, buildah)
    unless ray creates the directory and owns every copied file. Static: there is no docker
    here; what it checks is which user each step runs as and who owns what it writes."""
    user, made_by_ray, workdir = None, set(), None
    for op, args in dockerfile_instructions():
        if op == "USER":
            user = args.strip()
        elif op == "RUN" and user == "ray":
            made_by_ray |= {p for p in re.findall(r"mkdir (?:-p )?(\S+)", args)}
        elif op == "WORKDIR":
            workdir = args.strip()
            assert workdir in made_by_ray, f"WORKDIR {workdir} is not made by ray first"
        elif op in ("COPY", "ADD"):
            assert re.match(r"--chown=ray(:users)?\s", args), f"{op} {args}"
        if op == "RUN" and "pip install" in args:
            assert user == "ray" and workdir and workdir.startswith("/home/ray/")


def test_pvc_is_shared():
    for name in by_kind("PersistentVolumeClaim"):
        assert "ReadWriteMany" in load(name)["spec"]["accessModes"]


def test_readme():
    with open(os.path.join(CLUSTER, "README.md")) as f:
        text = f.read()
    for needle in ("ray up", "ray job submit", "storage_path", "trial_slot", "8265", "docker push"):
        assert needle in text, needle


@pytest.mark.parametrize("readme", ["docs/cluster.md", "cluster/README.md"])
def test_readme_token_commands_start_from_a_fresh_head(readme):
    """A fresh `ray start --head` has no token, and refuses RAY_AUTH_MODE=token without one."""
    with open(os.path.join(ROOT, readme)) as f:
        blocks = "\n".join(re.findall(r"```bash\n(.*?)```", f.read(), re.S))
    starts = [m.start() for m in re.finditer(r"ray start --head", blocks)]
    assert starts
    generate = blocks.find("ray get-auth-token --generate")
    assert 0 <= generate < starts[0]
    assert "RAY_AUTH_MODE=token" in blocks[:starts[0]]
