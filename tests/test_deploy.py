"""The cluster recipes in deploy/ are what they claim: each YAML parses; the Ray cluster-launcher config passes
Ray's own schema; every command they run is accepted by the real parser of the program it calls
(`orchestrator.sweep`, `ray job submit`, `mlflow server`) and names a known search space and dataset; the GPU
worker groups autoscale from zero; storage is shared (s3:// for Tune, one ReadWriteMany volume under --data-root
on every pod); and the RayJob's --tracking-uri is the MLflow Service of mlflow-server.yaml, on a Host header that
server admits. Fast: no cluster is started."""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from orchestrator import sweep
from orchestrator.cli_common import parse_sets
from search_spaces import get_space
from trainables.registry import get_trainable

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
LAUNCHER = DEPLOY / "ray-cluster-aws.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob-sweep.yaml"
MLFLOW = DEPLOY / "kuberay" / "mlflow-server.yaml"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse exits (code 2) on a bad command line; make that an AssertionError naming the problem."""
    def error(message):
        raise AssertionError(f"{parser.prog}: {message}")
    parser.error = error
    return parser


def check_sweep_command(argv: list[str]) -> argparse.Namespace:
    """`python -m orchestrator.sweep ...` as a valid command line of today's parser, for a search space and a
    dataset that exist."""
    assert argv[:3] == ["python", "-m", "orchestrator.sweep"], argv
    args = _strict(sweep.build_parser()).parse_args(argv[3:])
    cls = get_trainable(get_space(args.name, {}, parse_sets(args.set)).trainable_for({}))   # a known space
    assert (args.dataset or cls.DEFAULT_DATASET) in cls.DATASETS, (cls.NAME, args.dataset)
    # on a cluster: results in places every node and the user can reach, none in a job's temporary directory
    assert urlparse(args.tracking_uri).scheme in ("http", "https"), args.tracking_uri
    assert urlparse(args.storage).scheme in ("s3", "gs"), args.storage
    return args


def _volume_for(mounts: list[dict], path: str) -> str:
    """The volume whose mountPath holds `path`."""
    hits = [m["name"] for m in mounts
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert hits, f"{path} is on no mounted volume"
    return hits[0]


# --- Ray cluster launcher ----------------------------------------------------------------------------------------
def test_launcher_config_passes_rays_schema_and_autoscales_gpus_from_zero():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)   # what `ray up` validates first

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0          # drivers only on the head
    gpu_groups = [t for name, t in types.items() if name != config["head_node_type"]
                  and t["resources"].get("GPU", 0) >= 1]
    assert gpu_groups and all(g["min_workers"] == 0 < g["max_workers"] <= config["max_workers"]
                              for g in gpu_groups)
    # the project is installed from the folder file_mounts syncs, on every node
    (target,) = config["file_mounts"]
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert any(target.replace("/home/ubuntu", "~") in c or target in c for c in installs), installs
    assert ".gitignore" in config["rsync_filter"]
    assert any("ray start --head" in c and "--autoscaling-config" in c for c in config["head_start_ray_commands"])


def test_launcher_submit_command_parses_with_ray_and_the_sweep():
    from ray.dashboard.modules.job.cli import submit

    config = yaml.safe_load(LAUNCHER.read_text())
    argv = shlex.split(config["metadata"]["submit"])
    sep = argv.index("--")
    assert argv[:3] == ["ray", "job", "submit"]
    ctx = submit.make_context("submit", argv[3:])   # raises on an unknown or malformed `ray job submit` option
    assert ctx.params["working_dir"] == "." and list(ctx.params["entrypoint"]) == argv[sep + 1:]
    args = check_sweep_command(argv[sep + 1:])
    assert args.data_root.startswith("/mnt/shared/")   # the EFS mount of setup_commands, on every node
    assert any("/mnt/shared" in c and "mount" in c for c in config["setup_commands"])


# --- KubeRay RayJob and the MLflow server ---------------------------------------------------------------------
def test_rayjob_runs_a_valid_sweep_on_an_autoscaling_gpu_group_with_shared_storage():
    docs = _docs(RAYJOB)
    job = _one(docs, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    args = check_sweep_command(shlex.split(spec["entrypoint"]))
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = [g for g in cluster["workerGroupSpecs"]
              if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]

    # --data-root lies on one ReadWriteMany claim, mounted at the same path in the head and every worker
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    claims = set()
    for pod in pods:
        volume = _volume_for(pod["containers"][0]["volumeMounts"], args.data_root)
        (vol,) = [v for v in pod["volumes"] if v["name"] == volume]
        claims.add(vol["persistentVolumeClaim"]["claimName"])
        assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]   # S3 access
    (claim,) = claims
    assert "ReadWriteMany" in _one(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"]
    namespaces = {d["metadata"]["namespace"] for d in docs}
    assert namespaces == {job["metadata"]["namespace"]}


def test_rayjob_tracking_uri_is_the_mlflow_service_and_the_server_command_is_valid():
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    job = _one(_docs(RAYJOB), "RayJob")
    args = _strict(sweep.build_parser()).parse_args(shlex.split(job["spec"]["entrypoint"])[3:])
    uri = urlparse(args.tracking_uri)

    docs = _docs(MLFLOW)
    service = _one(docs, "Service", "mlflow")
    ns = service["metadata"]["namespace"]
    assert uri.hostname in (f"mlflow.{ns}.svc.cluster.local", f"mlflow.{ns}.svc", f"mlflow.{ns}")
    assert ns == job["metadata"]["namespace"] or uri.hostname != "mlflow"
    (port,) = service["spec"]["ports"]
    assert port["port"] == uri.port

    deployment = _one(docs, "Deployment", "mlflow")
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (script,) = container["args"]
    argv = shlex.split(script.split("exec ", 1)[1])
    assert argv[:2] == ["mlflow", "server"]
    ctx = server.make_context("server", argv[2:])   # raises on an option `mlflow server` does not have
    params = ctx.params
    assert params["port"] == port["targetPort"] and params["host"] == "0.0.0.0"
    assert params["backend_store_uri"].startswith("postgresql://")       # a database backend ...
    db_host = urlparse(params["backend_store_uri"]).hostname
    assert _one(docs, "Service", db_host)["spec"]["ports"][0]["port"] == urlparse(params["backend_store_uri"]).port
    assert params["artifacts_destination"].startswith("s3://")           # ... and S3 artifacts, proxied
    assert params["serve_artifacts"] is True
    # MLflow 3 rejects requests whose Host header it does not allow: the RayJob's must pass
    assert is_allowed_host_header(params["allowed_hosts"].split(","), uri.netloc), params["allowed_hosts"]


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_is_yaml_that_the_readme_references(path):
    assert _docs(path)
    readme = (DEPLOY.parent / "README.md").read_text()
    assert str(path.relative_to(DEPLOY.parent)) in readme
