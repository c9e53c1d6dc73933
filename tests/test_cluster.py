"""cluster/: autoscaler YAMLs pass Ray's own validation, KubeRay manifests pass ray.io/v1 and Kubernetes checks,
RayService's serve config is the one raylm generates, and autoscaling really adds nodes for a raylm stage."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray_head import BIN, PrivateHead, device_choices, free_port, job_state, log_tail, readme_submit
from s3_store import BUCKET, CREDENTIALS, listing, s3_server

from raylm import storage

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

    # safe defaults: token auth on every node, the dashboard (the Jobs API) on the head's loopback only
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in (CLUSTER / name).read_text()
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "the client's token on every node"

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
    """The ray.io/v1 RayCluster spec fields KubeRay requires, and safe defaults; returns every pod template."""
    assert spec.get("rayVersion") == "2.60.0", where
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling on"
    assert spec.get("authOptions") == {"mode": "token"}, f"{where}: Ray token auth on (KubeRay authOptions)"
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head's ports stay inside the cluster"
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
        # nothing in-cluster needs the Jobs API of a plain RayCluster: loopback, reached with kubectl port-forward
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
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
        # Serve on the pod's address only with an API key: the entrypoint's own config must validate
        from raylm.config import load_config

        args = spec["entrypoint"].split()
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        cfg = load_config(REPO / args[args.index("-c") + 1], overrides)
        assert cfg.serve.host == "0.0.0.0" and cfg.serve.api_key_env, overrides
        head_env = {e["name"] for e in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert cfg.serve.api_key_env in head_env, "the job's driver gets the key from a Secret"
    else:
        templates = check_cluster_spec(spec["rayClusterConfig"], name)
        apps = yaml.safe_load(spec["serveConfigV2"])["applications"]
        assert apps and all(a["import_path"] and a["route_prefix"] for a in apps)
        # KubeRay's Serve proxies listen on the pods' addresses: every app requires an API key from a Secret
        assert all(a["args"].get("api_key_env") for a in apps), "serve beyond loopback needs serve.api_key_env"
        for t in templates:
            env = {e["name"] for c in t["spec"]["containers"] for e in c.get("env", [])}
            assert {a["args"]["api_key_env"] for a in apps} <= env, "every pod gets the key from a Secret"
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


@pytest.mark.timeout(60)
def test_serve_beyond_loopback_requires_an_api_key(cli):
    for host in ("0.0.0.0", "10.1.2.3", "'::'", "raylm.example.com"):
        proc = cli("validate", "-c", "configs/quickstart.yaml", "--set", f"serve.host={host}", timeout=50)
        assert proc.returncode == 2 and "config error: serve.host:" in proc.stderr and "api_key_env" in proc.stderr, \
            (host, proc.stderr)
    for extra in (["--set", "serve.host=0.0.0.0", "--set", "serve.api_key_env=RAYLM_API_KEY"],
                  ["--set", "serve.host=localhost"], ["--set", "serve.host=127.0.0.1"]):
        proc = cli("validate", "-c", "configs/quickstart.yaml", *extra, timeout=50)
        assert proc.returncode == 0, (extra, proc.stderr)


# ------------------------------------------------------------------------------------ autoscaling
FAKE_CLUSTER = {
    "cluster_name": "raylm-fake",
    "max_workers": 3,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.5,  # back down soon after the driver exits; shorter raced Ray Data actors being placed
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",
    "available_node_types": {
        # the head has no CPU for Ray Data tasks: every task needs a worker node the autoscaler must add
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3},
    },
    "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}

# its own driver process: the test process may already hold the session's ray_session cluster. Runs each
# `raylm` argv in turn and records the alive-node count before and at its peak for each.
DRIVER = r"""
import json, sys, threading, time
import ray
from raylm.runtime import ensure_ray
import raylm.cli

address, stages = sys.argv[1], json.loads(sys.argv[2])
ensure_ray(address)
alive = lambda: sum(1 for n in ray.nodes() if n["Alive"])
counts = {"before": alive()}
for name, args in stages:
    peak, done = [alive()], threading.Event()
    def watch():
        while not done.is_set():
            peak.append(alive()); time.sleep(0.5)
    threading.Thread(target=watch, daemon=True).start()
    counts[name + "_rc"] = raylm.cli.main(args)
    done.set()
    counts[name + "_peak"] = max(peak + [alive()])
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
if alive() > 1:  # what keeps a node from being idle, for the assertion message
    from ray.util.state import list_actors, list_placement_groups, list_tasks
    print("LEFT actors", [(a.class_name, a.node_id[:8], a.ray_namespace) for a in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], detail=True)])
    print("LEFT pgs", [(p.name, p.state) for p in list_placement_groups(address=sys.argv[1]) if p.state != "REMOVED"])
    print("LEFT tasks", [(t.name, t.state) for t in list_tasks(address=sys.argv[1], filters=[("state", "=", "RUNNING")])])
    print("LEFT nodes", [(n["NodeID"][:8], n["Resources"]) for n in ray.nodes() if n["Alive"]])
    print("LEFT usage", ray.available_resources(), flush=True)
"""

TINY = ["--set", "data.block_size=32"]  # tiny_data's shards
TINY_TUNE = ["--set", "model.arch={family: gpt2, n_layer: 1, d_model: 32, n_head: 2}", "--set", "train.num_workers=1",
             "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.eval_every=1",
             "--set", "train.checkpoint_every=1", "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1",
             "--set", "tune={num_samples: 2, max_concurrent: 2, scheduler: {type: none}, "
                      "space: {train.lr: {choice: [0.001, 0.003]}}}"]


# max_workers 3: with 2, the second trial's Ray Data ingest waited for a CPU the cap forbids (seen once)
@pytest.mark.timeout(1800)  # 2 trials on freshly launched fake nodes: a few minutes idle, >10 min at load 40
def test_fake_autoscaling_cluster_adds_workers_for_tune(tmp_path):
    """A head with 0 CPUs and min_workers 0, as the shipped cluster files: `raylm tune` with 2 trials
    (tune.max_concurrent 2) makes the autoscaler add nodes; both trials finish, best.json is written; idle nodes
    go. (Prepare's Ray Data tasks on added nodes are the multi-node run's; here tune gets ready-made shards.)"""
    from tiny_data import build_lm_workspace

    out, log = tmp_path / "out", tmp_path / "driver.log"
    build_lm_workspace(out)
    stages = [["tune", ["tune", "-c", str(REPO / "configs/quickstart.yaml"), "--set", f"output_dir={out}", *TINY,
                        *TINY_TUNE]]]
    with PrivateHead(num_cpus=0, autoscaling_config=copy.deepcopy(FAKE_CLUSTER)) as head, open(log, "w") as f:
        try:
            subprocess.run([sys.executable, "-c", DRIVER, head.gcs_address, json.dumps(stages)],
                           env={**head.env, "PYTHONPATH": str(REPO / "platform")}, stdout=f, stderr=subprocess.STDOUT,
                           timeout=1500, cwd=tmp_path)
            subprocess.run([sys.executable, "-c", AFTER, head.gcs_address], env=head.env, stdout=f,
                           stderr=subprocess.STDOUT, timeout=180, cwd=tmp_path)
        except subprocess.TimeoutExpired:
            pass
    text = log.read_text()
    # Ray Data's progress bars share the driver's stdout: a record may start mid-line
    lines = re.findall(r"NODE_COUNTS (\{.*?\})", text)
    assert lines, f"driver did not finish tune:\n{log_tail(text)}"
    counts = json.loads(lines[-1])
    counts["after"] = int(next(iter(re.findall(r"AFTER (\d+)", text)), -1))
    print(f"autoscaling node counts: {counts}")
    assert counts["before"] == 1, "only the head at the start"
    assert counts.get("tune_rc") == 0, log_tail(text)
    assert counts["tune_peak"] >= 2, "trials' workers were placed on nodes the autoscaler added"
    best = json.loads((out / "tune" / "best.json").read_text())
    assert len(best["trials"]) == 2 and all(t["status"] == "finished" for t in best["trials"]), best["trials"]
    assert (out / "model" / "model.safetensors").is_file()
    assert counts["after"] == 1, "idle workers were removed again:\n" + "\n".join(re.findall(r"LEFT .*", text))


# ------------------------------------------------------------------------------------ several nodes
# A head with 0 CPUs plus three worker nodes, each its own raylet joined with `ray start --address` (own temp dir,
# own process group, 3 logical CPUs); one cluster for both multi-node tests. Training workers take 2 CPUs each, so
# no node fits two of them: the 2 workers land on different nodes and a third node is the spare. No node shares
# a file system path with another for the run: output_dir is in object storage (a moto S3 server on loopback), as
# on a real cluster without a shared volume; every node gets the credentials and endpoint as instance env would.
NODE_CPUS, WORKER_CPUS = 3, 2
MULTINODE_DATA = ["--set", "data.sources=[{builtin: python-docs, max_docs: 60}]",
                  "--set", "data.tokenizer.train.vocab_size=300", "--set", "data.block_size=32",
                  "--set", "data.clean.dedup=exact", "--set", "data.shards_per_split=2"]
MULTINODE_TRAIN = ["--set", "model.arch={family: gpt2, n_layer: 1, d_model: 32, n_head: 2}",
                   "--set", f"train.cpus_per_worker={WORKER_CPUS}", "--set", "train.num_workers=2",
                   "--set", "train.batch_size=2", "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1",
                   "--set", "train.log_every=1", "--set", "train.early_stopping=null", "--set", "train.max_failures=1"]


def alive_nodes(head: PrivateHead) -> list[dict]:
    proc = head.ray("list", "nodes", "--address", head.dashboard_url, "--format", "json", "--detail",
                    "--filter", "state=ALIVE", timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    cache = tmp_path_factory.mktemp("node-cache")
    with s3_server() as endpoint:
        env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{endpoint}", storage.CACHE_ENV: str(cache)}
        with PrivateHead(num_cpus=0, env=env) as head:
            for k in range(3):
                head.add_node(num_cpus=NODE_CPUS, resources={f"raylm_test_node_{k}": 1})
            deadline, nodes = time.time() + 120, []
            while time.time() < deadline and len(nodes) < 4:
                nodes = alive_nodes(head)
                time.sleep(1)
            assert len(nodes) == 4, nodes
            head.head_node_id = next(n["node_id"] for n in nodes if n["is_head_node"])
            for node in head.nodes:  # Ray's node id of each WorkerNode, by its marker resource
                marker = next(iter(node.resources))
                node.node_id = next(n["node_id"] for n in nodes if marker in (n.get("resources_total") or {}))
            head.store_env, head.cache = env, cache
            os.environ["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]  # the test's own reads of the bucket
            try:
                yield head
            finally:
                os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="module")
def multinode_run(multinode):
    """The README's `jobs/run.py --no-wait` line against the multi-node head, `output_dir` in the bucket: prepare,
    train, evaluate, serve."""
    out = f"s3://{BUCKET}/multinode"
    port = free_port()
    start = time.time()
    job_id, state, logs = readme_submit(multinode, "run.py", out, *MULTINODE_DATA, *MULTINODE_TRAIN,
                                        "--set", "train.max_steps=4", "--set", "train.eval_every=2",
                                        "--set", "train.checkpoint_every=2", "--set", "train.tracking=[tensorboard]",
                                        "--set", f"serve.port={port}", timeout=600)
    return {"out": out, "state": state, "logs": logs, "wall_s": time.time() - start, "port": port}


def checkpoint_dirs(stored: dict[str, int]) -> set[str]:
    return {m.group(1) for k in stored if (m := re.match(r"(train/[^/]+/checkpoint_[^/]+)/", k))}


@pytest.mark.timeout(900)
def test_multinode_run_trains_on_two_nodes_and_serves(multinode, multinode_run, cli):
    """One run.py job on three worker nodes with output_dir in S3: the two training workers on different nodes;
    every stage reads and writes the bucket (nothing is left in, or pulled into, a node's mirror); checkpoints
    complete in the bucket; the served model answers through the Serve proxy; the stored model loads elsewhere."""
    run, out = multinode_run, multinode_run["out"]
    print(f"multi-node run.py job: {run['state']} in {run['wall_s']:.0f}s")
    assert run["state"] == "SUCCEEDED", log_tail(run["logs"])
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert summary["status"] == "ok" and all(s["status"] == "ok" for s in summary["steps"].values()), summary
    assert set(summary["steps"]) >= {"prepare", "train", "evaluate", "serve", "request"}
    print(f"steps: { {k: v['wall_time_s'] for k, v in summary['steps'].items()} }")
    print(f"prepare stages: {json.loads(storage.read_bytes(f'{out}/data/manifest.json'))['stages_s']}")
    assert summary["sample"]["response"]["choices"][0]["text"], summary["sample"]
    # the two training workers ran on two different worker nodes (never the 0-CPU head)
    choices = {rank: node for rank, *_, node in device_choices(run["logs"])}
    worker_ids = {n.node_id for n in multinode.nodes}
    print(f"training placement: {choices}; worker nodes {[n.node_id for n in multinode.nodes]}")
    assert sorted(choices) == [0, 1] and choices[0] != choices[1], choices
    assert set(choices.values()) <= worker_ids, (choices, worker_ids)

    stored = listing(out)
    # data: shards, manifest and the marker written last; what prepare's Ray tasks write on any node went to the
    # bucket itself, and its staged passes are gone
    assert {"data/manifest.json", f"data/{storage.MARKER}"} <= set(stored)
    assert all(any(k.startswith(f"data/{s}/") and k.endswith(".parquet") for k in stored) for s in ("train", "test"))
    assert any(k.startswith("data/documents.parquet/") for k in stored), sorted(stored)[:40]
    assert any(k.startswith("data/rejected/") and k.endswith(".parquet") for k in stored), sorted(stored)[:40]
    assert not [k for k in stored if k.startswith("data/.stage")], "staged passes left in the bucket"
    mirrors = multinode.cache / "runs"  # every node's mirror (one machine): small files only, never the rows
    assert list(mirrors.glob("*/data/manifest.json")), "the mirror is where the test expects it"
    assert not list(mirrors.glob("*/data/rejected/*.parquet")) and not list(mirrors.glob("*/data/train/*.parquet"))
    # Ray Train wrote its checkpoints from both nodes straight to the bucket: complete (state + every rank's files)
    ckpts = checkpoint_dirs(stored)
    assert ckpts, sorted(stored)[:40]
    for ckpt in ckpts:
        names = {k[len(ckpt) + 1:] for k in stored if k.startswith(ckpt + "/")}
        assert {"raylm_state.json", "raylm_files.rank0.json", "raylm_files.rank1.json"} <= names, (ckpt, names)
        assert any(n.startswith("ds/") and n.endswith("optim_states.pt") for n in names), (ckpt, names)
    assert {"model/config.json", "model/model.safetensors", f"model/{storage.MARKER}", "metrics.json",
            "report.md", "summary.json", "model/README.md", f"tracking/{storage.MARKER}"} <= set(stored)
    assert any(k.startswith("tracking/tensorboard/") and "tfevents" in k for k in stored), sorted(stored)
    metrics = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    assert metrics["model_dir"] == f"{out}/model" and metrics["rows"] > 0

    # `raylm inspect` reads the train shards where prepare wrote them: in the bucket
    proc = cli("inspect", "-c", "configs/quickstart.yaml", "--set", f"output_dir={out}", *MULTINODE_DATA,
               "--reason", "kept", "-n", "1", env=multinode.store_env, timeout=120)
    assert proc.returncode == 0 and "train row 0" in proc.stdout, proc.stderr[-2000:]

    # one more request through the Serve proxy the job left running (Serve outlives the job's driver)
    req = urllib.request.Request(f"http://127.0.0.1:{run['port']}/v1/completions",
                                 data=json.dumps({"prompt": "def ", "max_tokens": 4}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200 and json.loads(resp.read())["choices"]
    # free the replicas' CPUs for the next test
    proc = subprocess.run([str(BIN / "serve"), "shutdown", "--address", multinode.dashboard_url, "--yes"],
                          env=multinode.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    # a fresh node: the stored model downloads (verified) into an empty cache and loads with transformers alone
    os.environ[storage.CACHE_ENV] = str(multinode.cache.parent / "other-node")
    try:
        local = storage.materialize(f"{out}/model")
    finally:
        os.environ.pop(storage.CACHE_ENV, None)
    assert str(local).startswith(str(multinode.cache.parent / "other-node"))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(local).config.n_layer == 1
    assert "model-index" in (local / "README.md").read_text(), "the model card came with the model"


@pytest.mark.timeout(900)
def test_multinode_training_resumes_on_spare_node_after_losing_a_node(multinode, multinode_run):
    """Kill the node (raylet process group) of one training worker after the first checkpoint: Ray Train restarts
    the worker group on the surviving and the spare node, from that checkpoint in the bucket, and finishes."""
    out = multinode_run["out"]
    stored = listing(out)
    assert "data/manifest.json" in stored, "needs the prepared data of the multi-node run"
    earlier = checkpoint_dirs(stored)
    steps = 32
    start = time.time()
    job_id, state, _ = readme_submit(multinode, "train.py", out, *MULTINODE_DATA, *MULTINODE_TRAIN,
                                     "--set", f"train.max_steps={steps}", "--set", "train.eval_every=16",
                                     "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=50",
                                     wait=False, timeout=120)
    assert state in ("PENDING", "RUNNING"), state
    # the workers' placement is in the job's log (each `ray job` call imports Ray: seconds); the first checkpoint
    # lands in output_dir/train/<run>/checkpoint_* (a bucket listing: milliseconds), so wait for them in that order
    # and kill without a slow poll between: a 2-worker step takes ~1 s, and a late kill finds the run finished
    victim, ckpts_at_kill, placed = None, [], {}
    deadline = time.time() + 420
    while time.time() < deadline and 1 not in placed:
        state, logs = job_state(multinode, job_id)
        assert state in ("PENDING", "RUNNING"), f"job ended before the kill ({state}):\n{log_tail(logs)}"
        placed = {rank: node for rank, *_, node in device_choices(logs)}
        time.sleep(1)
    while time.time() < deadline and 1 in placed:
        if checkpoint_dirs(listing(out)) - earlier:
            time.sleep(4)  # Ray Train polls reports every ~2 s: let it register the checkpoint first
            ckpts_at_kill = sorted(checkpoint_dirs(listing(out)) - earlier)
            victim = next(n for n in multinode.nodes if n.node_id == placed[1])
            first_placement = dict(placed)
            victim.kill()
            killed_at = time.time()
            break
        time.sleep(0.3)
    assert victim is not None, f"no checkpoint within the deadline:\n{log_tail(logs)}"
    spare = next(n.node_id for n in multinode.nodes if n.node_id not in first_placement.values())
    while time.time() < killed_at + 420:
        state, logs = job_state(multinode, job_id)
        if state not in ("PENDING", "RUNNING"):
            break
        time.sleep(3)
    wall = time.time() - start
    assert state == "SUCCEEDED", log_tail(logs, 8000)
    resumed = [int(m) for m in re.findall(r"resumed from checkpoint at step (\d+)", logs)]
    placements = device_choices(logs)
    after = {rank: node for rank, *_, node in placements[len(first_placement):]}
    print(f"fault run: {wall:.0f}s; first placement {first_placement}, killed {victim.node_id}, "
          f"checkpoints at kill {[c.rsplit('/', 1)[1] for c in ckpts_at_kill]}, resumed from steps {resumed}, "
          f"new placement {after}")
    assert resumed and 2 <= resumed[0] < steps and resumed[0] % 2 == 0, resumed
    assert victim.node_id not in after.values() and spare in after.values(), (after, victim.node_id, spare)
    summary = json.loads(storage.read_bytes(f"{out}/model/training_summary.json"))
    assert summary["steps"] == steps and summary["resumed_from"] == resumed[:1], summary["resumed_from"]
    assert time.time() - killed_at < 420
