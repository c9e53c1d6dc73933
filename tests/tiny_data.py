"""Tiny prepared workspaces in CONTRACTS.md's `data/` format, built in seconds without `raylm prepare`.

- `build_lm_workspace(root)`: a byte-level BPE tokenizer, packed causal-LM shards of a toy grammar, a manifest,
  and a random 1-layer GPT-2 exported to `model/` (for evaluate; tune trains its own).
- `build_cls_workspace(root, minilm)`: three separable topics tokenized with MiniLM's tokenizer, an imbalanced
  train split (for a meaningful majority baseline), and MiniLM fine-tuned on it for a few plain-PyTorch steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LM_BLOCK = 32
ADJ = ["big", "small", "red", "old", "quick", "lazy"]
NOUN = ["cat", "dog", "bird", "fox", "horse", "mouse"]
VERB = ["sees", "chases", "likes", "finds", "follows"]


def toy_sentence(rng: random.Random) -> str:
    return f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(ADJ)} {rng.choice(NOUN)}."


def write_split(root: Path, split: str, columns: dict[str, list], shards: int = 2) -> None:
    out = root / "data" / split
    out.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    types = {"input_ids": pa.list_(pa.int32()), "attention_mask": pa.list_(pa.int8()), "label": pa.int64()}
    for s in range(shards):
        part = {k: v[s::shards] for k, v in columns.items()}
        table = pa.table({k: pa.array(v, type=types[k]) for k, v in part.items()})
        pq.write_table(table, out / f"part-{s:05d}.parquet")
    assert n > 0


def manifest(task: str, tokenizer, block: int, splits: dict[str, int], label_map=None) -> dict:
    special = {name: getattr(tokenizer, name, None) for name in (
        "pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "mask_token_id", "cls_token_id",
        "sep_token_id")}
    return {
        "task": task, "block_size": block, "vocab_size": len(tokenizer), "special_tokens": special,
        "label_map": label_map,
        "splits": {k: {"documents": n, "tokens": n * block, "rows": n, "shards": 2} for k, n in splits.items()},
        "sources": [{"name": "tests/tiny_data.py", "format": "jsonl", "documents_read": sum(splits.values()) + 3, "documents_kept": sum(splits.values())}],
        "documents_read": sum(splits.values()) + 3, "documents_kept": sum(splits.values()),
        "dropped": {"too_short": 2, "near_duplicate": 1}, "duplicates": {"exact": 0, "near": 1},
        "pii": {"email": 0}, "config": {}, "config_hash": "test", "versions": {}, "wall_time_s": 0.1,
    }


def build_lm_workspace(root: Path, rows: dict[str, int] | None = None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rows = rows or {"train": 256, "val": 16, "test": 24}
    rng = random.Random(0)
    docs = [" ".join(toy_sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(600)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|pad|>")
    tok.save_pretrained(root / "data" / "tokenizer")
    stream: list[int] = []
    for doc in docs:  # documents joined with EOS and packed, as prepare does
        stream += tok(doc).input_ids + [tok.eos_token_id]
    blocks = [stream[i:i + LM_BLOCK] for i in range(0, len(stream) - LM_BLOCK, LM_BLOCK)]
    start = 0
    for split, n in rows.items():
        assert start + n <= len(blocks), f"toy corpus too small for {rows}"
        write_split(root, split, {"input_ids": blocks[start:start + n]})
        start += n
    (root / "data" / "manifest.json").write_text(json.dumps(manifest("causal_lm", tok, LM_BLOCK, rows)))
    config = GPT2Config(vocab_size=len(tok), n_positions=LM_BLOCK, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


TOPICS = {
    "sports": ["goal", "match", "team", "coach", "score", "league", "player", "stadium"],
    "cooking": ["recipe", "oven", "flour", "sauce", "bake", "garlic", "kitchen", "spice"],
    "space": ["orbit", "rocket", "planet", "galaxy", "astronaut", "telescope", "comet", "launch"],
}
FILLER = ["the", "a", "today", "with", "and", "new", "about", "of", "in", "we"]
CLS_BLOCK = 24


def topic_text(rng: random.Random, topic: str) -> str:
    words = [rng.choice(TOPICS[topic]) if rng.random() < 0.45 else rng.choice(FILLER) for _ in range(12)]
    return " ".join(words)


def build_cls_workspace(root: Path, minilm: Path, train_steps: int = 40) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm))
    tok.save_pretrained(root / "data" / "tokenizer")
    labels = sorted(TOPICS)
    label_map = {name: i for i, name in enumerate(labels)}
    rng = random.Random(1)
    # imbalanced train split (sports is the majority), balanced val/test
    mix = {"train": {"sports": 90, "cooking": 45, "space": 45}, "val": {t: 8 for t in labels},
           "test": {t: 16 for t in labels}}
    sizes = {}
    for split, counts in mix.items():
        items = [(topic_text(rng, t), label_map[t]) for t, n in counts.items() for _ in range(n)]
        rng.shuffle(items)
        enc = tok([t for t, _ in items], truncation=True, max_length=CLS_BLOCK, padding="max_length")
        write_split(root, split, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                  "label": [y for _, y in items]})
        sizes[split] = len(items)
    (root / "data" / "manifest.json").write_text(
        json.dumps(manifest("classification", tok, CLS_BLOCK, sizes, label_map)))

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(minilm), num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_map)
    train = pq.read_table(root / "data" / "train").to_pydict()
    ids, mask = torch.tensor(train["input_ids"]), torch.tensor(train["attention_mask"], dtype=torch.long)
    y = torch.tensor(train["label"])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        idx = torch.randint(len(y), (16,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=y[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def write_training_summary(model_dir: Path, steps: int = 40) -> None:
    """A training_summary.json in CONTRACTS.md's shape, for report tests of a model built here."""
    history = [{"step": s, "train_loss": 5.0 * np.exp(-s / 20) + 1, "lr": 1e-3 * min(1, s / 5) * (0.5 + 0.5 * np.cos(np.pi * s / steps)),
                "tokens_per_s": 1000.0} for s in range(1, steps + 1)]
    evals = [{"step": s, "val_loss": 5.0 * np.exp(-s / 25) + 1.2, "val_ppl": float(np.exp(5.0 * np.exp(-s / 25) + 1.2))}
             for s in range(10, steps + 1, 10)]
    summary = {"steps": steps, "best_step": steps, "val": evals[-1], "tokens_seen": steps * 256,
               "wall_time_s": 12.0, "tokens_per_s": 1000.0, "history": history, "evals": evals}
    (model_dir / "training_summary.json").write_text(json.dumps(summary, default=float))
