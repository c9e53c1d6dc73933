"""The data stage on real Ray: contract of the shards and manifest, cleaning drops, PII, near-dedup, determinism."""

import hashlib
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray.util.state import list_actors

from raylm.config import load_config
from raylm.data import EmptySplitError, prepare, split_of
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
    # topics.jsonl holds one near-duplicate pair (MinHash Jaccard 0.77 on 5-word shingles, over the default 0.8
    # LSH threshold's candidate band): dedup is on by default and drops the later one, counted by reason
    assert m["documents_read"] == 320 and m["dropped"] == {"near_duplicate": 1} and m["documents_kept"] == 319
    t = read_split(cfg, "train")
    assert t.column_names == ["input_ids", "attention_mask", "label"]
    assert str(t.schema.field("attention_mask").type) == "list<element: int8>"
    for ids, mask in zip(t["input_ids"].to_pylist(), t["attention_mask"].to_pylist()):
        assert len(ids) == len(mask) == 64 and ids[0] == m["special_tokens"]["cls_token_id"]
        assert all(i == m["special_tokens"]["pad_token_id"] for i, k in zip(ids, mask) if k == 0)
    assert set(t["label"].to_pylist()) == {0, 1, 2, 3}
    assert sum(m["splits"][s]["documents"] for s in m["splits"]) == m["documents_kept"]


@pytest.mark.timeout(30)
def test_split_of_is_a_seeded_hash_of_the_doc_id():
    fr = {"train": 0.7, "val": 0.15, "test": 0.15}
    ids = [f"d{i}" for i in range(2000)]
    a = [split_of(i, fr, seed=0) for i in ids]
    assert a == [split_of(i, fr, seed=0) for i in ids]  # per document: no ranking, no read order
    assert a != [split_of(i, fr, seed=1) for i in ids]
    assert abs(a.count("train") / 2000 - 0.7) < 0.04 and abs(a.count("val") / 2000 - 0.15) < 0.03


def test_jsonl_reader_keeps_a_record_with_u2028(tmp_path):
    from raylm.config import Source
    from raylm.data.readers import parse_jsonl

    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first line\u2028still the same record", "label": "a"}, ensure_ascii=False) + "\n"
                    + json.dumps({"text": "second record"}) + "\n{broken\n", encoding="utf-8")
    items = list(parse_jsonl(str(path), 0, path.stat().st_size, Source(path=str(path))))
    assert [(t, r) for _, t, _, r in items] == [("first line\u2028still the same record", None), ("second record", None),
                                                (None, "unparsable")]


def test_csv_reader_keeps_a_300k_field_for_max_chars_to_decide(tmp_path):
    from raylm.config import Clean, Source
    from raylm.data.clean import clean_text
    from raylm.data.readers import parse_csv

    path = tmp_path / "docs.csv"
    long = ("lorem ipsum dolor sit amet " * 12_000)[:300_000]
    path.write_text("text,label\n" + f'"{long}",x\n' + "a short but valid second document here,y\n")
    items = list(parse_csv(str(path), 0, path.stat().st_size, Source(path=str(path), label_field="label")))
    assert [len(t) for _, t, _, _ in items] == [300_000, 38] and all(r is None for *_, r in items)
    assert clean_text(items[0][1], Clean(max_chars=400_000))[1] is None  # kept when max_chars allows it
    assert clean_text(items[0][1], Clean())[1] == "too_long"  # dropped only by max_chars (200000)


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
                             "data.tokenizer={train: {type: bpe, vocab_size: 300}}", "data.clean.min_chars=40"])
    m = prepare(cfg)
    assert m["dropped"].get("undecodable") == 2 and m["dropped"].get("empty") == 1
    assert m["dropped"].get("too_long") == 1 and m["dropped"].get("too_short") == 1
    assert m["duplicates"]["near"] == 15  # every planted pair collapsed ...
    # ... and every distinct document survived: 40 + mojibake + page.html (read twice, once as an exact duplicate)
    assert m["documents_kept"] == 40 + 2
    assert m["duplicates"]["exact"] == 1
    rejected = pq.read_table(cfg.path("data", "rejected"))
    assert rejected.num_rows == sum(m["dropped"].values())  # every dropped document, with its reason
    assert sorted(set(rejected["reason"].to_pylist())) == sorted(m["dropped"])
    duplicates = [r for r in rejected.to_pylist() if r["reason"].endswith("_duplicate")]
    assert len(duplicates) == 16 and all(r["text"] for r in duplicates)  # a duplicate's text is kept for review
    # the audit trail: each kept document once, in the split a seeded hash of its id gives, never a dropped one
    docs = pq.read_table(cfg.path("data", "documents.parquet")).to_pydict()
    assert docs["split"] == [split_of(d, cfg.data.split.model_dump(), cfg.seed) for d in docs["doc_id"]]
    assert len(set(docs["doc_id"])) == m["documents_kept"] and not set(docs["doc_id"]) & set(rejected["doc_id"].to_pylist())
    assert m["duplicates"]["cluster_sizes"] and set(m["stages_s"]) >= {"read+clean", "dedup", "tokenizer"}

    def shards(c):
        return {p.relative_to(c.path("data")): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(c.path("data").rglob("*.parquet")) if "rejected" not in p.parts and "documents.parquet" not in p.parts}

    first = shards(cfg)
    # determinism: a second run into a FRESH output_dir (no tokenizer to reuse) writes byte-identical shards
    cfg2 = cfg.model_copy(update={"output_dir": str(tmp_path / "out2")})
    actors_before = {a.actor_id for a in list_actors(limit=10_000)}
    m2 = prepare(cfg2)
    # prepare runs as Ray tasks: no actor (each one a new worker process) is started for it, e.g. none per Parquet
    # read (Ray 2.60's default Parquet reader started 32 FooterReader actors per read: 352 per prepare, minutes)
    started = [a.class_name for a in list_actors(limit=10_000) if a.actor_id not in actors_before]
    assert not started, f"prepare started {len(started)} actors: {sorted(set(started))}"
    assert shards(cfg2) == first and len(first) >= 3
    assert {k: m2[k] for k in ("splits", "dropped", "duplicates")} == {k: m[k] for k in ("splits", "dropped", "duplicates")}
    tok = lambda c: json.loads(c.path("data", "tokenizer", "tokenizer.json").read_text())["model"]
    assert tok(cfg2) == tok(cfg)


@pytest.mark.timeout(300)
def test_near_dedup_equals_plain_datasketch(ray_session):
    import ray

    from raylm.config import Clean
    from raylm.data.clean import exact_key
    from raylm.data.dedup import find_duplicates, reference_duplicates

    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(400)]
    docs = []
    for i in range(300):
        words = rng.choices(vocab, k=120)
        docs.append(" ".join(words))
        if i % 4 == 0:  # near duplicates with 1..12 words changed: some above, some below the threshold
            dup = list(words)
            for j in rng.sample(range(120), rng.randint(1, 12)):
                dup[j] = "zz"
            docs.append(" ".join(dup))
        if i % 25 == 0:
            docs.append(" ".join(words).upper())  # an exact duplicate up to case
    items = [(f"d{i:05d}", t) for i, t in enumerate(docs)]
    cfg = Clean(near_dup_threshold=0.7)
    expected = reference_duplicates(items, cfg)
    ds = ray.data.from_items([{"doc_id": d, "text": t, "exact_key": exact_key(t)} for d, t in items], override_num_blocks=4)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        counts, _ = find_duplicates(ds, cfg, len(items), Path(tmp) / "drops.parquet")
        got = pq.read_table(Path(tmp) / "drops.parquet").to_pydict()
    assert 20 < len(expected) < 75 + 12  # the planted pairs and exact copies, not everything
    assert set(got["doc_id"]) == expected
    assert counts["exact"] == 12 and counts["exact"] + counts["near"] == len(expected)
    assert sum(int(k) * v for k, v in counts["cluster_sizes"].items()) - counts["clusters"] == len(expected)


def test_a_prepare_groupby_shuffles_few_blocks_not_one_piece_per_pair_of_blocks(ray_session):
    """Ray's sort shuffle splits each input block into one piece per output block: the ~200 blocks read_parquet
    makes of a staged file cost 40,000 driver-owned pieces (at 208 MB: ~70 s per shuffle and +377 MB of driver
    memory; 14 s for these 2,000 rows). prepare's groupbys combine the blocks first: the shuffle's work is sized by
    its partitions."""
    import re

    import ray

    from raylm.data import prepare_context
    from raylm.data.shuffle import grouped

    with prepare_context():  # a Dataset keeps the context it was made in: prepare makes all of them inside
        ds = ray.data.range(2000, override_num_blocks=200).map_batches(lambda b: {"k": b["id"] % 5, "id": b["id"]})
        out = grouped(ds, "k", 3).map_groups(lambda g: {"k": g["k"][:1], "n": [len(g["id"])]}).materialize()
        stats = out.stats()
    assert sorted((r["k"], r["n"]) for r in out.take_all()) == [(k, 400) for k in range(5)]  # every row, once
    # the sort's map step splits its input into pieces: 3 blocks (without combining: 200, and 14 s instead of 0.6)
    assert re.findall(r"Suboperator \d+ SortMap: \d+ tasks executed, (\d+) blocks produced", stats) == ["3"], stats


def test_prepare_counts_are_totalled_per_block_without_a_shuffle(ray_session):
    """prepare's counts (per source and reason, split, label, quality rule) are pyarrow totals per block, added up
    on the driver as they stream in: Ray Data's groupby-aggregate over the 231 staged blocks of a 4x corpus grew
    the driver's private memory by 150 MB (bench prepare-scaling 1.26, target 1.2). A null key is its own group;
    sums and mins skip nulls; the result is what plain Python computes from the rows."""
    import numpy as np
    import ray

    from raylm.data import prepare_context
    from raylm.data.shuffle import group_totals

    def rows(b):
        i = b["id"]
        return {"source": np.where(i % 3 == 0, "a", "b"), "reason": np.where(i % 4 == 0, None, "short").astype(object),
                "n": i, "key": np.where(i % 7 == 0, None, (i % 97).astype(str)).astype(object)}

    with prepare_context():
        ds = ray.data.range(4000, override_num_blocks=200).map_batches(rows)
        got = group_totals(ds, ["source", "reason"], {"docs": (None, "count"), "chars": ("n", "sum"), "first": ("key", "min")})
    expected = {}
    for i in range(4000):
        g = expected.setdefault(("a" if i % 3 == 0 else "b", None if i % 4 == 0 else "short"), [0, 0, []])
        g[0] += 1
        g[1] += i
        g[2] += [] if i % 7 == 0 else [str(i % 97)]
    assert [(r["source"], r["reason"]) for r in got] == [("a", None), ("a", "short"), ("b", None), ("b", "short")]
    assert {(r["source"], r["reason"]): [r["docs"], r["chars"], r["first"]] for r in got} == {
        k: [n, c, min(keys)] for k, (n, c, keys) in expected.items()}


def test_each_pack_group_is_tokenized_and_packed_in_its_own_task_in_the_seeded_order(ray_session, minilm_path):
    """The text moves to its pack group in one sort with a partition per group, then each group is tokenized and
    packed in one task: tokenizing in a streaming op before the shuffle ran 1-2 tasks at a time on 2 cores (Ray
    Data's CPU budget; bench tokenize 0.46 of bare encode_batch at 20 MB, 0.98 after), and a sampled sort put two
    of 4 groups in one task (one core idle for a third of the stage at 208 MB). Each group's blocks are its
    documents in order-key order, [CLS] doc [SEP], cut into blocks, whatever the thread count."""
    import re

    import numpy as np
    import pyarrow as pa
    import ray
    from transformers import AutoTokenizer

    from raylm.data import prepare_context
    from raylm.data.pack import order_keys, pack_group, shuffled_rows

    tok = AutoTokenizer.from_pretrained(str(minilm_path))
    ids = [f"doc-{i:04d}" for i in range(600)]
    texts = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(5 + i % 40)) for i in range(600)]
    block, groups = 32, 4
    keys = order_keys(ids, seed=3)
    want = []
    for g in range(groups):  # the promised layout, built here from the tokenizer alone
        stream = [t for i in np.argsort(keys, kind="stable") if keys[i] % groups == g
                  for t in tok(texts[i])["input_ids"]]
        want += [stream[i:i + block] for i in range(0, len(stream) - block + 1, block)]

    for threads in (1, 3):
        with prepare_context():  # a Dataset keeps the context it was made in
            docs = ray.data.from_arrow(pa.table({"doc_id": ids, "text": texts})).repartition(3)
            out = shuffled_rows(docs, 3, groups, pack_group, {"tokenizer": tok, "task": "masked_lm",
                                                              "block_size": block, "threads": threads}).materialize()
        assert [list(r["input_ids"]) for r in out.take_all()] == want, threads
        tasks = re.findall(r"Operator \d+ \S*MapBatches\(each_group\)\S*: (\d+) tasks executed", out.stats())
        assert tasks == [str(groups)], out.stats()  # one task per group: no two groups share one


def test_pack_groups_run_no_more_tokenizer_threads_than_the_machine_has_cores(ray_session):
    """The session cluster is raylm's local one, which declares max(4, cores) CPUs so data tasks fit beside
    training workers. Tokenizer threads are counted against the cores: 2 groups x 2 threads on 2 cores took the
    prepare bench's train split 35.3 s against the plain arm's 27.5 s (bench tokenize, Ray CPUs = cores: 0.95)."""
    import os

    from raylm.data.pack import group_threads

    cores = os.cpu_count() or 1
    for groups in (1, 2, 3, 4, 8):
        threads = group_threads(groups)
        assert threads >= 1 and (threads == 1 or threads * groups <= cores), (groups, threads, cores)


def test_a_light_staged_pass_reads_whole_files_in_as_many_tasks_as_the_cluster_has_cpus(ray_session, tmp_path):
    """prepare stages ~150 small Parquet files (one per read task and split); its light passes (apply the drops and
    split, copy the rejected, count, tokenize's read) ran one task per file and paid a task's fixed cost for each
    (bench, 104 MB: split 5.3 s -> 2.0 s). A light read groups whole files (so it still fuses with the map after
    it) into the cluster's CPUs' worth of tasks, more only past LIGHT_TASK_BYTES each; the heavy pass (dedup) keeps
    one task per file."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.storage import read_parquet

    for i in range(24):
        rows = pa.table({"doc_id": [f"{i}-{j}" for j in range(10)], "n": list(range(10))})
        pq.write_table(rows, tmp_path / f"part-{i:02d}.parquet")
    cpus = int(ray_session.cluster_resources()["CPU"])

    def read_tasks(**how) -> tuple[int, int]:
        ds = read_parquet(tmp_path, ["doc_id"], **how).map_batches(lambda t: t, batch_format="pyarrow").materialize()
        tasks = re.findall(r"Operator \d+ ReadParquet->MapBatches\(<lambda>\): (\d+) tasks executed", ds.stats())
        assert len(tasks) == 1, ds.stats()  # the read fused with the map: no split read
        return ds.count(), int(tasks[0])

    assert read_tasks(light=True) == (240, min(24, cpus))
    assert read_tasks(per_file=True) == (240, 24)


def test_read_and_clean_run_in_one_task_per_file_range_and_a_single_file_uses_every_core(ray_session, tmp_path):
    """Cleaning runs inside the read task, on each table the reader yields: a map_batches(batch_size=256) after the
    read fused into it and bundled 256 of its inputs (file ranges) into one task, so a whole corpus was read and
    cleaned on one core (bench prepare: read+clean 21.7 s on 2 cores vs 17.7 s in one plain process). And a corpus
    of one file is cut into ranges for every CPU, each document read once."""
    import re

    from raylm.data import cleaned_documents, prepare_context
    from raylm.data.readers import MIN_CHUNK_BYTES, RANGES_PER_CPU, chunk_bytes

    def docs(f, n, words):
        return "".join(json.dumps({"text": f"file {f} line {i} \u2028 " + "word " * words}) + "\n" for i in range(n))

    def read_and_clean(pattern):
        cfg = load_config(None, [f"data.sources=[{{path: {pattern}, format: jsonl}}]", "data.clean.dedup=none"])
        with prepare_context():
            ds = cleaned_documents(cfg.data, cfg.model.task).materialize()
        tasks = re.findall(r"Operator \d+ MapBatches\(read_ranges\)\S*: (\d+) tasks executed", ds.stats())
        return ds.take_all(), [int(t) for t in tasks]

    (tmp_path / "three").mkdir()
    for f in range(3):
        (tmp_path / "three" / f"part-{f}.jsonl").write_text(docs(f, 300, 20))
    rows, tasks = read_and_clean(tmp_path / "three" / "*.jsonl")
    assert len(rows) == 900 and all(r["reason"] is None and r["n_chars"] > 0 for r in rows)
    assert tasks == [3], tasks  # one per file (each smaller than a range), not all three in one

    big = tmp_path / "one.jsonl"
    big.write_text(docs(0, 6000, 100))  # ~3.3 MB: more than one range even at the smallest range size
    size = big.stat().st_size
    assert chunk_bytes(size, 4) == MIN_CHUNK_BYTES and chunk_bytes(10 * RANGES_PER_CPU * 4 * MIN_CHUNK_BYTES, 4) == 10 * MIN_CHUNK_BYTES
    rows, tasks = read_and_clean(big)
    assert tasks == [-(-size // MIN_CHUNK_BYTES)], tasks
    lines = sorted(int(r["text"].split()[3]) for r in rows)
    assert lines == list(range(6000)) and all(r["reason"] is None for r in rows)  # each line once, across the cuts


@pytest.mark.timeout(600)
def test_train_rows_are_shuffled_across_labels_and_empty_split_is_an_error(ray_session, tmp_path, minilm_path):
    rng = random.Random(5)
    src = tmp_path / "by_label"
    src.mkdir()
    for label, words in {"alpha": "sun sky star", "beta": "rock stone sand", "gamma": "rain cloud snow"}.items():
        lines = [{"text": f"{label} " + " ".join(rng.choice(words.split() + ["the", "a", "of", str(i)]) for _ in range(30)),
                  "label": label} for i in range(120)]
        (src / f"{label}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    base = [f"data.sources=[{{path: {src}, format: jsonl, label_field: label}}]", "model.task=classification",
            f"model.pretrained={minilm_path}", f"data.tokenizer={{pretrained: {minilm_path}}}", "data.block_size=32",
            "data.clean.min_chars=20",
            "data.clean.dedup=exact"]
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", *base])
    prepare(cfg)
    first = pq.read_table(cfg.path("data", "train")).slice(0, 64)["label"].to_pylist()
    assert len(set(first)) == 3  # documents of all three files mixed from the start, not one file after another
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"text": f"document number {i} with enough words in it", "label": "x"}) + "\n" for i in range(3)))
    bad = load_config(None, [f"output_dir={tmp_path / 'out2'}", *base, f"data.sources=[{{path: {tiny}, label_field: label}}]",
                             "data.split={train: 0.98, val: 0.01, test: 0.01}"])
    with pytest.raises(EmptySplitError, match=r"data\.split\.(val|test)"):
        prepare(bad)


def test_parquet_source_is_read_not_dropped_as_binary(tmp_path):
    """Parquet files hold NUL bytes by design: the binary-file guard applies to the text formats only."""
    import pyarrow as pa

    from raylm.config import Source
    from raylm.data.readers import read_items

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["a parquet document", "another one"], "label": ["x", "y"]}), path)
    items = list(read_items(str(path), 0, path.stat().st_size, Source(path=str(path), format="parquet", label_field="label")))
    assert [(t, lbl, r) for _, t, lbl, r in items] == [("a parquet document", "x", None), ("another one", "y", None)]
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"text\x00with a NUL")
    assert [r for *_, r in read_items(str(binary), 0, 15, Source(path=str(binary), format="txt"))] == ["undecodable"]


@pytest.mark.timeout(300)
def test_hf_dataset_is_read_by_tasks_one_per_arrow_file_in_order(ray_session, tmp_path):
    """A `save_to_disk` dataset: the driver lists its Arrow files, Ray tasks stream them; every row comes back once,
    in the dataset's order, a missing text is a counted drop, labels kept."""
    import datasets

    from raylm.config import Source
    from raylm.data import readers

    texts = [f"document number {i}" if i != 3 else None for i in range(25)]
    datasets.Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(25)]}).save_to_disk(
        str(tmp_path / "hf"), num_shards=3)
    src = Source(hf_dataset=str(tmp_path / "hf"), label_field="label")
    ds = readers.read_source(src, 0)
    # the plan starts from the list of files, not from rows built on the driver
    assert ds.count() == 25 and ds.materialize().num_blocks() >= 3
    rows = sorted(ds.take_all(), key=lambda r: r["doc_id"])
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == [str(i % 3) if i != 3 else None for i in range(25)]  # a drop has no label
    assert [r["reason"] for r in rows].count("no_text") == 1 and len({r["doc_id"] for r in rows}) == 25
    assert all(".arrow|" in r["doc_id"] for r in rows)
