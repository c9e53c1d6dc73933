"""`raylm serve`: deploy a Hugging Face model directory on Ray Serve behind an OpenAI-compatible HTTP API.

`serve(cfg)` runs the application on the connected Ray cluster; `serve_config(cfg)` prints the same
application as a Ray Serve config (the `applications:` list a KubeRay RayService takes as `serveConfigV2`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import yaml

from raylm import storage
from raylm.config import Config, ConfigError

IMPORT_PATH = "raylm.serve.app:build_app"


def resolve_model_dir(cfg: Config, model_dir: str | os.PathLike | None) -> str:
    """The model replicas load: a local path, or a URI they each download (verified) into their node's cache."""
    ref = str(model_dir) if model_dir else cfg.uri("model")
    try:
        path = storage.materialize(ref)  # this node's copy, to check it and read its task
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError("--model" if model_dir else "output_dir", f"no usable model at {ref}: {e}") from None
    if not (path / "config.json").is_file():
        raise ConfigError("--model" if model_dir else "output_dir",
                          f"no Hugging Face model at {path} (config.json missing): run `raylm train` first or pass --model")
    return ref if storage.is_uri(ref) else str(path)


def app_args(cfg: Config, model_dir: str | os.PathLike) -> dict[str, Any]:
    """The builder's args: the model, its served name and the `serve` section (never the API key itself)."""
    settings = cfg.serve.model_dump(mode="json", exclude={"host", "port", "route_prefix"})
    return {"model_dir": str(model_dir), "name": cfg.name, "task": cfg.model.task, **settings}


def serve_config(cfg: Config, model_dir: str | os.PathLike | None = None) -> str:
    """Ray Serve config YAML for this model (`applications:`), for `serve deploy` or a RayService serveConfigV2."""
    model = str(model_dir) if model_dir else cfg.uri("model")
    app = {"name": cfg.name, "route_prefix": cfg.serve.route_prefix, "import_path": IMPORT_PATH,
           "args": app_args(cfg, model)}
    return yaml.safe_dump({"applications": [app]}, sort_keys=False)


def base_url(cfg: Config) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::", "") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"


def curl_line(cfg: Config, task: str) -> str:
    auth = f" -H \"Authorization: Bearer ${cfg.serve.api_key_env}\"" if cfg.serve.api_key_env else ""
    route, body = {
        "causal_lm": ("/v1/completions", f'{{"model": "{cfg.name}", "prompt": "def ", "max_tokens": 20}}'),
        "classification": ("/v1/classify", '{"inputs": ["This is great."]}'),
        "masked_lm": ("/v1/fill-mask", '{"inputs": ["Paris is the [MASK] of France."]}'),
        "embedding": ("/v1/embeddings", '{"input": ["A sentence to embed."]}'),
    }[task]
    return f"curl -s {base_url(cfg)}{route}{auth} -H 'Content-Type: application/json' -d '{body}'"


def serve(cfg: Config, model_dir: str | os.PathLike | None = None, blocking: bool = True) -> str:
    """Deploy the model (Ray already initialized) and return its base URL; with `blocking`, serve until Ctrl-C."""
    from ray import serve as ray_serve

    from raylm.serve.api import key_digest, load_api_keys
    from raylm.serve.app import build_app
    from raylm.serve.model import model_task

    path = resolve_model_dir(cfg, model_dir)
    args = app_args(cfg, path)
    keys = load_api_keys(cfg.serve.api_key_env, cfg.serve.api_keys_env)  # ConfigError naming the key if missing
    if keys:
        args["api_key_sha256"] = ",".join(key_digest(k).hex() for k in keys)  # replicas get digests, never a key
    # the HTTP port is fixed per Serve instance: a running instance keeps its own (see `base_url`)
    ray_serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port,
                                  "request_timeout_s": cfg.serve.request_timeout_s})
    started = time.perf_counter()
    ray_serve.run(build_app(args), name=cfg.name, route_prefix=cfg.serve.route_prefix, blocking=False)
    url = base_url(cfg)
    task = model_task(storage.materialize(path), cfg.model.task)
    print(f"serving {cfg.name} ({task}) at {url} (ready in {time.perf_counter() - started:.1f}s)\n"
          f"  try: {curl_line(cfg, task)}", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"stopping {cfg.name}", flush=True)
            ray_serve.delete(cfg.name)
    return url
