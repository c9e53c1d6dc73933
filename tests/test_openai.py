"""The official `openai` client, unchanged, against raylm's Serve apps: chat, logprobs, embeddings, batched streams.

Uses the session's shared Serve apps (tests/serve_apps.py): the tiny GPT-2 (random weights, raylm's default chat
template) and the real all-MiniLM-L6-v2 encoder (behind the classifier app).
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_apps import API_KEY, AUTH

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served['gpt']}/v1", api_key=API_KEY, max_retries=0)


def test_chat_completions_stream_n_seed_stop_and_logprobs(client, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add"}]
    done = client.chat.completions.create(model="tinygpt", messages=messages, max_tokens=20, temperature=0)
    answer = done.choices[0].message.content
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant" and answer
    # the prompt is the exported template applied to the messages
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n") and "<|system|>\nYou write Python." in rendered
    assert done.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    # streamed: a role delta, content deltas that join to the greedy answer, a finish chunk, then usage
    chunks = list(client.chat.completions.create(model="tinygpt", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [done.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens and not chunks[-1].choices

    # n sampled choices, repeatable with a seed; stop cuts the greedy answer before the stop sequence
    sampled = [client.chat.completions.create(model="tinygpt", messages=messages, max_tokens=8, temperature=0.9,
                                              n=3, seed=11) for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert sorted(c.index for c in sampled[0].choices) == [0, 1, 2]
    stop = answer[len(answer) // 2: len(answer) // 2 + 2]
    cut = client.chat.completions.create(model="tinygpt", messages=messages, max_tokens=20, temperature=0,
                                         stop=[stop]).choices[0]
    assert cut.message.content == answer[: answer.index(stop)] and cut.finish_reason == "stop"

    # logprobs: one entry per generated token, <= 0, alternatives sorted, greedy picks the top alternative
    lp = client.chat.completions.create(model="tinygpt", messages=messages, max_tokens=10, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    # (a random model emits byte tokens: pieces decoded one by one may differ from the joined text, so count them)
    assert len(content) == lp.usage.completion_tokens
    for t in content:
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(v <= 0 for v in tops)
        assert t.logprob == pytest.approx(tops[0], abs=1e-5) and bytes(t.bytes).decode() == t.token
    streamed = [t for c in client.chat.completions.create(
        model="tinygpt", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)


def test_completion_logprobs_are_the_models_log_probabilities_and_echo(client, tiny_gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = client.completions.create(model="tinygpt", prompt="def add", max_tokens=12, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == done.usage.completion_tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        ranked = sorted(top.values(), reverse=True)
        # the legacy shape is a dict keyed by token text: byte tokens that decode to the same text ("\ufffd") merge
        assert value <= 0 and value == pytest.approx(ranked[0], abs=1e-5) and 1 <= len(top) <= 3
    # the same numbers from plain transformers: greedy generate's raw logits, log-softmaxed
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    prompt_ids = tok("def add")["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        logp = model(torch.tensor([prompt_ids])).logits[0].log_softmax(-1)
    generated = ref.sequences[0, len(prompt_ids):].tolist()
    expected = [float(step[0].log_softmax(-1)[t]) for step, t in zip(ref.logits, generated)]
    assert tok.decode(generated) == done.choices[0].text
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-3)

    # echo: the prompt comes back first, its first token without a logprob
    echoed = client.completions.create(model="tinygpt", prompt="def add", max_tokens=4, temperature=0, echo=True,
                                       logprobs=1)
    e = echoed.choices[0]
    assert e.text.startswith("def add") and e.logprobs.token_logprobs[0] is None
    assert e.logprobs.token_logprobs[1:len(prompt_ids)] == pytest.approx(
        [float(logp[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))], abs=1e-3)

    # streamed logprobs match, with offsets that run on across chunks
    chunks = [c.choices[0] for c in client.completions.create(model="tinygpt", prompt="def add", max_tokens=12,
                                                              temperature=0, logprobs=3, stream=True) if c.choices]
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset

    r = httpx.post(f"{client.base_url}completions", headers=AUTH, timeout=60,
                   json={"prompt": "x", "logprobs": 6})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]


def test_embeddings_from_minilm_match_sentence_transformers(served, minilm_path):
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    client = OpenAI(base_url=f"{served['cls']}/v1", api_key="unused", max_retries=0)
    texts = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]
    res = client.embeddings.create(model="tinycls", input=texts)  # the client asks for base64 and decodes it
    vectors = np.array([d.embedding for d in res.data])
    assert vectors.shape == (3, 384) and [d.index for d in res.data] == [0, 1, 2] and res.usage.prompt_tokens > 0
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0] * 3, abs=1e-5)
    cos = vectors @ vectors.T
    assert cos[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[1, 2] + 0.3, cos  # paraphrases closer than unrelated
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(vectors - reference).max() < 1e-4

    raw = httpx.post(f"{served['cls']}/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"},
                     timeout=60).json()["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(raw), dtype="<f4") == pytest.approx(vectors[0], abs=1e-6)
    floats = httpx.post(f"{served['cls']}/v1/embeddings", json={"input": texts[0]}, timeout=60).json()
    assert floats["data"][0]["embedding"] == pytest.approx(vectors[0].tolist(), abs=1e-6)

    # batched like classify: concurrent requests share forwards
    before = httpx.get(f"{served['cls']}/healthz").json()["replica"]["batches"]
    with ThreadPoolExecutor(8) as pool:
        single = list(pool.map(lambda t: client.embeddings.create(model="tinycls", input=t).data[0].embedding,
                               [f"sentence number {i}" for i in range(8)]))
    assert len(single) == 8 and httpx.get(f"{served['cls']}/healthz").json()["replica"]["batches"] - before < 8
    # an embeddings call on the causal LM is a client mistake
    r = httpx.post(f"{served['gpt']}/v1/embeddings", headers=AUTH, json={"input": "x"}, timeout=60)
    assert r.status_code == 400 and "/v1/completions" in r.json()["error"]["message"]


def stream_text(url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """One streamed greedy completion over raw SSE: (joined text, completion tokens)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, tokens = "", 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk["choices"])
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return text, tokens


def test_concurrent_streams_share_decode_steps_with_unchanged_output(served):
    """16 streaming clients at once: their sequences advance together (the replica's decode-step counters show
    steps with many sequences) and each gets exactly the text it gets alone; prints the tokens/s ratio."""
    url = served["gpt"]
    prompts = [f"{word} {i}" for i, word in enumerate(["def", "The", "Python", "return", "quick", "lazy", "add",
                                                         "fox"] * 2)]
    start = time.perf_counter()
    alone = [stream_text(url, p, 48) for p in prompts]
    alone_s = time.perf_counter() - start

    def stats() -> dict:
        return httpx.get(f"{url}/healthz", timeout=30).json()["replica"]["generation"]

    before = stats()["decode_steps_by_batch_size"]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: stream_text(url, p, 48), prompts))
    together_s = time.perf_counter() - start
    after = stats()["decode_steps_by_batch_size"]
    steps = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert together == alone  # greedy output per request unchanged by batching
    tokens = sum(n for _, n in together)
    assert tokens == sum(n for _, n in alone) > 0
    # sequences decoded in shared steps: most generated tokens came from steps of 8 or more sequences
    assert sum(size * n for size, n in steps.items() if size >= 8) > 0.5 * tokens, steps
    print(f"streamed tokens/s: one at a time {tokens / alone_s:.0f}, 16 concurrent {tokens / together_s:.0f} "
          f"(x{alone_s / together_s:.1f}); decode steps by batch size {steps}")


def test_prometheus_exports_raylm_and_serve_metrics(served, ray_session):
    """raylm's replica metrics and Ray Serve's built-in ones on the node's Prometheus endpoint (README names)."""
    port = ray_session.nodes()[0]["MetricsExportPort"]
    httpx.post(f"{served['gpt']}/v1/completions", headers=AUTH, timeout=60,
               json={"prompt": "def", "max_tokens": 4, "temperature": 0})
    wanted = ["ray_raylm_generated_tokens_total", "ray_raylm_batch_size_bucket",
              "ray_raylm_time_to_first_token_seconds_bucket", "ray_serve_num_http_requests_total"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        if all(name in text for name in wanted):
            break
        time.sleep(3)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    tokens = [line for line in text.splitlines()
              if line.startswith("ray_raylm_generated_tokens_total") and 'model="tinygpt"' in line]
    assert tokens and float(tokens[0].rsplit(" ", 1)[1]) >= 4
    assert 'kind="decode"' in text

