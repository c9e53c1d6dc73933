"""tokenize: prepare's tokenize+pack stage on Ray Data vs bare `tokenizers` `encode_batch_fast`, same texts and threads.

    python bench/bench_tokenize.py             # the whole corpus (>= 200 MB of text, bench/corpus.py)
    python bench/bench_tokenize.py --mb 20     # a slice, for development

A: the driver calls the Rust tokenizer's `encode_batch_fast` on the texts (RAYON_NUM_THREADS = the core count): the
call prepare makes (`encode_batch` without character offsets, same ids). `encode_batch` itself, which also tracks
offsets, runs in the same rounds as a reference arm (A_offsets), reported apart: prepare's gain from the fast call.
B: raylm's own stage (`raylm.data.pack.shuffled_rows` with `pack_group`, as `raylm prepare` runs it: the text
moved to its pack group, each group tokenized and packed) on a dataset already in Ray's object store, Ray given
as many CPUs as A has threads; Ray start-up and the put are reported apart.
Same tokenizer (a byte-level BPE 8k trained once by raylm's `train_tokenizer` on a corpus sample, cached).
Correctness first: on a sample, B's packed blocks are A's ids laid out in the seeded order; B's packed tokens add
up to A's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", str(os.cpu_count() or 1))  # before tokenizers starts its pool

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from common import CACHE, Result, finish, interleave, private_ray, ratios, spread  # noqa: E402

BLOCK, GROUPS, SAMPLE = 256, 4, 300
TARGET = 0.9


def bench_tokenizer():
    """raylm's BPE 8k (data.tokenizer.train defaults) trained once on the corpus' first 20 MB, cached."""
    from transformers import AutoTokenizer

    out = CACHE / "tokenizer-bpe8k"
    if not (out / "tokenizer.json").exists():
        from raylm.config import TokenizerTrain
        from raylm.data.tokenizer import train_tokenizer

        tok = train_tokenizer(corpus.docs(20)["text"].to_pylist(), TokenizerTrain(), "causal_lm")
        tok.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out))


def raylm_stage(ds, tok, chars: int):
    """prepare's tokenize+pack stage, called the way `raylm prepare` calls it (its public stage functions): seeded
    pack groups sized by text, one shuffle of the text to its group, each group tokenized and packed.
    Returns (packed rows dataset, number of pack groups)."""
    from raylm.data import pack

    groups = pack.num_groups(chars)
    layout = {"tokenizer": tok, "task": "causal_lm", "block_size": BLOCK, "threads": pack.group_threads(groups)}
    return pack.shuffled_rows(ds, 0, groups, pack.pack_group, layout), groups


def expected_blocks(texts: list[str], doc_ids: list[str], backend, eos: int) -> list[list[int]]:
    """A's encodings laid out the way the stage promises: documents in seeded order-key order, EOS after each,
    concatenated and cut into BLOCK-token blocks (one pack group)."""
    import numpy as np

    from raylm.data.pack import order_keys

    # the standard call, offsets and all: B's offset-free call must give these ids
    ids = [e.ids + [eos] for e in backend.encode_batch(texts, add_special_tokens=False)]
    stream = [t for i in np.argsort(order_keys(doc_ids, 0), kind="stable") for t in ids[i]]
    return [stream[i:i + BLOCK] for i in range(0, len(stream) - BLOCK + 1, BLOCK)]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=None, help="first MB of the corpus (default: all of it)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024, help="texts per encode call in the baseline")
    args = ap.parse_args()

    res = Result("tokenize", f">={TARGET}", None, None, "", "")
    table = corpus.docs(args.mb)
    texts = table["text"].to_pylist()
    mb = sum(len(t.encode()) for t in texts) / 1e6
    chars = sum(len(t) for t in texts)
    tok = bench_tokenizer()
    backend, eos = tok.backend_tokenizer, tok.eos_token_id

    def plain(encode) -> dict:
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(texts), args.batch):
            n += sum(len(e.ids) for e in encode(texts[i:i + args.batch], add_special_tokens=False))
        return {"s": time.perf_counter() - t0, "tokens": n}

    import ray

    from raylm.data import prepare_context

    t0 = time.perf_counter()
    private_ray(num_cpus=os.cpu_count())  # B's thread budget = A's: the cores
    ray_init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with prepare_context():  # a Dataset keeps the Ray Data context it was made in: prepare's, as in prepare
        ds = ray.data.from_arrow(table).repartition(max(8, len(texts) // 2000)).materialize()
    put_s = time.perf_counter() - t0

    def raylm() -> dict:
        t0 = time.perf_counter()
        with prepare_context():  # the Ray Data settings `raylm prepare` runs under (order kept, sort shuffle)
            packed, groups = raylm_stage(ds, tok, chars)
            packed = packed.materialize()
        return {"s": time.perf_counter() - t0, "blocks": packed.count(), "groups": groups}

    # -- correctness: on a sample, B's packed blocks are A's ids in the promised order; the packed total adds up
    sample = table.slice(0, SAMPLE)
    with prepare_context():
        got, _ = raylm_stage(ray.data.from_arrow(sample), tok, sum(len(t) for t in texts[:SAMPLE]))
        got = [list(r["input_ids"]) for r in got.take_all()]
    same_ids = got == expected_blocks(texts[:SAMPLE], sample["doc_id"].to_pylist(), backend, eos)

    runs = interleave({"A": lambda: plain(backend.encode_batch_fast), "B": raylm,
                       "A_offsets": lambda: plain(backend.encode_batch)}, args.rounds)
    tokens = runs["A"][0]["tokens"]
    a_tps = [tokens / r["s"] for r in runs["A"]]
    b_tps = [tokens / r["s"] for r in runs["B"]]
    blocks = runs["B"][0]["blocks"]
    packed_ok = 0 <= tokens + len(texts) - blocks * BLOCK < runs["B"][0]["groups"] * BLOCK  # < 1 block dropped per group
    rat = ratios(a_tps, b_tps)
    med = spread(rat)["median"]
    offsets_tps = [tokens / r["s"] for r in runs["A_offsets"]]
    fast_gain = spread(ratios(offsets_tps, a_tps))["median"]  # what the offset-free call gives prepare
    b_over_offsets = spread(ratios(offsets_tps, b_tps))["median"]
    res.ratio, res.passed = med, same_ids and packed_ok and med >= TARGET
    res.a = f"{spread(a_tps)['median'] / 1e3:,.0f}Ktok/s"
    res.b = f"{spread(b_tps)['median'] / 1e3:,.0f}Ktok/s"
    res.details = {"corpus_mb": mb, "documents": len(texts), "tokens": tokens, "blocks": blocks,
                   "same_ids_on_sample": same_ids, "packed_total_consistent": packed_ok,
                   "ray_init_s": ray_init_s, "put_s": put_s, "A_tok_s": spread(a_tps), "B_tok_s": spread(b_tps),
                   "A_offsets_tok_s": spread(offsets_tps), "encode_batch_fast_over_encode_batch": fast_gain,
                   "B_over_A_offsets": b_over_offsets, "ratio": spread(rat), "per_round_ratio": rat, "runs": runs,
                   "rayon_threads": os.environ["RAYON_NUM_THREADS"]}
    finish(res, [f"tokenize: {mb:.0f} MB, {len(texts):,} docs, {tokens / 1e6:.1f} M tokens; same ids {same_ids}, "
                 f"packed total consistent {packed_ok}; spread ±{spread(rat)['spread_pct']:.0f}%; reference arm "
                 f"encode_batch (offsets) {spread(offsets_tps)['median'] / 1e3:,.0f}Ktok/s: encode_batch_fast "
                 f"{fast_gain:.2f}x it, B {b_over_offsets:.2f}x it; start-up: ray.init {ray_init_s:.1f}s, "
                 f"put {put_s:.1f}s"])


if __name__ == "__main__":
    main()
