"""The Serve applications the serve tests share (tests/test_serve.py, tests/test_openai.py): one Serve instance
per session, tiny models built here (no train stage needed), and the tiny GPT-2 builder bench/ reuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.config import validate_config
from raylm.runtime import free_port

API_KEY = "sk-test-7f3a9c-not-a-real-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CORPUS = ("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. " * 40
          + "Python is a programming language that lets you work quickly. " * 40)


def save_tiny_gpt2(out: Path, chat: bool = True) -> Path:
    """A random 2-layer GPT-2 (d 64) with a byte-level BPE tokenizer trained on a few KB, saved HF-style; with
    `chat`, raylm's default chat template, as `raylm train` exports it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     unk_token="<|endoftext|>")
    hf_tok.save_pretrained(out)
    torch.manual_seed(0)
    eos = hf_tok.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(hf_tok), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.save_pretrained(out)
    if chat:
        from raylm.chat_template import write_chat_template

        write_chat_template(out, "causal_lm", None)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_gpt2_no_chat_dir(tmp_path_factory) -> Path:
    """The same tiny GPT-2 without a chat template (a model /v1/chat/completions must refuse)."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2_no_chat"), chat=False)


@pytest.fixture(scope="session")
def minilm_task_dirs(tmp_path_factory, minilm_path) -> dict[str, Path]:
    """The real MiniLM checkpoint with a (random) classification head and with its MLM head."""
    from transformers import AutoTokenizer, BertForMaskedLM, BertForSequenceClassification

    dirs = {}
    tok = AutoTokenizer.from_pretrained(minilm_path)
    for task, cls, kw in (("classification", BertForSequenceClassification,
                           {"num_labels": 3, "id2label": {0: "neg", 1: "neu", 2: "pos"},
                            "label2id": {"neg": 0, "neu": 1, "pos": 2}}),
                          ("masked_lm", BertForMaskedLM, {})):
        out = tmp_path_factory.mktemp(task)
        cls.from_pretrained(minilm_path, **kw).save_pretrained(out)
        tok.save_pretrained(out)
        dirs[task] = out
    return dirs


def make_cfg(name: str, port: int, prefix: str, **serve) -> "Config":  # noqa: F821
    return validate_config({"name": name, "output_dir": f"/tmp/raylm-serve-test/{name}",
                            "serve": {"port": port, "route_prefix": prefix, "num_cpus_per_replica": 0.25,
                                      "autoscaling": {"min_replicas": 1, "max_replicas": 1}, **serve}})


@pytest.fixture(scope="session")
def served(ray_session, tiny_gpt2_dir, minilm_task_dirs):
    """Three applications on one Serve instance for the session: a causal LM with a chat template (with an API key,
    up to 16 sequences per decode step), a MiniLM classifier (also serves embeddings), a masked LM."""
    from ray import serve as ray_serve

    from raylm.serve import serve

    port = free_port()
    env = pytest.MonkeyPatch()
    env.setenv("RAYLM_TEST_KEY", API_KEY)
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {
        "gpt": serve(make_cfg("tinygpt", port, "/gpt", api_key_env="RAYLM_TEST_KEY", max_new_tokens=64,
                              max_prompt_tokens=100, max_request_bytes=4096, max_batch_size=16),
                     model_dir=tiny_gpt2_dir, blocking=False),
        "cls": serve(make_cfg("tinycls", port, "/cls", max_batch_size=8, batch_wait_timeout_s=0.2),
                     model_dir=minilm_task_dirs["classification"], blocking=False),
        "mlm": serve(make_cfg("tinymlm", port, "/mlm"), model_dir=minilm_task_dirs["masked_lm"], blocking=False),
    }

    def teardown():
        ray_serve.shutdown()  # the apps, their replicas, the controller and the proxy: nothing idles on 2 cores
        env.undo()

    _teardown.append(teardown)
    yield {**urls, "port": port}
    shut_down_served()


_teardown: list = []  # the served apps' teardown, run once: after the last test on them, or at session end


def shut_down_served() -> None:
    while _teardown:
        _teardown.pop()()
