"""The data stage on real Ray: contract of the shards and manifest, cleaning drops, PII, near-dedup, determinism."""

import hashlib
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raylm.config import load_config
from raylm.data import assign_splits, prepare
from raylm.data.clean import scrub_pii


def shards(cfg, split):
    return sorted(cfg.path("data", split).glob("*.parquet"))


def read_split(cfg, split):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(p) for p in shards(cfg, split)])


@pytest.mark.timeout(600)
def test_lm_shards_follow_the_contract(prepared_lm):
    from transformers import AutoTokenizer

    cfg = prepared_lm
    m = json.loads(cfg.path("data", "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(cfg.path("data", "tokenizer")))
    assert m["task"] == "causal_lm" and m["block_size"] == 64 and m["vocab_size"] == len(tok)
    assert m["special_tokens"]["eos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert m["documents_read"] >= m["documents_kept"] > 0 and m["label_map"] is None
    for split in ("train", "val", "test"):
        t = read_split(cfg, split)
        assert str(t.schema.field("input_ids").type) == "list<element: int32>"
        rows = t["input_ids"].to_pylist()
        assert rows and all(len(r) == 64 for r in rows) and max(max(r) for r in rows) < m["vocab_size"]
        assert m["splits"][split]["rows"] == len(rows) and m["splits"][split]["tokens"] == 64 * len(rows)
        assert m["splits"][split]["shards"] == len(shards(cfg, split))
    assert len(shards(cfg, "train")) >= 2
    docs = pq.read_table(cfg.path("data", "documents.parquet")).to_pydict()
    assert len(set(docs["doc_id"])) == len(docs["doc_id"]) == m["documents_kept"]  # each document in one split


@pytest.mark.timeout(600)
def test_classification_rows_padded_with_labels(prepared_cls):
    cfg = prepared_cls
    m = json.loads(cfg.path("data", "manifest.json").read_text())
    assert m["label_map"] == {"cooking": 0, "finance": 1, "space": 2, "sports": 3}
    assert m["documents_kept"] == m["documents_read"] == 320
    t = read_split(cfg, "train")
    assert t.column_names == ["input_ids", "attention_mask", "label"]
    assert str(t.schema.field("attention_mask").type) == "list<element: int8>"
    for ids, mask in zip(t["input_ids"].to_pylist(), t["attention_mask"].to_pylist()):
        assert len(ids) == len(mask) == 64 and ids[0] == m["special_tokens"]["cls_token_id"]
        assert all(i == m["special_tokens"]["pad_token_id"] for i, k in zip(ids, mask) if k == 0)
    assert set(t["label"].to_pylist()) == {0, 1, 2, 3}
    assert sum(m["splits"][s]["documents"] for s in m["splits"]) == 320


@pytest.mark.timeout(30)
def test_split_assignment_is_seeded_and_disjoint():
    ids = [f"d{i}" for i in range(200)]
    a = assign_splits(ids, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    assert a == assign_splits(list(reversed(ids)), {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    assert a != assign_splits(ids, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
    assert sorted(list(a.values()).count(s) for s in ("train", "val", "test")) == [30, 30, 140]


@pytest.mark.timeout(30)
def test_pii_typed_placeholders_and_luhn():
    text, counts = scrub_pii("Write to ann.lee@example.org or +1 (555) 123-4567; server 10.0.0.12 or 2001:db8::7; "
                             "card 4111 1111 1111 1111, order 4111 1111 1111 1112, key AKIAABCDEFGHIJKLMNOP.")
    assert "<EMAIL>" in text and "<PHONE>" in text and "<IPV4>" in text and "<IPV6>" in text
    assert "<CREDIT_CARD>" in text and "<API_KEY>" in text
    assert "4111 1111 1111 1112" in text  # fails Luhn: kept
    assert counts["CREDIT_CARD"] == 1 and counts["EMAIL"] == 1


def _nasty_corpus(d: Path) -> None:
    d.mkdir()
    (d / "page.html").write_text("<html><head><style>p{}</style></head><body><nav>Home | About</nav>"
                                 "<p>Caf&eacute; culture &amp; the art of slow coffee is a long tradition here.</p>"
                                 "<script>alert('x')</script><p>Second paragraph of the article about coffee houses.</p></body></html>")
    (d / "mojibake.txt").write_text("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows, said the guide to everyone in the hall. ﬁne ①")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 20)
    (d / "invalid.txt").write_bytes(b"caf\xe9 au lait \xff\xfe is not utf-8 at all and never was " * 3)
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("too short")
    (d / "huge.txt").write_text("word " * 2_100_000)  # one 10 MB line


@pytest.mark.timeout(600)
def test_cleaning_counts_every_drop_and_near_dedup(ray_session, tmp_path):
    _nasty_corpus(tmp_path / "nasty")
    rng = random.Random(0)
    vocab = [hashlib.md5(str(i).encode()).hexdigest()[:6] for i in range(3000)]
    lines, planted = [], []
    for i in range(40):
        words = rng.sample(vocab, 400)  # long enough that 3 changed words keep Jaccard (5-word shingles) > 0.9
        lines.append({"text": " ".join(words)})
        if i < 15:  # a near duplicate: 1-3 words changed, far away in the file (another block)
            dup = list(words)
            for j in rng.sample(range(400), rng.randint(1, 3)):
                dup[j] = "changed"
            planted.append(dup)
    lines += [{"text": " ".join(w)} for w in planted]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", "data.block_size=32", "data.shards_per_split=2",
                             f"data.sources=[{{path: {tmp_path / 'nasty'}, format: txt}}, "
                             f"{{path: {tmp_path / 'nasty/page.html'}, format: html}}, {{path: {tmp_path / 'docs.jsonl'}}}]",
                             "data.tokenizer={train: {type: wordpiece, vocab_size: 300}}", "data.clean.min_chars=40"])
    m = prepare(cfg)
    assert m["dropped"].get("undecodable") == 2 and m["dropped"].get("empty") == 1
    assert m["dropped"].get("too_long") == 1 and m["dropped"].get("too_short") == 1
    assert m["duplicates"]["near"] == 15  # every planted pair collapsed ...
    # ... and every distinct document survived: 40 + mojibake + page.html (read twice, once as an exact duplicate)
    assert m["documents_kept"] == 40 + 2
    assert m["duplicates"]["exact"] == 1
    shards = lambda: {p.relative_to(cfg.path("data")): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(cfg.path("data").rglob("*.parquet"))}
    first = shards()
    m2 = prepare(cfg)  # determinism: byte-identical shards, same counts
    assert shards() == first and len(first) >= 6
    assert {k: m2[k] for k in ("splits", "dropped", "duplicates")} == {k: m[k] for k in ("splits", "dropped", "duplicates")}
