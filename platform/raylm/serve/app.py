"""The Serve application builder: `raylm.serve.app:build_app` (usable as a serveConfigV2 import_path)."""

from __future__ import annotations

import math
from typing import Any

from ray.serve import Application

from raylm.serve.api import Ingress, ModelServerWithApi
from raylm.serve.model import ModelServer


def build_app(args: dict[str, Any]) -> Application:
    """The model deployment serving the HTTP API itself (ingress_replicas 0), or an ingress deployment in front of
    it; from `{model_dir, name, task?, api_key_env?, api_key_sha256?, **ServeCfg}`."""
    from raylm.config import ServeCfg

    settings = ServeCfg.model_validate({k: v for k, v in args.items() if k in ServeCfg.model_fields})
    auto = settings.autoscaling
    model_dir, name = str(args["model_dir"]), str(args.get("name", "raylm"))
    threads = max(1, math.floor(settings.num_cpus_per_replica))
    model_options = dict(
        autoscaling_config={"min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
                            "initial_replicas": max(1, auto.min_replicas),
                            "target_ongoing_requests": auto.target_ongoing_requests,
                            "upscale_delay_s": auto.upscale_delay_s, "downscale_delay_s": auto.downscale_delay_s,
                            "look_back_period_s": auto.look_back_period_s},
        # room for a full batch plus the requests queued behind it
        max_ongoing_requests=max(2 * settings.max_batch_size, math.ceil(2 * auto.target_ongoing_requests)),
        ray_actor_options={"num_cpus": settings.num_cpus_per_replica, "num_gpus": settings.num_gpus_per_replica},
    )
    model_args = {"model_dir": model_dir, "task": args.get("task"), "max_batch_size": settings.max_batch_size,
                  "batch_wait_timeout_s": settings.batch_wait_timeout_s, "num_threads": threads, "name": name}
    api_args = {"name": name, "model_dir": model_dir, "task": args.get("task"),
                "max_prompt_tokens": settings.max_prompt_tokens, "max_new_tokens": settings.max_new_tokens,
                "max_request_bytes": settings.max_request_bytes, "api_key_sha256": args.get("api_key_sha256"),
                "api_key_env": settings.api_key_env, "api_keys_env": settings.api_keys_env,
                "log_request_bodies": settings.log_request_bodies}
    if settings.ingress_replicas == 0:
        return ModelServerWithApi.options(**model_options).bind(model_args, **api_args)
    model = ModelServer.options(**model_options).bind(**model_args)
    return Ingress.options(
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=1000,  # the ingress only awaits the model; backpressure lives on the model replicas
        ray_actor_options={"num_cpus": 0},
    ).bind(model, **api_args)
