"""Every file under cluster/ against the schema its tool documents, and against this repository.

Ray autoscaler configs (``ray up``) are validated with Ray's own ``ray-schema.json`` and
Ray's own ``prepare_config``/``validate_config``; the KubeRay ``RayJob`` with a schema
written from the CRD's Go types (``ray-operator/apis/ray/v1/{rayjob,raycluster}_types.go``:
the fields without ``omitempty`` are required). Job command lines (the RayJob entrypoint
and the README's commands) must name a script and a config that exist and overrides the
job's config accepts. Broken copies must fail.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AUTOSCALER_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
K8S_RESOURCES = {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"}

_GROUP_REQUIRED = ["rayStartParams", "template"]
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                },
            },
        },
    },
}
RAYJOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            # entrypoint is optional in the CRD (InteractiveMode); a job that runs clipscan needs it
            "required": ["entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": _GROUP_REQUIRED,
                            "properties": {"rayStartParams": {"type": "object"}, "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["groupName", "minReplicas", "maxReplicas", *_GROUP_REQUIRED],
                                "properties": {
                                    "groupName": {"type": "string", "minLength": 1},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "rayStartParams": {"type": "object"},
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def ray_schema() -> dict[str, Any]:
    """The autoscaler schema shipped inside the installed Ray."""
    return json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())


def _extras() -> set[str]:
    from importlib.metadata import metadata

    return set(metadata("clipscan").get_all("Provides-Extra") or [])


def check_job_command(argv: list[str], where: str) -> None:
    """``python jobs/X.py --config configs/Y.yaml key=value ...``: the files exist, the overrides load."""
    from clipscan.config import DafConfig, TcacConfig, load_config

    assert argv[0] in ("python", "python3"), f"{where}: expected `python jobs/...`, got {argv[:2]}"
    script = argv[1]
    assert (ROOT / script).is_file(), f"{where}: script {script} is not in the repository"
    assert "--config" in argv, f"{where}: no --config"
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"{where}: config {config} is not in the repository"
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    cls = {"daf.py": DafConfig, "tcac.py": TcacConfig}[Path(script).name]
    load_config(cls, str(ROOT / config), overrides)  # unknown keys or bad values raise


def check_autoscaler(cfg: dict[str, Any], where: str) -> None:
    """A `ray up` config: Ray's schema, Ray's own validation, a CPU head and a GPU group from zero."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cfg, ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    provider = cfg["provider"]["type"]
    assert provider in ("aws", "gcp"), f"{where}: provider {provider}"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    for name, node in types.items():
        unknown = set(node["resources"]) - AUTOSCALER_RESOURCES
        assert not unknown, f"{where}: {name}: unknown resources {unknown} (Ray's names: {AUTOSCALER_RESOURCES})"
    assert head["resources"].get("GPU", 0) == 0, f"{where}: the head node must be CPU only"
    gpu_groups = {n: t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0}
    assert gpu_groups, f"{where}: no worker node type advertises GPU"
    for name, node in gpu_groups.items():
        assert node.get("min_workers") == 0, f"{where}: GPU group {name} must scale from zero (min_workers: 0)"
        assert node.get("max_workers", 0) > 0, f"{where}: GPU group {name} can never start (max_workers)"
        nc = node["node_config"]
        if provider == "aws":
            assert re.match(r"(g|p)\d", nc["InstanceType"]), f"{where}: {nc['InstanceType']} is no GPU instance"
            assert "IamInstanceProfile" in nc, f"{where}: GPU workers need an instance profile for s3://"
        else:
            assert nc.get("guestAccelerators"), f"{where}: GPU group {name} has no guestAccelerators"
            assert "TERMINATE" in json.dumps(nc.get("scheduling")), f"{where}: GPU VMs need onHostMaintenance TERMINATE"
            assert nc.get("serviceAccounts"), f"{where}: GPU workers need a service account for gs://"
    setup = " ".join(cfg.get("setup_commands", []))
    wanted = re.search(r"pip install (-e )?'?\.\[([a-z,]+)\]", setup)
    assert wanted, f"{where}: setup_commands do not pip install the project"
    extras = set(wanted.group(2).split(","))
    assert {"gpu", "llm"} <= extras <= _extras(), f"{where}: extras {extras} (pyproject has {_extras()})"
    local = set(cfg.get("file_mounts", {}).values())
    assert "." in local, f"{where}: the repository is not mounted (file_mounts value '.')"


def _k8s_resources(container: dict[str, Any]) -> dict[str, Any]:
    res = container.get("resources", {})
    return {**res.get("requests", {}), **res.get("limits", {})}


def check_rayjob(doc: dict[str, Any], where: str) -> None:
    """A KubeRay RayJob: the CRD's required fields, a CPU head, a GPU group from zero, a real entrypoint."""
    jsonschema.validate(doc, RAYJOB_SCHEMA)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, f"{where}: the cluster must go when the job ends"
    cluster = spec["rayClusterSpec"]
    from importlib.metadata import version

    assert cluster.get("rayVersion") == version("ray"), f"{where}: rayVersion {cluster.get('rayVersion')} != ray {version('ray')}"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for c in head:
        assert "nvidia.com/gpu" not in _k8s_resources(c), f"{where}: the head must be CPU only"
        assert version("ray") in c["image"], f"{where}: head image {c['image']} is not Ray {version('ray')}"
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], f"{where}: {group['groupName']} replicas"
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            unknown = set(_k8s_resources(c)) - K8S_RESOURCES
            assert not unknown, f"{where}: {group['groupName']}: unknown resources {unknown}"
            assert version("ray") in c["image"], f"{where}: worker image {c['image']} is not Ray {version('ray')}"
            if "nvidia.com/gpu" in _k8s_resources(c):
                assert "nvidia.com/gpu" in res.get("limits", {}), f"{where}: Kubernetes needs GPUs in limits"
                gpu_groups.append(group)
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] == 0, f"{where}: GPU group {group['groupName']} must scale from zero"
        assert group["maxReplicas"] > 0
    assert cluster.get("enableInTreeAutoscaling") is True, f"{where}: without the autoscaler the GPU group never scales"
    check_job_command(shlex.split(spec["entrypoint"]), f"{where}: entrypoint")
    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    assert env.get("working_dir"), f"{where}: runtimeEnvYAML has no working_dir (the repository)"
    pip = " ".join(env.get("pip", []))
    assert "[gpu,llm]" in pip, f"{where}: runtimeEnvYAML does not install the project's gpu,llm extras"


def check_file(path: Path) -> str:
    """Validate one file under cluster/; returns what it is. Raises on anything wrong."""
    if path.suffix == ".md":
        return "readme"
    assert path.suffix in (".yaml", ".yml"), f"{path}: unexpected file in cluster/"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    doc = docs[0]
    assert isinstance(doc, dict), f"{path}: not a mapping"
    if "provider" in doc:
        check_autoscaler(doc, str(path))
        return "autoscaler"
    if doc.get("kind") == "RayJob" or "apiVersion" in doc:
        check_rayjob(doc, str(path))
        return "rayjob"
    raise AssertionError(f"{path}: neither a Ray autoscaler config (provider) nor a Kubernetes manifest (apiVersion)")


CLUSTER_FILES = sorted(p for p in CLUSTER.iterdir() if p.is_file())


def test_cluster_folder_has_every_config() -> None:
    names = {p.name for p in CLUSTER_FILES}
    assert {"aws.yaml", "gcp.yaml", "kuberay-rayjob.yaml", "README.md"} <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_cluster_file_is_valid(path: Path) -> None:
    check_file(path)


def _readme_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    lines = " \n".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.strip().startswith("#")]


def test_readme_commands_name_real_files_and_valid_overrides() -> None:
    commands = _readme_commands()
    for tool, target in (("ray up", "cluster/aws.yaml"), ("ray up", "cluster/gcp.yaml"),
                         ("kubectl apply -f", "cluster/kuberay-rayjob.yaml")):
        assert any(c.startswith(f"{tool} ") and target in c for c in commands), f"README lacks `{tool} {target}`"
    jobs = [c for c in commands if "jobs/" in c]
    assert any(c.startswith("ray job submit") and "--working-dir ." in c for c in jobs)
    for command in jobs:
        argv = shlex.split(command)
        start = argv.index("--") + 1 if "--" in argv else next(i for i, a in enumerate(argv) if a.startswith("python"))
        check_job_command(argv[start:], f"cluster/README.md: {command}")
    for command in commands:
        for ref in re.findall(r"cluster/[\w.-]+\.ya?ml", command):
            assert (ROOT / ref).is_file(), f"README names {ref}, which does not exist"


def _mutate(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy with ``dotted`` (keys and list indices) set to value, or deleted for ``...``."""
    doc = copy.deepcopy(doc)
    node: Any = doc
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for part in parts[:-1]:
        node = node[part]
    if value is ...:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return doc


BROKEN = [
    ("aws.yaml", "provider", ...),
    ("aws.yaml", "max_workers", "many"),
    ("aws.yaml", "available_node_types.gpu.min_workers", 1),
    ("aws.yaml", "available_node_types.gpu.resources", {"CPU": 8, "gpu": 1}),
    ("aws.yaml", "available_node_types.gpu.node_config", ...),
    ("aws.yaml", "available_node_types.gpu.node_config.InstanceType", "m5.2xlarge"),
    ("aws.yaml", "available_node_types.head.resources", {"GPU": 1}),
    ("aws.yaml", "available_node_types.gpu.extra_key", True),
    ("aws.yaml", "head_node_type", "no-such-type"),
    ("aws.yaml", "setup_commands", ["pip install -e ."]),
    ("gcp.yaml", "available_node_types.ray_gpu.node_config.guestAccelerators", ...),
    ("gcp.yaml", "available_node_types.ray_gpu.node_config.scheduling", ...),
    ("gcp.yaml", "file_mounts", {}),
    ("kuberay-rayjob.yaml", "apiVersion", "ray.io/v1alpha1"),
    ("kuberay-rayjob.yaml", "spec.entrypoint", ...),
    ("kuberay-rayjob.yaml", "spec.entrypoint", "python jobs/nope.py --config configs/daf.yaml"),
    ("kuberay-rayjob.yaml", "spec.entrypoint", "python jobs/daf.py --config configs/nope.yaml"),
    ("kuberay-rayjob.yaml", "spec.entrypoint", "python jobs/daf.py --config configs/daf.yaml knn.kay=3"),
    ("kuberay-rayjob.yaml", "spec.shutdownAfterJobFinishes", False),
    ("kuberay-rayjob.yaml", "spec.rayClusterSpec.headGroupSpec.template.spec.containers", []),
    ("kuberay-rayjob.yaml", "spec.rayClusterSpec.workerGroupSpecs.0.groupName", ...),
    ("kuberay-rayjob.yaml", "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", ...),
    ("kuberay-rayjob.yaml", "spec.rayClusterSpec.workerGroupSpecs.0.minReplicas", 1),
    ("kuberay-rayjob.yaml", "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources",
     {"limits": {"cpu": "8", "nvidia.com/gpus": 1}}),
    ("kuberay-rayjob.yaml", "spec.rayClusterSpec.rayVersion", "2.9.0"),
    ("kuberay-rayjob.yaml", "spec.runtimeEnvYAML", "working_dir: s3://b/c.zip\n"),
]


@pytest.mark.parametrize("name,key,value", BROKEN, ids=[f"{n}:{k}" for n, k, _ in BROKEN])
def test_broken_copy_fails(tmp_path: Path, name: str, key: str, value: Any) -> None:
    doc = yaml.safe_load((CLUSTER / name).read_text())
    check_file(CLUSTER / name)  # the real file passes ...
    broken = tmp_path / name
    broken.write_text(yaml.safe_dump(_mutate(doc, key, value)))
    with pytest.raises((AssertionError, jsonschema.ValidationError, ValueError)):
        check_file(broken)  # ... and the copy with one thing wrong does not


def test_unparseable_file_fails(tmp_path: Path) -> None:
    broken = tmp_path / "aws.yaml"
    broken.write_text((CLUSTER / "aws.yaml").read_text().replace("provider:", "provider: [", 1))
    with pytest.raises(yaml.YAMLError):
        check_file(broken)
