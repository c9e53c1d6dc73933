"""A real S3-compatible server (moto) on 127.0.0.1 for tests that put `output_dir` in object storage."""

from __future__ import annotations

import os
from contextlib import contextmanager

from ray_head import free_port

BUCKET = "raylm-test"
# what a node's instance credentials would be; the endpoint reaches clients as AWS_ENDPOINT_URL (as the AWS SDK)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server():
    """A moto S3 server with the bucket created; yields its endpoint (host:port). The credentials are in
    os.environ meanwhile, so clients started from the test process inherit them."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    endpoint = f"127.0.0.1:{port}"
    try:
        fs, _ = pafs.FileSystem.from_uri(
            f"s3://{BUCKET}?endpoint_override={endpoint}&scheme=http&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield endpoint
    finally:
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
