"""Ray Serve end to end on 127.0.0.1: real HTTP, real replicas, tiny models built here (no train stage needed)."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_apps import API_KEY, AUTH, make_cfg, save_tiny_gpt2  # noqa: F401 (bench/ imports the builder from here)


def post(url: str, body, headers=None, **kw) -> httpx.Response:
    return httpx.post(url, json=body, headers={**AUTH, **(headers or {})}, timeout=120, **kw)


def haproxy_config() -> str:
    """The config of the HAProxy that Ray Serve runs on this node, from its running process."""
    import psutil
    import ray

    node = ray.get_runtime_context().get_node_id()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and Path(cmd[0]).name == "haproxy" and "-f" in cmd and node in cmd[cmd.index("-f") + 1]:
            return Path(cmd[cmd.index("-f") + 1]).read_text()
    raise AssertionError(f"no HAProxy process for node {node}")


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err


@pytest.mark.timeout(300)
def test_completions_greedy_stop_n_and_sse_stream(served):
    url = served["gpt"]
    health = httpx.get(f"{url}/healthz", timeout=30).json()  # open without the key
    assert health["status"] == "ok" and health["model"] == "tinygpt" and health["task"] == "causal_lm"
    assert httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]["id"] == "tinygpt"
    assert "/v1/completions" in httpx.get(f"{url}/openapi.json", headers=AUTH).json()["paths"]
    from ray import serve as ray_serve  # the default: each model replica serves the HTTP API itself (one hop)

    assert set(ray_serve.status().applications["tinygpt"].deployments) == {"ModelServer"}
    # the private cluster runs Serve's high-throughput mode: HAProxy owns the served port and hands requests to the
    # replica's own HTTP server (no proxy actor on the way)
    assert f":{httpx.URL(url).port}" in haproxy_config(), "HAProxy does not serve the app's port"

    body = {"model": "tinygpt", "prompt": "def add", "max_tokens": 20, "temperature": 0}
    a, b = post(f"{url}/v1/completions", body).json(), post(f"{url}/v1/completions", body).json()
    text = a["choices"][0]["text"]
    assert text and a["choices"] == b["choices"]  # greedy is deterministic
    assert a["usage"]["prompt_tokens"] > 0 and a["usage"]["completion_tokens"] == 20
    assert a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] + 20

    # stop truncates before the stop sequence
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = post(f"{url}/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"

    # n choices per prompt, prompts as a list; seeded sampling repeats
    many = post(f"{url}/v1/completions", {"prompt": ["The", "def"], "max_tokens": 5, "n": 3,
                                          "temperature": 0.9, "seed": 7}).json()
    assert sorted(c["index"] for c in many["choices"]) == list(range(6))
    again = post(f"{url}/v1/completions", {"prompt": ["The", "def"], "max_tokens": 5, "n": 3,
                                           "temperature": 0.9, "seed": 7}).json()
    assert [c["text"] for c in many["choices"]] == [c["text"] for c in again["choices"]]

    # SSE: events parse, concatenation equals the greedy completion, ends with [DONE]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(chunks) >= 2  # text deltas (the streamer flushes at word boundaries), then the finish chunk
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # curl -d (form content type) is read as JSON
    r = httpx.post(f"{url}/v1/completions", content=json.dumps(body), headers={**AUTH,
                   "Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == text


def test_private_cluster_runs_serve_high_throughput_unless_the_user_chose(monkeypatch):
    from raylm.runtime import HAPROXY_PORT_ENVS, PRIVATE_DRAIN_S, SERVE_HIGH_THROUGHPUT, private_cluster_env

    for name in (*SERVE_HIGH_THROUGHPUT, *PRIVATE_DRAIN_S, *HAPROXY_PORT_ENVS):
        monkeypatch.delenv(name, raising=False)
    env = private_cluster_env()
    assert {**SERVE_HIGH_THROUGHPUT, **PRIVATE_DRAIN_S}.items() <= env.items(), env
    assert len({int(env[p]) for p in HAPROXY_PORT_ENVS}) == 2, env  # free ports, not HAProxy's fixed defaults
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # the user's choice: Serve's own proxy, nothing else set
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    env = private_cluster_env()
    assert not {*SERVE_HIGH_THROUGHPUT, *PRIVATE_DRAIN_S, "RAY_SERVE_HAPROXY_STATS_PORT"} & set(env), env


@pytest.mark.timeout(120)
def test_openai_client_completes_and_streams(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['gpt']}/v1", api_key=API_KEY)
    done = client.completions.create(model="tinygpt", prompt="The", max_tokens=10, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens <= 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tinygpt", prompt="The", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == done.choices[0].text


@pytest.mark.timeout(180)
def test_client_mistakes_get_4xx_and_server_stays_up(served, tmp_path):
    url = served["gpt"]
    comp = f"{url}/v1/completions"
    cases = [
        (httpx.post(comp, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}), 400),
        (post(comp, {"prompt": 123}), 400),
        (post(comp, {"prompt": "x", "max_tokens": "many"}), 400),
        (post(comp, {}), 400),
        (post(comp, {"prompt": "x", "stream": "yes"}), 400),
        (post(comp, {"prompt": "hello " * 200}), 400),                       # over max_prompt_tokens
        (post(comp, {"prompt": "x", "max_tokens": 65}), 400),                # over max_new_tokens
        (post(comp, {"prompt": "x", "model": "gpt-4"}), 404),
        (post(comp, {"prompt": "x" * 5000}), 413),                           # over max_request_bytes
        (post(f"{url}/v1/classify", {"inputs": ["a"]}), 400),                # wrong task
        (httpx.post(comp, json={"prompt": "x"}), 401),                       # no key
        (httpx.post(comp, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401),
        (httpx.get(f"{url}/v1/models"), 401),
        (post(f"{served['cls']}/v1/classify", {"inputs": []}), 400),        # empty list
        (post(f"{served['cls']}/v1/completions", {"prompt": "x"}), 400),
        (post(f"{served['mlm']}/v1/fill-mask", {"inputs": ["no mask here"]}), 400),
        (httpx.get(f"{url}/v1/nope", headers=AUTH), 404),
    ]
    for r, status in cases:
        err = assert_error(r, status)
        assert API_KEY not in r.text
    assert "causal_lm" in post(f"{url}/v1/classify", {"inputs": ["a"]}).json()["error"]["message"]
    assert post(comp, {"prompt": "x", "max_tokens": 2}).status_code == 200  # still up
    # the key never reaches Ray's logs
    from raylm.cli import log_dir

    logs = Path(log_dir())
    leaked = subprocess.run(["grep", "-rl", API_KEY, str(logs)], capture_output=True, text=True).stdout
    assert not leaked, leaked


@pytest.mark.timeout(120)
def test_classify_and_fill_mask_routes_with_batching(served):
    cls = served["cls"]
    one = post(f"{cls}/v1/classify", {"inputs": ["great movie", "awful"], "return_all_scores": True}).json()
    assert len(one["results"]) == 2
    for item in one["results"]:
        assert item["label"] in ("neg", "neu", "pos")
        assert abs(sum(item["scores"].values()) - 1) < 1e-4 and item["score"] == max(item["scores"].values())
    before = httpx.get(f"{cls}/healthz").json()["replica"]["batch_sizes"]
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: post(f"{cls}/v1/classify", {"inputs": [f"text number {i}"]}), range(8)))
    assert all(r.status_code == 200 for r in rs)
    after = httpx.get(f"{cls}/healthz").json()["replica"]
    new = {int(k): v - before.get(k, 0) for k, v in after["batch_sizes"].items() if v - before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == 8 and max(new) > 1, new  # 8 requests, served in batches

    mlm = post(f"{served['mlm']}/v1/fill-mask", {"inputs": ["Paris is the [MASK] of France."], "top_k": 3}).json()
    preds = mlm["results"][0][0]
    assert len(preds) == 3 and preds[0]["score"] >= preds[1]["score"] and preds[0]["token_str"]
    # (all-MiniLM-L6-v2 ships no trained MLM head, so the predictions themselves are not meaningful)
    assert all(0 <= p["score"] <= 1 for p in preds) and len({p["token"] for p in preds}) == 3


def replicas(app: str) -> int:
    from ray import serve as ray_serve

    deps = ray_serve.status().applications[app].deployments
    return sum(n for state, n in deps["ModelServer"].replica_states.items() if state == "RUNNING")


@pytest.mark.timeout(240)
def test_autoscaling_rises_under_load_and_returns(served, tiny_gpt2_no_chat_dir):
    from ray import serve as ray_serve

    from raylm.serve import serve

    cfg = make_cfg("scaled", served["port"], "/scaled",
                   autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                "upscale_delay_s": 1, "downscale_delay_s": 2, "look_back_period_s": 2},
                   max_batch_size=1, ingress_replicas=1)  # the other topology: an ingress deployment in front
    url = serve(cfg, model_dir=tiny_gpt2_no_chat_dir, blocking=False)
    try:
        assert replicas("scaled") == 1
        assert set(ray_serve.status().applications["scaled"].deployments) == {"Ingress", "ModelServer"}
        # a causal LM without a chat template: chat is refused with a 400 that names what is missing
        err = assert_error(httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}]}, timeout=60), 400)
        assert "chat_template" in err["message"]
        peak, stop_at = 1, time.time() + 90

        def client(_):
            while time.time() < stop_at and peak < 2:
                httpx.post(f"{url}/v1/completions", json={"prompt": "The", "max_tokens": 40, "temperature": 0},
                           timeout=60)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, i) for i in range(6)]
            while time.time() < stop_at and peak < 2:
                time.sleep(1)
                peak = max(peak, replicas("scaled"))
            for f in futures:
                f.result()
        assert peak == 2, "replicas did not rise above min_replicas under load"
        deadline = time.time() + 90
        while time.time() < deadline and replicas("scaled") > 1:
            time.sleep(2)
        assert replicas("scaled") == 1, "replicas did not return to min_replicas after load stopped"
        print(f"autoscaling: peak replicas {peak}")
    finally:
        ray_serve.delete("scaled")
