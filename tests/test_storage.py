"""Object storage: `output_dir: s3://...` for a whole run, against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import yaml

BUCKET = "raylm-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with the bucket created; yields its endpoint (host:port)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    endpoint = f"127.0.0.1:{port}"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?endpoint_override={endpoint}&scheme=http&allow_bucket_creation=true")
    fs.create_dir(BUCKET)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def listing(uri: str) -> dict[str, int]:
    """Relative path -> size of every object under `uri`."""
    import pyarrow.fs as pafs

    from raylm.storage import resolve

    fs, root = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def test_storage_atomic_writes_dir_round_trip_and_verified_cache(s3, tmp_path, monkeypatch):
    """Local path and S3 URI alike: atomic JSON writes, a directory uploaded with its marker last, downloaded into
    a verified cache; a tampered cache is re-fetched, a tampered store is refused, a re-upload drops stale files."""
    from raylm import storage
    from raylm.config import ConfigError, load_config

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    query = f"?endpoint_override={s3}&scheme=http"
    for base in (str(tmp_path / "local-out"), f"s3://{BUCKET}/unit{query}"):
        target = storage.join(base, "sub", "metrics.json")
        storage.write_json_atomic(target, {"loss": 1.5, "path": tmp_path})
        storage.write_json_atomic(target, {"loss": 0.5})
        assert storage.read_json(target) == {"loss": 0.5}
        assert list(listing(storage.join(base, "sub"))) == ["metrics.json"]  # no temp file left behind

        src = tmp_path / "model-src"
        (src / "nested").mkdir(parents=True, exist_ok=True)
        (src / "config.json").write_text('{"a": 1}')
        (src / "nested" / "weights.bin").write_bytes(os.urandom(3000))
        (src / "stale.txt").write_text("from the first upload")
        model_uri = storage.join(base, "model")
        storage.upload_dir(src, model_uri)
        (src / "stale.txt").unlink()
        storage.upload_dir(src, model_uri)  # replaces the directory: the stale file goes
        stored = listing(model_uri)
        assert set(stored) == {"config.json", "nested/weights.bin", storage.MARKER}
        marker = storage.read_marker(model_uri)["files"]
        assert marker["nested/weights.bin"]["size"] == 3000 == stored["nested/weights.bin"]
        # entries Ray wrote in place (prepare's shards) survive an upload and are listed by size
        data_uri = storage.join(base, "data")
        storage.write_bytes_atomic(storage.join(data_uri, "train", "train-00000.parquet"), b"x" * 10)
        storage.upload_dir(src, data_uri, keep=("train",))
        assert storage.read_marker(data_uri)["files"]["train/train-00000.parquet"] == {"size": 10}
        assert not (storage.download_dir(data_uri, tmp_path / f"d-{len(base)}", skip=("train",)) / "train").exists()

        local = storage.materialize(model_uri)
        if storage.is_uri(base):
            assert str(local).startswith(str(tmp_path / "cache")), local
        assert (local / "nested" / "weights.bin").read_bytes() == (src / "nested" / "weights.bin").read_bytes()
        if storage.is_uri(base):
            # a tampered cached file (same size) is noticed and fetched again
            data = bytearray((local / "nested" / "weights.bin").read_bytes())
            data[0] ^= 0xFF
            (local / "nested" / "weights.bin").write_bytes(bytes(data))
            again = storage.materialize(model_uri)
            assert (again / "nested" / "weights.bin").read_bytes() == (src / "nested" / "weights.bin").read_bytes()
        # a stored file that no longer matches the marker (tampered or half-replaced) is refused, never served
        fs, root = storage.resolve(model_uri)
        with fs.open_output_stream(f"{root}/config.json") as f:
            f.write(b'{"a": 2}')
        with pytest.raises(ValueError, match="config.json"):
            storage.download_dir(model_uri, tmp_path / f"fresh-{len(base)}")
        fs.delete_file(f"{root}/{storage.MARKER}")
        with pytest.raises(FileNotFoundError, match="no complete upload"):
            storage.download_dir(model_uri, tmp_path / f"fresh2-{len(base)}")

    with pytest.raises(ConfigError, match="output_dir: unsupported storage scheme ftp://"):
        load_config(None, ["output_dir=ftp://host/out"])
    cfg = load_config(None, [f"output_dir=s3://{BUCKET}/run{query}"])
    assert cfg.uri("data", "train") == f"s3://{BUCKET}/run/data/train{query}"
    assert cfg.path("data").parent == storage.mirror_dir(cfg.output_dir)


@pytest.mark.timeout(900)  # ~3 min on an idle 2-core box; a shared, loaded one needs the room
def test_run_with_output_dir_in_s3(s3, cli, repo_root, tmp_path):
    """`raylm run --no-wait` with `output_dir: s3://raylm-test/run1`: every stage reads and writes the bucket
    (endpoint from AWS_ENDPOINT_URL, as the AWS SDK takes it); checkpoints, model and reports land there, the
    served model answers, and the stored model loads on a node with an empty cache."""
    from raylm import storage

    out = f"s3://{BUCKET}/run1"
    cfg = yaml.safe_load((repo_root / "configs" / "quickstart.yaml").read_text())
    cfg["output_dir"] = out
    cfg["data"]["sources"] = [{"builtin": "python-docs", "max_docs": 60}]
    cfg["data"]["tokenizer"] = {"train": {"type": "bpe", "vocab_size": 512}}
    cfg["data"]["block_size"] = 64
    cfg["data"]["shards_per_split"] = 2
    cfg["model"]["arch"] = {"family": "gpt2", "n_layer": 1, "d_model": 64, "n_head": 2}
    cfg["train"].update(max_steps=4, eval_every=2, checkpoint_every=2, eval_batches=2, batch_size=4,
                        tracking=["tensorboard"])
    cfg["serve"].update(port=free_port(), num_cpus_per_replica=0.5,
                        autoscaling={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2})
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{s3}", storage.CACHE_ENV: str(tmp_path / "node-cache")}

    proc = cli("run", "-c", str(path), "--no-wait", "--address", "local", env=env, timeout=870)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # `raylm inspect` reads the train shards where prepare wrote them: in the bucket
    proc = cli("inspect", "-c", str(path), "--reason", "kept", "-n", "1", env=env, timeout=120)
    assert proc.returncode == 0 and "train row 0" in proc.stdout, proc.stderr[-2000:]

    os.environ["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
    try:
        stored = listing(out)
        summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
        assert summary["status"] == "ok", summary
        print(f"object-storage run: {summary['wall_time_s']:.0f}s; steps "
              f"{ {k: v['wall_time_s'] for k, v in summary['steps'].items()} }")
        assert summary["sample"]["response"]["choices"][0]["text"]
        # data: shards, manifest and the marker written last
        assert {"data/manifest.json", f"data/{storage.MARKER}"} <= set(stored)
        assert all(any(k.startswith(f"data/{s}/") and k.endswith(".parquet") for k in stored) for s in ("train", "test"))
        # what prepare's Ray tasks write on any node went to the bucket itself; its staged passes are gone
        assert any(k.startswith("data/documents.parquet/") for k in stored), sorted(stored)[:40]
        assert any(k.startswith("data/rejected/") and k.endswith(".parquet") for k in stored), sorted(stored)[:40]
        assert not [k for k in stored if k.startswith("data/.stage")], "staged passes left in the bucket"
        mirrors = tmp_path / "node-cache" / "runs"  # ... never in this node's mirror, nor pulled back into it
        assert list(mirrors.glob("*/data/manifest.json")), "the mirror is where the test expects it"
        assert not list(mirrors.glob("*/data/rejected/*.parquet")) and not list(mirrors.glob("*/data/train/*.parquet"))
        # Ray Train wrote its checkpoints straight to the bucket: complete (state + every rank's manifest)
        ckpts = {m.group(1) for k in stored if (m := re.match(r"(train/[^/]+/checkpoint_[^/]+)/", k))}
        assert ckpts, sorted(stored)[:40]
        for ckpt in ckpts:
            names = {k[len(ckpt) + 1:] for k in stored if k.startswith(ckpt + "/")}
            assert {"raylm_state.json", "raylm_files.rank0.json", "raylm_files.rank1.json"} <= names, (ckpt, names)
            assert any(n.startswith("ds/") and n.endswith("optim_states.pt") for n in names), (ckpt, names)
        assert {"model/config.json", "model/model.safetensors", f"model/{storage.MARKER}", "metrics.json",
                "report.md", "summary.json", "model/README.md", f"tracking/{storage.MARKER}"} <= set(stored)
        assert any(k.startswith("tracking/tensorboard/") and "tfevents" in k for k in stored), sorted(stored)
        assert "README.md" in json.loads(storage.read_bytes(f"{out}/model/{storage.MARKER}"))["files"]
        metrics = json.loads(storage.read_bytes(f"{out}/metrics.json"))
        assert metrics["model_dir"] == f"{out}/model" and metrics["rows"] > 0

        # a fresh node: the stored model downloads (verified) into an empty cache and loads with transformers alone
        os.environ[storage.CACHE_ENV] = str(tmp_path / "other-node")
        local = storage.materialize(f"{out}/model")
        assert str(local).startswith(str(tmp_path / "other-node"))
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(local).config.n_layer == 1
        assert "model-index" in (local / "README.md").read_text(), "the model card came with the model"
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        os.environ.pop(storage.CACHE_ENV, None)
