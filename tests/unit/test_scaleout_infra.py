"""Static checks of the scale-out files: manifests parse and say what the docs promise."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

INFRA = Path(__file__).parents[2] / "infra"


def test_k8s_manifests_parse_and_are_namespaced() -> None:
    kinds = set()
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None or doc.get("kind") == "Kustomization":
                continue
            kinds.add(doc["kind"])
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "spark", path.name
    assert {"StatefulSet", "Deployment", "Service", "Secret", "Role", "PersistentVolumeClaim"} <= kinds
    listed = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert all((INFRA / "k8s" / name).exists() for name in listed)
    assert "secrets.example.yaml" not in listed  # credentials are applied by hand, from a filled-in copy


def test_gpu_work_pool_requests_gpus() -> None:
    template = json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())
    variables = template["variables"]["properties"]
    assert variables["gpu_count"]["type"] == "integer" and variables["gpu_count"]["default"] == 8
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["envFrom"] == [{"secretRef": {"name": "spark-s3-credentials"}}]
    assert not any("SECRET" in key for key in variables["env"]["default"])  # no credentials in the template
    # every {{ placeholder }} of the job configuration is a declared variable
    text = json.dumps(template["job_configuration"])
    used = set(re.findall(r"\{\{ (\w+) \}\}", text))
    assert used <= set(variables), used - set(variables)


def test_accelerate_fsdp_config() -> None:
    cfg = yaml.safe_load((INFRA / "accelerate" / "fsdp.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["mixed_precision"] == "bf16"
    assert cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"


def test_vllm_environment_is_pinned_and_prefect_free() -> None:
    reqs = [line.split("#")[0].strip() for line in (INFRA / "envs" / "vllm" / "requirements.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    assert "vllm==0.33.0" in reqs and any(r.startswith("pyarrow") for r in reqs)
    assert not any(r.lower().startswith("prefect") for r in reqs)
    for script in (INFRA / "envs" / "vllm" / "setup.sh", INFRA / "gpu-check.sh"):
        assert os.access(script, os.X_OK), script
