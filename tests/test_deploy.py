"""deploy/: configuration files parse, mean what they say, and match pyproject."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dask
import pytest
import yaml

from hetero_dask.runtime.cluster import PROJECT_CONFIG, load_project_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PYPROJECT = DEPLOY.parent / "pyproject.toml"


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


@pytest.mark.parametrize(
    "path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_yaml_files_parse(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_dask_yaml_keys_exist_in_distributed_defaults():
    """A misspelt key would be silently ignored by Dask: every setting must be a real one."""
    import distributed  # noqa: F401  (registers distributed's defaults)

    cfg = yaml.safe_load(PROJECT_CONFIG.read_text())
    for key, _ in _leaves(cfg["distributed"], "distributed"):
        if ".pre-spawn-environ." in key:
            continue  # a mapping of environment variables, any name allowed
        assert dask.config.get(key, default="<missing>") != "<missing>", (
            f"unknown Dask setting {key}"
        )


def test_project_config_is_loaded_as_defaults():
    cfg = load_project_config()
    assert cfg["distributed"]["scheduler"]["allowed-failures"] == 3
    assert dask.config.get("distributed.scheduler.allowed-failures") == 3
    assert dask.config.get("distributed.worker.memory.spill") == 0.8
    with dask.config.set({"distributed.scheduler.allowed-failures": 7}):  # users still win
        load_project_config()
        assert dask.config.get("distributed.scheduler.allowed-failures") == 7


def test_jobqueue_renders_a_gpu_job_script(tmp_path):
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    cfg = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())
    with dask.config.set(dict(_leaves(cfg))):  # merged over jobqueue's defaults, as the README does
        cluster = dask_jobqueue.SLURMCluster(
            scheduler_options={"dashboard_address": ":0"}, log_directory=str(tmp_path)
        )
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert re.search(r"#SBATCH --mem=6[48]G", script)  # 64 GiB, as jobqueue rounds it
    assert "#SBATCH -t 04:00:00" in script and "#SBATCH -p gpu" in script
    assert "--nthreads 1" in script and "--resources GPU=1" in script
    assert "OPENBLAS_NUM_THREADS=8" in script
    assert "\npython -m distributed.cli.dask_worker" in script  # the activated venv's python


def test_sbatch_script_requests_gpus_and_is_valid_bash():
    script = DEPLOY / "slurm" / "refine.sbatch"
    text = script.read_text()
    assert re.search(r"^#SBATCH --gres=gpu:\d+$", text, re.M)
    assert "--scheduler-file" in text and "hetero-dask refine" in text
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_kubernetes_cluster_has_a_gpu_worker_group():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"DaskCluster", "DaskWorkerGroup"}
    assert all(d["apiVersion"] == "kubernetes.dask.org/v1" for d in docs)
    group = kinds["DaskWorkerGroup"]
    assert group["spec"]["cluster"] == kinds["DaskCluster"]["metadata"]["name"]
    (container,) = group["spec"]["worker"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][:3] == ["dask", "cuda", "worker"]
    images = {c["image"] for d in docs for c in _containers(d)}
    assert len(images) == 1  # one image for scheduler and workers


def _containers(doc: dict):
    spec = doc["spec"]
    for part in ("worker", "scheduler"):
        if part in spec:
            yield from spec[part]["spec"]["containers"]


def _requirement(spec: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", spec)
    return m.group(1).lower().replace("_", "-"), m.group(2).strip()


def test_dockerfile_pins_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["gpu"]
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    pins = {
        name.lower().replace("_", "-"): version
        for name, version in re.findall(r'"([A-Za-z0-9_.\-]+)==([^"]+)"', dockerfile)
    }
    for spec in needed:
        name, rng = _requirement(spec)
        assert name in pins, f"{name} (pyproject: {spec}) is not pinned in the Dockerfile"
        assert pins[name] in SpecifierSet(rng), (
            f"Dockerfile pins {name}=={pins[name]}, pyproject wants {rng}"
        )
    version = project["version"]
    assert f"hetero-dask:{version}" in (DEPLOY / "docker" / "README.md").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-", dockerfile, re.M)


def test_no_secrets_in_deploy():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "PRIVATE KEY" not in text, path
            assert not re.search(r"(?i)(password|token|secret)\s*[:=]\s*\S", text), path


def test_every_deployment_has_a_readme():
    for sub in ("docker", "slurm", "kubernetes"):
        assert (DEPLOY / sub / "README.md").stat().st_size > 200
