"""`raylm run`: prepare -> tune (if configured) or train -> evaluate -> serve -> one real request -> summary.json.

Each step's status and wall time land in `summary.json` (rewritten atomically after every step), so a failed run
still says how far it got; completed steps' outputs stay. A failed step raises `StepFailed("<step>: ...")`.
"""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import datetime, timezone
from typing import Any, Callable

from raylm.config import Config, ConfigError
from raylm.storage import write_json_atomic

# task -> (route, body) of the sample request that proves the endpoint answers
SAMPLE_REQUESTS: dict[str, tuple[str, dict]] = {
    "causal_lm": ("/v1/completions", {"prompt": "def ", "max_tokens": 16, "temperature": 0}),
    "classification": ("/v1/classify", {"inputs": ["This is a sample document."]}),
    "masked_lm": ("/v1/fill-mask", {"inputs": ["The [MASK] is here."]}),
}


class StepFailed(RuntimeError):
    """A step of `raylm run` failed; the message starts with the step's name."""


def sample_request(cfg: Config, url: str, task: str) -> dict:
    """One real HTTP request to the served model (stdlib client: no dependency beyond Python)."""
    route, body = SAMPLE_REQUESTS[task]
    body = {"model": cfg.name, **body}
    headers = {"Content-Type": "application/json"}
    from raylm.serve.api import load_api_keys

    keys = load_api_keys(cfg.serve.api_key_env, cfg.serve.api_keys_env)
    if keys:
        headers["Authorization"] = f"Bearer {keys[0]}"
    req = urllib.request.Request(url + route, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        response = json.loads(resp.read())
    return {"url": url + route, "request": body, "response": response}


def run(cfg: Config, wait: bool = True) -> dict:
    from raylm.data import prepare
    from raylm.evaluate import evaluate
    from raylm.serve import serve
    from raylm.serve.model import model_task

    summary: dict[str, Any] = {"name": cfg.name, "config_hash": cfg.config_hash(), "status": "running",
                               "started_at": datetime.now(timezone.utc).isoformat(), "steps": {}}
    out = cfg.uri("summary.json")  # each rewrite is one atomic file (or object) write
    t0 = time.perf_counter()

    def step(name: str, fn: Callable[[], Any]) -> Any:
        summary["steps"][name] = {"status": "running"}
        write_json_atomic(out, summary)
        start = time.perf_counter()
        print(f"== raylm run: {name}", flush=True)
        try:
            result = fn()
        except (ConfigError, KeyboardInterrupt):
            summary["steps"][name] = {"status": "failed", "wall_time_s": round(time.perf_counter() - start, 2)}
            summary["status"] = "failed"
            write_json_atomic(out, summary)
            raise
        except Exception as e:
            summary["steps"][name] = {"status": "failed", "wall_time_s": round(time.perf_counter() - start, 2),
                                      "error": f"{type(e).__name__}: {e}"[:2000]}
            summary["status"], summary["failed_step"] = "failed", name
            write_json_atomic(out, summary)
            raise StepFailed(f"{name}: {type(e).__name__}: {e}") from e
        summary["steps"][name] = {"status": "ok", "wall_time_s": round(time.perf_counter() - start, 2)}
        write_json_atomic(out, summary)
        return result

    step("prepare", lambda: prepare(cfg))
    if cfg.tune is not None:
        from raylm.tune import tune

        summary["tune"] = step("tune", lambda: tune(cfg))
    else:
        from raylm.train import train

        summary["train"] = step("train", lambda: train(cfg))
    summary["metrics"] = step("evaluate", lambda: evaluate(cfg))
    url = summary["endpoint"] = step("serve", lambda: serve(cfg, blocking=False))
    task = model_task(cfg.path("model"), cfg.model.task)
    summary["sample"] = step("request", lambda: sample_request(cfg, url, task))
    summary["status"] = "ok"
    summary["wall_time_s"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(out, summary)
    print(f"raylm run: done in {summary['wall_time_s']:.0f}s; summary at {out}\n  endpoint: {url}", flush=True)
    if wait:
        print("serving until Ctrl-C", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return summary
