"""Reliability and security promises (issue 14), tried the way users would break them: damaged checkpoints,
hostile HTTP input, leaked secrets, random configs and bad data. Long soak variants live in stress/ (`make stress`)."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest


# ------------------------------------------------------------------------------ promise 3: checkpoints
def fake_checkpoint(root: Path, step: int, ranks: int = 2) -> Path:
    """A checkpoint directory laid out like a merged Ray Train one: each rank's files, then its manifest."""
    from raylm.checkpoints import write_manifest

    d = root / f"checkpoint_2026-01-01_00-00-{step:02d}.000000"
    (d / "ds").mkdir(parents=True)
    for rank in range(ranks):
        shard = d / "ds" / f"zero_pp_rank_{rank}_optim_states.pt"
        shard.write_bytes(os.urandom(4096))
        files = [shard.relative_to(d)]
        if rank == 0:
            (d / "raylm_state.json").write_text(json.dumps({"step": step}))
            files.append(Path("raylm_state.json"))
        write_manifest(d, rank, ranks, files=files)
    return d


def test_checkpoint_manifest_detects_truncation_deletion_and_missing_rank(tmp_path):
    from raylm.checkpoints import verify

    ok = fake_checkpoint(tmp_path, 10)
    assert verify(ok) == []
    truncated = fake_checkpoint(tmp_path, 20)
    shard = truncated / "ds" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    assert any("100 bytes" in p for p in verify(truncated))
    flipped = fake_checkpoint(tmp_path, 30)
    data = bytearray((flipped / "ds" / "zero_pp_rank_0_optim_states.pt").read_bytes())
    data[7] ^= 0xFF  # same size, different content
    (flipped / "ds" / "zero_pp_rank_0_optim_states.pt").write_bytes(bytes(data))
    assert any("sha256" in p for p in verify(flipped))
    deleted = fake_checkpoint(tmp_path, 40)
    (deleted / "raylm_state.json").unlink()
    assert any("raylm_state.json: missing" in p for p in verify(deleted))
    half = fake_checkpoint(tmp_path, 50)
    (half / "raylm_files.rank1.json").unlink()  # rank 1 died before its manifest: incomplete
    assert any("rank 1 of 2" in p for p in verify(half))
    (half / "raylm_files.rank0.json").unlink()
    assert verify(half) and "incomplete" in verify(half)[0]


def test_resume_falls_back_to_previous_intact_checkpoint_with_warning(tmp_path, capsys):
    from ray.train import Checkpoint

    from raylm.checkpoints import resumable

    older = fake_checkpoint(tmp_path, 10)
    newer = fake_checkpoint(tmp_path, 20)
    assert resumable(Checkpoint.from_directory(str(newer)), "raylm_state.json").path == str(newer)
    (newer / "ds" / "zero_pp_rank_1_optim_states.pt").unlink()
    chosen = resumable(Checkpoint.from_directory(str(newer)), "raylm_state.json")
    assert chosen.path == str(older)
    out = capsys.readouterr().out
    assert "WARNING" in out and "damaged" in out and "step 10" in out
    # nothing intact left: refuse rather than resume from a damaged checkpoint
    (older / "raylm_state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no intact"):
        resumable(Checkpoint.from_directory(str(newer)), "raylm_state.json")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_loads_never_unpickle_code(tmp_path):
    """Inside weights_only_loads every torch.load (DeepSpeed's weights_only=False ones too) refuses pickled code,
    while tensors and DeepSpeed's own state classes still load."""
    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from raylm.checkpoints import weights_only_loads

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"module": _RunsCode()}, f)
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "zero_stage": ZeroStageEnum.gradients, "rng": torch.get_rng_state()}, good)
    with weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(evil, weights_only=False)  # what DeepSpeed passes
        loaded = torch.load(good, weights_only=False)
    assert torch.equal(loaded["module"]["w"], torch.ones(2)) and loaded["zero_stage"] == ZeroStageEnum.gradients
    assert torch.load is not None and "safe_load" not in torch.load.__name__  # restored afterwards


# ------------------------------------------------------------------------- promise 5: HTTP never 500s
ENVELOPE = {"message", "type", "param", "code"}


def assert_envelope(r, status: int | None = None) -> dict:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == ENVELOPE and err["message"] and err["type"], err
    return err


@pytest.mark.timeout(300)
def test_hostile_bodies_get_4xx_with_openai_envelope(served):
    import httpx
    from serve_apps import AUTH

    from raylm.serve.api import MAX_CHOICES, MAX_JSON_DEPTH, MAX_PROMPTS

    comp = f"{served['gpt']}/v1/completions"
    json_headers = {**AUTH, "Content-Type": "application/json"}

    def chunked(total: int, piece: int = 1024):
        for _ in range(total // piece):
            yield b" " * piece

    # oversized: with Content-Length, and chunked (no Content-Length) -> 413, not 400
    assert_envelope(httpx.post(comp, content=b"{" + b" " * 10_000 + b"}", headers=json_headers), 413)
    r = httpx.post(comp, content=chunked(10_240), headers=json_headers, timeout=60)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert assert_envelope(r, 413)["type"] == "request_too_large"
    cases = {  # body -> what the message must name
        b'{"prompt": "x", "temperature": NaN}': "nan",
        b'{"prompt": "x", "temperature": Infinity}': "infinity",
        b'{"prompt": "x", "max_tokens": -Infinity}': "infinity",
        b'{"prompt": "\xff\xfe bad bytes"}': "utf-8",
        b'{"prompt": "x", "stop": ' + b"[" * (MAX_JSON_DEPTH + 5) + b"]" * (MAX_JSON_DEPTH + 5) + b"}": "deep",
        b'{"prompt": "x", "max_tokens": 3': "json",
    }
    for body, word in cases.items():
        err = assert_envelope(httpx.post(comp, content=body, headers=json_headers, timeout=60), 400)
        assert word in err["message"].lower(), (body[:40], err)
    # caps on one request's work
    post = lambda body: httpx.post(comp, json=body, headers=AUTH, timeout=60)  # noqa: E731
    assert assert_envelope(post({"prompt": ["a"] * (MAX_PROMPTS + 1)}), 400)["param"] == "prompt"
    assert assert_envelope(post({"prompt": ["a"] * 8, "n": MAX_CHOICES // 8 + 1}), 400)["param"] == "n"
    assert assert_envelope(post({"prompt": "x", "max_tokens": 10**12}), 400)["param"] == "max_tokens"
    assert assert_envelope(post({"prompt": "x", "seed": 2**70, "temperature": 0.5}), 400)["param"] == "seed"
    assert assert_envelope(post({"prompt": "x", "temperature": 1e308}), 400)["param"] == "temperature"
    assert assert_envelope(post({"prompt": "hello " * 300}), 400)["code"] == "context_length_exceeded"
    assert assert_envelope(post({"prompt": "x", "model": "nope"}), 404)["code"] == "model_not_found"
    assert assert_envelope(httpx.post(comp, json={"prompt": "x"}), 401)["code"] == "invalid_api_key"
    assert post({"prompt": "x", "max_tokens": 2}).status_code == 200  # still serving
    # request logs carry no prompt text (serve.log_request_bodies is off by default) and never the key
    import subprocess
    import time

    from serve_apps import API_KEY

    from raylm.cli import log_dir

    marker = "prompt-text-marker-7c1e0b"
    assert post({"prompt": marker, "max_tokens": 2}).status_code == 200
    time.sleep(2)  # let Ray flush the replica logs
    leaked = subprocess.run(["grep", "-rlE", f"{marker}|{API_KEY}", log_dir()], capture_output=True, text=True).stdout
    assert not leaked, leaked


@pytest.mark.timeout(900)
def test_schemathesis_fuzz_every_operation_no_5xx(served):
    """schemathesis over the served /openapi.json: every operation, 50 valid + 50 invalid generated requests with
    the API key and 50 without; zero 5xx, and every 4xx carries OpenAI's error envelope."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode
    from serve_apps import AUTH

    url = served["gpt"]
    raw = httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()
    raw["servers"] = [{"url": url}]
    schema = schemathesis.openapi.from_dict(raw)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/healthz", "/v1/models", "/v1/completions"}
    tally = {"requests": 0, "5xx": [], "4xx": 0}

    def exercise(op, mode: GenerationMode, headers: dict) -> None:
        @settings(max_examples=50, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            r = case.call(base_url=url, headers=headers, timeout=120)
            tally["requests"] += 1
            if r.status_code >= 500:
                tally["5xx"].append((op.method, op.path, r.status_code, r.content[:300], case.body))
            elif r.status_code >= 400:
                tally["4xx"] += 1
                err = json.loads(r.content)["error"]
                assert set(err) == ENVELOPE and err["message"] and err["type"], (r.status_code, err)
        try:
            run()
        except Unsatisfiable:  # an operation without inputs (GET /healthz) has no invalid form
            assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET"

    for op in operations:
        exercise(op, GenerationMode.POSITIVE, AUTH)
        exercise(op, GenerationMode.NEGATIVE, AUTH)
        exercise(op, GenerationMode.POSITIVE, {})
    print(f"fuzz: {len(operations)} operations, {tally['requests']} requests, {tally['4xx']} 4xx, "
          f"{len(tally['5xx'])} 5xx")
    assert not tally["5xx"], tally["5xx"][:5]
    assert tally["requests"] >= 50 * 3 * len(operations) * 0.5  # hypothesis may dedupe tiny spaces (e.g. GET)


# --------------------------------------------------------------------------- promise 10: secrets stay secret
def test_env_values_never_written_expanded(tmp_path, monkeypatch, capsys):
    from raylm.cli import main
    from raylm.config import load_config, with_overrides

    secret = "s3cr3t-bucket-name-91f2"
    monkeypatch.setenv("RAYLM_SECRET_DIR", f"/tmp/{secret}")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("name: envs\noutput_dir: ${RAYLM_SECRET_DIR}/out\n"
                        "data: {sources: [{path: '${RAYLM_SECRET_DIR}/docs/*.jsonl'}]}\n"
                        "tune: {num_samples: 1, space: {train.lr: {choice: [0.001, 0.002]}}}\n")
    assert main(["validate", "-c", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert secret not in out and "${RAYLM_SECRET_DIR}/out" in out
    cfg = load_config(cfg_path)
    assert cfg.output_dir == f"/tmp/{secret}/out"  # the run itself uses the value
    trial = with_overrides(cfg, {"train.lr": 0.002})  # tune's best.json is written from such a copy
    for dump in (cfg.public_dump(), trial.public_dump()):
        text = json.dumps(dump)
        assert secret not in text and dump["data"]["sources"][0]["path"] == "${RAYLM_SECRET_DIR}/docs/*.jsonl"
    assert trial.public_dump()["train"]["lr"] == 0.002


def test_several_api_keys_constant_time_and_only_healthz_open(tmp_path, monkeypatch):
    """serve.api_keys_env as a file and as a variable (one key per line); any key works, others get 401 with the
    envelope; /healthz alone is open. The guard is the real ASGI middleware, in-process."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from raylm.config import ConfigError
    from raylm.serve.api import GuardMiddleware, key_digest, load_api_keys

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nsk-alpha-1111\n\n  sk-beta-2222  \n")
    monkeypatch.setenv("RAYLM_KEYS", "sk-gamma-3333\nsk-delta-4444")
    monkeypatch.setenv("RAYLM_ONE", "sk-one-5555")
    assert load_api_keys(None, str(keys_file)) == ["sk-alpha-1111", "sk-beta-2222"]
    keys = load_api_keys("RAYLM_ONE", "RAYLM_KEYS")
    assert keys == ["sk-one-5555", "sk-gamma-3333", "sk-delta-4444"]
    for bad, key in ((("RAYLM_NOPE", None), "serve.api_key_env"), ((None, str(tmp_path / "none")), "serve.api_keys_env")):
        with pytest.raises(ConfigError) as e:
            load_api_keys(*bad)
        assert e.value.key == key
    app = FastAPI()
    for route in ("/healthz", "/v1/models", "/openapi-like"):
        app.get(route)(lambda: {"ok": True})
    guarded = GuardMiddleware(app, max_bytes=1024, digests=[key_digest(k) for k in keys])

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://t") as c:
            out = {"open": (await c.get("/healthz")).status_code}
            for key in keys:
                out[key] = (await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code
            out["wrong"] = await c.get("/v1/models", headers={"Authorization": "Bearer sk-one-5556"})
            out["none"] = await c.get("/openapi-like")
            return out

    got = asyncio.run(calls())
    assert got["open"] == 200 and all(got[k] == 200 for k in keys)
    for r in (got["wrong"], got["none"]):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert not any(k in r.text for k in keys)


# ------------------------------------------------------------------- promise 8: bad configs never traceback
BASE_CONFIG = {
    "name": "fuzz", "output_dir": "/tmp/raylm-fuzz", "seed": 0,
    "data": {"sources": [{"builtin": "python-docs"}], "clean": {"min_chars": 50, "dedup": "near"},
             "tokenizer": {"train": {"type": "bpe", "vocab_size": 8000}}, "block_size": 256,
             "split": {"train": 0.7, "val": 0.15, "test": 0.15}},
    "model": {"task": "causal_lm", "arch": {"family": "gpt2", "n_layer": 4, "d_model": 256, "n_head": 4},
              "dropout": 0.1, "lora": None},
    "train": {"num_workers": 2, "max_steps": 200, "batch_size": 8, "lr": 3e-4, "precision": "fp32",
              "early_stopping": {"patience": 3}, "deepspeed": {"zero_stage": 2}},
    "tune": {"num_samples": 2, "space": {"train.lr": {"loguniform": [1e-5, 1e-3]}, "model.dropout": {"choice": [0.0, 0.1]}},
             "scheduler": {"type": "asha"}},
    "serve": {"port": 8000, "autoscaling": {"min_replicas": 1, "max_replicas": 2}},
}
CONFIG_ERROR_LINE = r"^config error: (\(top level\)|'[^\n]*'|\"[^\n]*\"|[^\s:]+): \S"


def config_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from config_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from config_paths(v, (*prefix, i))


def mutated_configs():
    import copy

    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                        st.sampled_from(["", "-1", "1e400", "nan", "${NOT_SET_VAR_X}", "pkg:no_such_pkg/x", "~/x"]))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
    paths = list(config_paths(BASE_CONFIG))[1:]

    @st.composite
    def mutate(draw):
        cfg = copy.deepcopy(BASE_CONFIG)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            node = cfg
            try:
                for part in path[:-1]:
                    node = node[part]
                op = draw(st.sampled_from(["set", "delete", "unknown", "distribution"]))
                if op == "set":
                    node[path[-1]] = draw(values)
                elif op == "delete" and isinstance(node, dict):
                    node.pop(path[-1], None)
                elif op == "unknown" and isinstance(node, dict):
                    node[draw(st.text(min_size=1, max_size=12))] = draw(values)
                elif op == "distribution":
                    cfg["tune"]["space"][draw(st.sampled_from(["train.lr", "model.dropout", "no.such", "train"]))] = \
                        {draw(st.sampled_from(["loguniform", "uniform", "quniform", "choice", "grid", "randint",
                                               "normal"])): draw(values)}
            except (KeyError, IndexError, TypeError):
                pass  # an earlier mutation removed or replaced this path
        return cfg

    return st.one_of(mutate(), values)  # mostly mutated valid configs, some entirely random documents


RAY_WORKER_LOG = re.compile(r"^(\x1b\[\d+m)?\(\S+ pid=\d+(, ip=\S+)?\)")


@pytest.mark.timeout(300)
def test_random_and_mutated_configs_exit_0_or_2_with_one_line(tmp_path):
    """`raylm validate` (in-process: the same main() the CLI runs, before any Ray work) on 300 hypothesis-made
    configs: exit 0, or exit 2 with one line `config error: <dotted.key>: <reason>`; never a traceback."""
    import contextlib
    import io
    import re

    import yaml
    from hypothesis import HealthCheck, given, settings

    from raylm.cli import main

    seen = {0: 0, 2: 0}

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(doc=mutated_configs())
    def check(doc):
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["validate", "-c", str(path)])
        assert code in (0, 2), (code, err.getvalue()[-2000:])
        seen[code] += 1
        if code == 2:
            # in-process, the session's Ray streams other tests' worker logs ("(ServeReplica:... pid=N) ...") to
            # the same stderr; those are not the CLI's output
            lines = [ln for ln in err.getvalue().strip().splitlines() if not RAY_WORKER_LOG.match(ln)]
            assert len(lines) == 1 and re.match(CONFIG_ERROR_LINE, lines[0]), err.getvalue()

    check()
    print(f"config fuzz: {sum(seen.values())} configs, {seen[0]} valid, {seen[2]} refused with one line")
    assert seen[2] > 50 and seen[0] > 0


@pytest.mark.timeout(300)
def test_config_errors_via_real_cli(tmp_path, cli):
    """A few through the installed CLI process: wrong type, unknown key, bad distribution, bad --set; and a valid one."""
    import yaml

    cases = [({"train": {"lr": "fast"}}, "train.lr"), ({"data": {"shards": 3}}, "data.shards"),
             ({"tune": {"space": {"train.lr": {"normal": [0, 1]}}}}, "tune.space.train.lr"),
             ({"serve": {"autoscaling": {"min_replicas": 5, "max_replicas": 1}}}, "serve.autoscaling")]
    for i, (doc, key) in enumerate(cases):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(doc))
        proc = cli("validate", "-c", str(path), timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and f"config error: {key}" in proc.stderr
    proc = cli("validate", "-c", str(tmp_path / "c0.yaml"), "--set", "train.lr=0.001", timeout=120)
    assert proc.returncode == 0 and "lr: 0.001" in proc.stdout, proc.stderr


# ---------------------------------------------------------------------- promise 9: bad data never crashes
def write_hostile_corpus(root: Path, seed: int = 14) -> dict:
    """Files a real crawl or export produces: random bytes, random unicode, one huge line, empty files, deeply
    nested HTML, JSON lines with missing/mistyped fields, a ragged CSV; plus a few good documents."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    good = [f"Document {i}: " + " ".join(rng.choice(["ray", "data", "train", "serve", "model", "token", "shard",
                                                     "the", "a", "runs", "fast", "on", "workers"]) for _ in range(60))
            for i in range(40)]
    (root / "good.jsonl").write_text("".join(json.dumps({"text": t, "label": "ok"}) + "\n" for t in good))
    (root / "bytes.txt").write_bytes(bytes(rng.randrange(256) for _ in range(50_000)))
    (root / "bytes2.txt").write_bytes(b"\x00\xff\xfe" * 5000 + b"\n\x80\x81 text after junk\n")
    uni = "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0xd7ff), rng.randrange(0xe000, 0x10ffff)]))
                  for _ in range(4000))
    (root / "unicode.txt").write_text(uni, errors="surrogatepass")
    (root / "huge_line.txt").write_text("word " * 700_000)  # one 3.5 MB line, over max_chars
    (root / "empty.txt").write_text("")
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n\n   \n")
    (root / "nested.html").write_text("<html><body>" + "<div>" * 20_000 + "deep text " * 30 + "</div>" * 20_000
                                      + "</body></html>")
    (root / "broken.html").write_text("<html><body><p>unclosed <b>tags <script>while(1){}</script> <<<>>> &bogus;")
    rows = [{"text": 42}, {"text": None}, {"no_text": "x"}, {"text": ["a", "list"]}, {"text": {"a": 1}},
            {"text": good[0] + " unlabelled"}, {"text": good[1] + " bad label", "label": {"x": 1}},
            {"text": good[2] + " numeric label", "label": 3}]
    (root / "mislabelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                            + "{not json at all\n" + '{"text": "truncated\n' + "\ufeff[1, 2]\n")
    (root / "ragged.csv").write_text('text,label\n"a, b",x,extra,cols\n"unterminated\n' + good[3] + ",ok\n")
    return {"good": len(good)}


@pytest.mark.timeout(900)
def test_prepare_survives_hostile_data_and_counts_every_drop(ray_session, tmp_path, monkeypatch):
    """`prepare` over every kind of hostile file completes; each document read is kept or dropped with a reason
    (duplicates included); manifest.json keeps ${ENV} references; a corpus that loses every document exits 1
    saying the corpus is empty (the CLI's run_stage, in-process on the session cluster)."""
    import io
    from contextlib import redirect_stderr

    from raylm.cli import run_stage
    from raylm.config import load_config
    from raylm.data import prepare

    corpus = tmp_path / "corpus"
    write_hostile_corpus(corpus)
    monkeypatch.setenv("RAYLM_CORPUS_DIR", str(corpus))
    sources = ", ".join(f"{{path: '${{RAYLM_CORPUS_DIR}}/{glob}', format: {fmt}}}" for glob, fmt in [
        ("*.txt", "txt"), ("*.jsonl", "jsonl"), ("*.html", "html"), ("*.csv", "csv")])
    settings = ["data.tokenizer={train: {type: bpe, vocab_size: 300}}", "data.block_size=32",
                "data.shards_per_split=1", "data.clean.min_chars=20", "data.clean.dedup=exact"]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"name: hostile\noutput_dir: {tmp_path / 'out'}\ndata:\n  sources: [{sources}]\n")
    cfg = load_config(cfg_file, settings)
    manifest = prepare(cfg)
    dropped = manifest["dropped"]
    assert manifest["documents_kept"] >= 30, manifest
    assert manifest["documents_read"] == manifest["documents_kept"] + sum(dropped.values()), manifest
    assert all(isinstance(n, int) and n > 0 for n in dropped.values()) and len(dropped) >= 2, dropped
    written = (cfg.path("data", "manifest.json")).read_text()
    assert str(corpus) not in written and "${RAYLM_CORPUS_DIR}" in written
    print(f"hostile data: read {manifest['documents_read']}, kept {manifest['documents_kept']}, dropped {dropped}")

    # every document dropped -> exit 1, one message saying the corpus is empty
    junk_only = load_config(None, [f"output_dir={tmp_path / 'out2'}", f"data.sources=[{{path: {corpus}/bytes*.txt, "
                                   f"format: txt}}, {{path: {corpus}/empty.jsonl, format: jsonl}}]",
                                   "data.clean.min_chars=100000", "data.clean.max_chars=100001", *settings[:3]])
    err = io.StringIO()
    with redirect_stderr(err):
        code = run_stage("prepare", junk_only)
    assert code == 1 and "corpus is empty" in err.getvalue() and "Traceback" not in err.getvalue(), err.getvalue()


# ------------------------------------------------- promise 4: the served model never mixes versions
def test_model_versions_swap_atomically_while_a_reader_loads(tmp_path):
    """Exports publish `model/` as a symlink to `.model.versions/<version>/`, swapped by one rename: a reader that
    resolves it once (as replicas and evaluate do, storage.materialize) never pairs one version's config with
    another's weights, while 30 exports land; two versions stay; a pre-versioning `model/` directory and a killed
    export's temp directory are handled."""
    import threading

    from raylm.storage import materialize, publish_dir, staging_dir

    target = tmp_path / "model"
    target.mkdir()  # an export from before versioning: a plain directory
    (target / "config.json").write_text(json.dumps({"version": 0}))
    (target / "model.safetensors").write_bytes(bytes([0]) * 200_000)

    def export(v: int) -> None:
        tmp = staging_dir(target)
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(bytes([v % 256]) * 200_000)
        (tmp / "config.json").write_text(json.dumps({"version": v}))
        publish_dir(tmp, target)

    (tmp_path / ".model.tmp-killed").mkdir()  # what an export killed mid-write leaves
    export(1)
    assert target.is_symlink() and json.loads((target / "config.json").read_text()) == {"version": 1}
    assert not (tmp_path / ".model.tmp-killed").exists()
    assert any(json.loads((p / "config.json").read_text()) == {"version": 0}
               for p in (tmp_path / ".model.versions").iterdir())  # the old directory kept as a version

    mixes, loads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            d = materialize(target)
            try:
                version = json.loads((d / "config.json").read_text())["version"]
                weights = (d / "model.safetensors").read_bytes()
            except FileNotFoundError:  # pruned two swaps later while this slow reader held it: retried, not mixed
                continue
            loads[0] += 1
            if set(weights) != {version % 256}:
                mixes.append(version)

    t = threading.Thread(target=reader)
    t.start()
    for v in range(2, 32):
        export(v)
    stop.set()
    t.join()
    assert not mixes and loads[0] > 0, (mixes, loads)
    assert json.loads((target / "config.json").read_text()) == {"version": 31}
    assert len(list((tmp_path / ".model.versions").iterdir())) == 2
    assert not list(tmp_path.glob(".model.tmp-*")) and not list(tmp_path.glob(".model.link-*"))


# ------------------------------------------------- promises 2 + 3 end to end: restart, damaged checkpoint, rerun
@pytest.mark.timeout(900)
def test_rerun_resumes_past_a_damaged_checkpoint_and_a_finished_run_is_not_retrained(ray_session, tmp_path, monkeypatch,
                                                                                     capfd):
    """A run dies at step 25 (max_failures 0) after checkpoints at 10 and 20; the step-20 checkpoint is then
    truncated. `train` started again with the same config continues the same Ray Train run, skips the damaged
    checkpoint with a warning and resumes from step 10; once finished, a third start says so without training."""
    import subprocess
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_data import build_lm_workspace

    from raylm.config import load_config
    from raylm.train import run_name, train

    root = build_lm_workspace(tmp_path)
    settings = ["model.arch={family: gpt2, n_layer: 2, d_model: 64, n_head: 2}", "data.block_size=32",
                "train.num_workers=2", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2",
                "train.max_steps=30", "train.eval_every=10", "train.checkpoint_every=10", "train.log_every=5",
                "train.eval_batches=2", "train.early_stopping=null", "train.keep_checkpoints=3", "seed=0"]
    cfg = load_config(None, [f"output_dir={root}", *settings, "train.max_failures=0"])
    monkeypatch.setenv("RAYLM_FAULT_AT_STEP", "25")
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's failure error, whichever class it raises
        train(cfg)
    monkeypatch.delenv("RAYLM_FAULT_AT_STEP")
    run_dir = cfg.path("train", run_name(cfg))
    by_step = {json.loads((d / "raylm_state.json").read_text())["step"]: d for d in run_dir.glob("checkpoint_*")
               if d.is_dir()}  # (beside them: Ray's checkpoint_manager_snapshot.json)
    assert sorted(by_step) == [10, 20], by_step
    shard = max((p for p in by_step[20].rglob("*optim_states.pt")), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a write cut short

    summary = train(cfg)
    assert summary["resumed_from"] == [10] and summary["steps"] == 30, summary["resumed_from"]
    out = capfd.readouterr()
    assert "damaged" in out.out + out.err and "step 10" in out.out + out.err
    assert len({p.name for p in cfg.path("train").iterdir() if p.is_dir()}) == 1  # the same run, continued

    start = time.perf_counter()
    again = train(cfg)
    assert again["run_key"] == summary["run_key"] and time.perf_counter() - start < 10  # no fit()
    assert "already finished" in capfd.readouterr().out
