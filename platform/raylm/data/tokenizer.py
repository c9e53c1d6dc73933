"""Tokenizers: train one with HF `tokenizers` (bpe byte-level, wordpiece, unigram) on the train split, or copy a
pretrained one; either way saved as a `transformers` tokenizer directory (`AutoTokenizer.from_pretrained`)."""

from __future__ import annotations

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


def canonical(tok: PreTrainedTokenizerFast, cfg: TokenizerTrain) -> PreTrainedTokenizerFast:
    """WordPiece training numbers its `##x` continuation characters in hash-map order (huggingface/tokenizers#1794):
    renumber the vocab (specials first, then by length and text) so ids depend only on the set of tokens. WordPiece encodes by vocab membership,
    not id order, so this changes no tokenization. Byte-level BPE is already deterministic (its alphabet is
    fixed up front)."""
    if cfg.type != "wordpiece":
        return tok
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    specials = [a["content"] for a in sorted(state["added_tokens"], key=lambda a: a["id"])]
    order = [t for t in specials if t in vocab] + sorted((t for t in vocab if t not in specials), key=lambda t: (len(t), t))
    state["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    ids = state["model"]["vocab"]
    for a in state["added_tokens"]:
        a["id"] = ids[a["content"]]
    post = state.get("post_processor") or {}
    for spec in (post.get("special_tokens") or {}).values():
        spec["ids"] = [ids[t] for t in spec["tokens"]]
    backend = Tokenizer.from_str(json.dumps(state))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)})


def build_tokenizer(cfg: Config, train_texts: Callable[[], Iterable[str]], out_dir: Path) -> PreTrainedTokenizerBase:
    """Train (on `train_texts()`, a bounded sample of the train split) or load the configured tokenizer and save
    it to `out_dir`."""
    tcfg = cfg.data.tokenizer
    if tcfg.pretrained:
        tok = load_pretrained(tcfg.pretrained, cfg.model.task)
    else:
        tok = canonical(train_tokenizer(train_texts(), tcfg.train, cfg.model.task), tcfg.train)
        tok.model_max_length = cfg.data.block_size  # a model trained on these shards sees at most this many
    tok.save_pretrained(str(out_dir))
    return tok
