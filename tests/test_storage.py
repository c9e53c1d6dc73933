"""Object storage, a local path and an S3 URI alike, against a real S3-compatible server (moto) on loopback. A whole
run with `output_dir: s3://...` on several nodes is in test_cluster.py (the multi-node run writes to the bucket)."""

from __future__ import annotations

import os

import pytest

from s3_store import BUCKET, listing, s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        yield endpoint


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
