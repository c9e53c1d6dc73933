"""Tokenizers: train one with HF `tokenizers` (bpe byte-level, wordpiece, unigram) on the train split, or copy a
pretrained one; either way saved as a `transformers` tokenizer directory (`AutoTokenizer.from_pretrained`)."""

from __future__ import annotations

import hashlib
import json

from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from raylm.config import Config, ConfigError, TokenizerTrain

EOT, PAD = "<|endoftext|>", "<|pad|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIAL_ID_NAMES = ["pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "mask_token_id",
                    "cls_token_id", "sep_token_id"]


def bert_style(task: str) -> bool:
    return task in ("masked_lm", "classification")


def special_tokens(task: str) -> list[str]:
    return BERT_SPECIALS if bert_style(task) else [EOT, PAD]


def _bpe(cfg: TokenizerTrain, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    return tok, trainer


def _wordpiece(cfg: TokenizerTrain, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    unk = "[UNK]" if "[UNK]" in specials else EOT
    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                        special_tokens=specials, show_progress=False)
    return tok, trainer


def _unigram(cfg: TokenizerTrain, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    unk = "[UNK]" if "[UNK]" in specials else EOT
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=cfg.vocab_size, special_tokens=specials, unk_token=unk,
                                      show_progress=False)
    return tok, trainer


# tokenizer type -> (untrained tokenizer, trainer)
BUILDERS: dict[str, Callable[[TokenizerTrain, list[str]], tuple[Tokenizer, trainers.Trainer]]] = {
    "bpe": _bpe, "wordpiece": _wordpiece, "unigram": _unigram,
}


def train_tokenizer(texts: Iterable[str], cfg: TokenizerTrain, task: str) -> PreTrainedTokenizerFast:
    """Train on `texts` (the train split) and wrap for transformers with the task's special tokens."""
    specials = special_tokens(task)
    tok, trainer = BUILDERS[cfg.type](cfg, specials)
    tok.train_from_iterator(texts, trainer=trainer)
    if bert_style(task):
        # `tokenizer(text)` then gives `[CLS] text [SEP]`, the same layout the shards use
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD)


def load_pretrained(ref: str, task: str) -> PreTrainedTokenizerBase:
    """A pretrained tokenizer from a local path (or a cached hub id); it must have what the task needs."""
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise ConfigError("data.tokenizer.pretrained", f"cannot load a tokenizer from {ref!r}: {e}") from None
    if bert_style(task) and (tok.pad_token_id is None and task == "classification"):
        raise ConfigError("data.tokenizer.pretrained", "classification needs a tokenizer with a pad token")
    if task == "causal_lm" and tok.eos_token_id is None and tok.sep_token_id is None:
        raise ConfigError("data.tokenizer.pretrained", "causal_lm needs a tokenizer with an eos (or sep) token")
    if task == "masked_lm" and tok.mask_token_id is None:
        raise ConfigError("data.tokenizer.pretrained", "masked_lm needs a tokenizer with a mask token")
    return tok


def special_ids(tok: PreTrainedTokenizerBase) -> dict[str, int | None]:
    return {name: getattr(tok, name, None) for name in SPECIAL_ID_NAMES}


def build_tokenizer(cfg: Config, train_texts: Callable[[], Iterable[str]], out_dir: Path) -> PreTrainedTokenizerBase:
    """Train or load the configured tokenizer and save it to `out_dir`.

    HF `tokenizers` training breaks count ties by hash-map order, so two trainings on the same text can differ
    (huggingface/tokenizers#1794). To keep a re-run of `prepare` byte-identical, a tokenizer trained by the
    previous run on the same texts with the same settings (same `tokenizer_key` in its manifest) is reused."""
    tcfg = cfg.data.tokenizer
    if tcfg.pretrained:
        tok = load_pretrained(tcfg.pretrained, cfg.model.task)
    else:
        key = tokenizer_key(cfg, train_texts)
        previous = cfg.path("data")
        if previous_key(previous) == key:
            tok = AutoTokenizer.from_pretrained(str(previous / "tokenizer"))
        else:
            tok = train_tokenizer(train_texts(), tcfg.train, cfg.model.task)
            tok.model_max_length = cfg.data.block_size  # a model trained on these shards sees at most this many
        tok.init_kwargs["raylm_tokenizer_key"] = key
    tok.save_pretrained(str(out_dir))
    return tok


def tokenizer_key(cfg: Config, train_texts: Callable[[], Iterable[str]]) -> str:
    """What a trained tokenizer depends on: its settings, the task, the block size and every train text."""
    h = hashlib.sha256(json.dumps([cfg.data.tokenizer.model_dump(mode="json"), cfg.model.task,
                                   cfg.data.block_size]).encode())
    for digest in sorted(hashlib.sha256(text.encode()).digest() for text in train_texts()):  # order-free
        h.update(digest)
    return h.hexdigest()


def previous_key(data_dir: Path) -> str | None:
    try:
        saved = json.loads((data_dir / "tokenizer" / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved.get("raylm_tokenizer_key")
