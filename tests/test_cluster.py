"""cluster/: autoscaler YAMLs pass Ray's own validation, KubeRay manifests pass ray.io/v1 and Kubernetes checks,
RayService's serve config is the one raylm generates, and autoscaling really adds nodes for a raylm stage."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray_head import PrivateHead

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
K8S_VERSION = "1.37.0"  # the newest schema kubernetes-validate ships


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ------------------------------------------------------------------------------------ ray up YAMLs
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_autoscaler_yaml_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    try:
        jsonschema.validate(raw, ray_schema())  # what `ray up` checks first
    except jsonschema.ValidationError as e:
        pytest.fail(f"{name}: {e.message} at {list(e.absolute_path)}")
    prepared = prepare_config(copy.deepcopy(raw))  # defaults, node types, min/max workers (no cloud calls)
    validate_config(prepared)

    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert head in types
    if raw["provider"]["type"] == "local":
        assert prepared["max_workers"] == len(raw["provider"]["worker_ips"])
        return
    workers = {k: v for k, v in types.items() if k != head}
    assert any(v["resources"].get("GPU", 0) >= 1 for v in workers.values()), "a GPU worker type for DeepSpeed"
    assert any(v["resources"].get("CPU", 0) >= 1 and not v["resources"].get("GPU") for v in workers.values()), \
        "a CPU worker type for Ray Data"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"]
    assert raw["idle_timeout_minutes"] > 0
    setup = " ".join(prepared["setup_commands"])
    assert "ray[default,data,train,tune,serve]==2.60.0" in setup and "deepspeed==0.19.8" in setup
    assert "~/raylm" in raw["file_mounts"]


# ------------------------------------------------------------------------------------ KubeRay
def kuberay_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def check_cluster_spec(spec: dict, where: str) -> list[dict]:
    """The ray.io/v1 RayCluster spec fields KubeRay requires; returns every pod template."""
    assert spec.get("rayVersion") == "2.60.0", where
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling on"
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams"
    templates = [head["template"]]
    groups = spec.get("workerGroupSpecs") or []
    assert groups, f"{where}: at least one worker group"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: groupName unique"
    for g in groups:
        assert isinstance(g.get("rayStartParams"), dict), f"{where}.{g['groupName']}: rayStartParams"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}.{g['groupName']}: replicas"
        templates.append(g["template"])
    return templates


def validate_pod_template(template: dict, where: str) -> None:
    import kubernetes_validate

    containers = template["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("resources", {}).get("limits") for c in containers), \
        f"{where}: every container has an image and resource limits"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "raylm-check"}, "spec": template["spec"]}
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {e.message} at {list(e.path)}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"),
                                       ("rayservice.yaml", "RayService")])
def test_kuberay_manifest(name, kind):
    import kubernetes_validate

    docs = kuberay_docs(name)
    ray_docs = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    assert [d["kind"] for d in ray_docs] == [kind]
    doc = ray_docs[0]
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    if kind == "RayCluster":
        templates = check_cluster_spec(spec, name)
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        gpu = [g for g in spec["workerGroupSpecs"]
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu and any(g["groupName"] != gpu[0]["groupName"] for g in spec["workerGroupSpecs"]), "CPU + GPU"
        # output_dir on a volume every pod mounts
        for t in templates:
            mounts = {m["name"] for c in t["spec"]["containers"] for m in c.get("volumeMounts", [])}
            assert "raylm-outputs" in mounts
    elif kind == "RayJob":
        templates = check_cluster_spec(spec["rayClusterSpec"], name)
        assert "jobs/run.py" in spec["entrypoint"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])
    else:
        templates = check_cluster_spec(spec["rayClusterConfig"], name)
        apps = yaml.safe_load(spec["serveConfigV2"])["applications"]
        assert apps and all(a["import_path"] and a["route_prefix"] for a in apps)
    for i, t in enumerate(templates):
        validate_pod_template(t, f"{name} pod template {i}")
    for other in docs:  # e.g. the shared-volume PVC: plain Kubernetes objects
        if other["apiVersion"] != "ray.io/v1":
            kubernetes_validate.validate(other, K8S_VERSION, strict=True)


@pytest.mark.timeout(120)
def test_rayservice_serve_config_is_generated_by_raylm(cli):
    """The committed serveConfigV2 is exactly `raylm serve --print-config` (the command in the file's header)."""
    text = (CLUSTER / "kuberay" / "rayservice.yaml").read_text()
    command = next(line.split("#", 1)[1].strip() for line in text.splitlines()
                   if line.lstrip("# ").startswith("raylm serve --print-config"))
    args = command.split()[1:]
    proc = cli(*args, timeout=100)
    assert proc.returncode == 0, proc.stderr
    committed = kuberay_docs("rayservice.yaml")[0]["spec"]["serveConfigV2"]
    assert yaml.safe_load(committed) == yaml.safe_load(proc.stdout)
    assert committed.strip() == proc.stdout.strip()


# ------------------------------------------------------------------------------------ autoscaling
FAKE_CLUSTER = {
    "cluster_name": "raylm-fake",
    "max_workers": 2,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,  # scale back down within seconds once prepare is done
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",
    "available_node_types": {
        # the head has no CPU for Ray Data tasks: every task needs a worker node the autoscaler must add
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}

# its own driver process: the test process may already hold the session's ray_session cluster
DRIVER = r"""
import json, sys, threading, time
import ray
from raylm.runtime import ensure_ray
import raylm.cli

address, args = sys.argv[1], sys.argv[2:]
ensure_ray(address)
alive = lambda: sum(1 for n in ray.nodes() if n["Alive"])
counts = {"before": alive()}
peak, done = [counts["before"]], threading.Event()
def watch():
    while not done.is_set():
        peak.append(alive()); time.sleep(0.5)
threading.Thread(target=watch, daemon=True).start()
counts["rc"] = raylm.cli.main(args)
done.set()
counts["peak"] = max(peak + [alive()])
print("NODE_COUNTS " + json.dumps(counts), flush=True)
"""

# after the driver exits: Ray Data's helper actors live as long as their driver and keep a node busy
AFTER = r"""
import sys, time
import ray
ray.init(address=sys.argv[1])
alive = lambda: sum(1 for n in ray.nodes() if n["Alive"])
deadline = time.time() + 120
while alive() > 1 and time.time() < deadline:
    time.sleep(1)
print("AFTER " + str(alive()), flush=True)
"""


@pytest.mark.timeout(600)  # prepare on freshly launched fake nodes took >5 min on a loaded 2-core box
def test_fake_autoscaling_cluster_adds_workers_for_prepare(tmp_path):
    out, log = tmp_path / "out", tmp_path / "driver.log"
    with PrivateHead(num_cpus=0, autoscaling_config=copy.deepcopy(FAKE_CLUSTER)) as head, open(log, "w") as f:
        try:
            subprocess.run(
                [sys.executable, "-c", DRIVER, head.gcs_address, "prepare", "-c", str(REPO / "configs/quickstart.yaml"),
                 "--set", f"output_dir={out}", "--set", "data.sources=[{builtin: python-docs, max_docs: 60}]",
                 "--set", "data.tokenizer.train.vocab_size=300", "--set", "data.clean.dedup=exact"],
                env={**head.env, "PYTHONPATH": str(REPO / "platform")}, stdout=f, stderr=subprocess.STDOUT,
                timeout=480, cwd=tmp_path)
            subprocess.run([sys.executable, "-c", AFTER, head.gcs_address], env=head.env, stdout=f,
                           stderr=subprocess.STDOUT, timeout=180, cwd=tmp_path)
        except subprocess.TimeoutExpired:
            pass
    text = log.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("NODE_COUNTS ")), None)
    assert line, f"driver did not finish:\n{text[-6000:]}"
    counts = json.loads(line.removeprefix("NODE_COUNTS "))
    counts["after"] = int(next((ln.split()[1] for ln in text.splitlines() if ln.startswith("AFTER ")), -1))
    print(f"autoscaling node counts: {counts}")
    assert counts["rc"] == 0, text[-6000:]
    assert counts["before"] == 1, "only the head at the start"
    assert counts["peak"] >= 2, "the autoscaler launched worker nodes for the Ray Data tasks"
    assert counts["after"] == 1, "idle workers were removed again"
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0
