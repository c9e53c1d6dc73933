"""Building the model a config asks for: task -> HF Auto class, scratch arch or pretrained, dropout, freeze, LoRA.

Used by the training workers (`build_model`) and by the export (`build_model` again, then the trained weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from raylm.config import Config, ConfigError

# task -> the transformers Auto class that loads/saves it: the one home of this table (train, evaluate, serve)
TASK_AUTO_CLASSES: dict[str, str] = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "classification": "AutoModelForSequenceClassification",
}


def auto_class(task: str) -> type:
    """The transformers Auto class for `task` (from_config / from_pretrained)."""
    return getattr(transformers, TASK_AUTO_CLASSES[task])

# every config field that is a dropout probability, across the families we build or load
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "hidden_dropout_prob",
                  "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout", "dropout",
                  "activation_dropout", "classifier_dropout")

# LoRA targets when `model.lora.target_modules` is not given: the family's attention projections
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
LORA_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "masked_lm": None}


def read_manifest(cfg: Config) -> dict:
    path = cfg.path("data", "manifest.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `raylm prepare -c <config>` first (or fix output_dir)")
    return json.loads(path.read_text())


def special_ids(manifest: dict) -> dict:
    s = manifest.get("special_tokens") or {}
    ids = {k: s.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ids["pad_token_id"] is None:  # causal LMs need some pad id for generation; eos is the usual stand-in
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


def label_maps(manifest: dict) -> dict:
    label2id = manifest.get("label_map") or {}
    return {"num_labels": len(label2id), "label2id": dict(label2id),
            "id2label": {int(i): str(lab) for lab, i in label2id.items()}}


def scratch_config(cfg: Config, manifest: dict) -> transformers.PretrainedConfig:
    """An HF config for a from-scratch model of `model.arch`, sized to the prepared data."""
    a, p = cfg.model.arch, cfg.model.dropout
    vocab, block = manifest["vocab_size"], manifest["block_size"]
    d_ff = a.d_ff or 4 * a.d_model
    ids = special_ids(manifest)
    builders = {
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=vocab, n_positions=block, n_embd=a.d_model, n_layer=a.n_layer, n_head=a.n_head,
            n_inner=d_ff, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **ids),
        "llama": lambda: transformers.LlamaConfig(
            vocab_size=vocab, max_position_embeddings=block, hidden_size=a.d_model, num_hidden_layers=a.n_layer,
            num_attention_heads=a.n_head, num_key_value_heads=a.n_head, intermediate_size=d_ff,
            attention_dropout=p, tie_word_embeddings=True, **ids),
        "bert": lambda: transformers.BertConfig(
            vocab_size=vocab, max_position_embeddings=max(block, 512), hidden_size=a.d_model,
            num_hidden_layers=a.n_layer, num_attention_heads=a.n_head, intermediate_size=d_ff,
            hidden_dropout_prob=p, attention_probs_dropout_prob=p, pad_token_id=ids["pad_token_id"] or 0),
    }
    return builders[a.family]()


def model_config(cfg: Config, manifest: dict) -> transformers.PretrainedConfig:
    """The HF config of the model to train (scratch or pretrained), with dropout, ids and labels applied.

    Raises ConfigError when the prepared data does not fit the model (vocab, block size, task)."""
    if manifest.get("task") and manifest["task"] != cfg.model.task:
        raise ConfigError("model.task", f"is {cfg.model.task} but data/ was prepared for {manifest['task']}; "
                                        "rerun `raylm prepare` or fix the task")
    if cfg.model.pretrained is None:
        config = scratch_config(cfg, manifest)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.model.pretrained)
        except (OSError, ValueError) as e:
            raise ConfigError("model.pretrained", f"not a loadable Hugging Face model: {cfg.model.pretrained} "
                                                  f"({str(e).splitlines()[0]})") from None
        for field in DROPOUT_FIELDS:
            if isinstance(getattr(config, field, None), float):
                setattr(config, field, cfg.model.dropout)
        if manifest["vocab_size"] > config.vocab_size:
            raise ConfigError("model.pretrained", f"the model's vocab_size ({config.vocab_size}) is smaller than "
                                                  f"the tokenizer in data/ ({manifest['vocab_size']} tokens): "
                                                  "prepare with `data.tokenizer.pretrained` set to the same model")
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if max_pos and manifest["block_size"] > max_pos:
            raise ConfigError("data.block_size", f"{manifest['block_size']} exceeds the model's {max_pos} positions")
        for key, value in special_ids(manifest).items():
            if value is not None:
                setattr(config, key, value)
    if cfg.model.task == "classification":
        labels = label_maps(manifest)
        if labels["num_labels"] < 2:
            raise ConfigError("data.sources", "classification needs a label_field with at least 2 labels in data/")
        config.num_labels = labels["num_labels"]
        config.id2label, config.label2id = labels["id2label"], labels["label2id"]
    if cfg.model.task == "causal_lm":
        config.use_cache = False  # training only; generation turns it back on when loading model/
    return config


def family(model: torch.nn.Module) -> str:
    return model.config.model_type


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's transformer layers, found from its own structure for any family: the first ModuleList in
    `base_model` as long as `config.num_hidden_layers` (else the longest one)."""
    lists = [m for _, m in model.base_model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError("model.freeze.layers", f"found no layer list in model_type {family(model)!r}")
    n = getattr(model.config, "num_hidden_layers", None)
    return next((m for m in lists if len(m) == n), max(lists, key=len))


def embedding_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The input embeddings (`get_input_embeddings`) and every direct child of `base_model` that holds an
    nn.Embedding (position / token-type tables, BERT's whole `embeddings` block with its LayerNorm)."""
    mods = [model.get_input_embeddings()]
    for child in model.base_model.children():
        if any(isinstance(m, torch.nn.Embedding) for m in child.modules()) and not isinstance(child, torch.nn.ModuleList):
            mods.append(child)
    return mods


def frozen_modules(model: torch.nn.Module, cfg: Config) -> list[torch.nn.Module]:
    """The modules `model.freeze` names: embeddings and/or the first N transformer layers."""
    freeze = cfg.model.freeze
    mods = embedding_modules(model) if freeze.embeddings else []
    if freeze.layers:
        layers = layer_stack(model)
        if freeze.layers > len(layers):
            raise ConfigError("model.freeze.layers", f"{freeze.layers} exceeds the model's {len(layers)} layers")
        mods += list(layers[: freeze.layers])
    return mods


def apply_lora(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    import peft

    lora = cfg.model.lora
    targets = lora.target_modules or LORA_TARGETS.get(family(model))
    if not targets:
        raise ConfigError("model.lora.target_modules", f"no default for model_type {family(model)!r}; list them")
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             task_type=LORA_TASK_TYPES[cfg.model.task])
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ConfigError("model.lora.target_modules", str(e).splitlines()[0]) from None


def build_model(cfg: Config, manifest: dict, *, trainable: bool = True) -> torch.nn.Module:
    """The model to train: scratch (`model.arch`) or pretrained, then freeze and LoRA (when `trainable`)."""
    config = model_config(cfg, manifest)
    auto = auto_class(cfg.model.task)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (and for export rebuilds)
    if cfg.model.pretrained is None:
        model = auto.from_config(config)
    else:
        model = auto.from_pretrained(cfg.model.pretrained, config=config, dtype=torch.float32)
    if cfg.train.deepspeed.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable()
    for module in frozen_modules(model, cfg):
        module.requires_grad_(False)
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg)
    return model


def unwrap_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights (no-op for a plain model)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def tokenizer_dir(cfg: Config) -> Path:
    """The prepared tokenizer on this node (for a remote output_dir, pulled into this node's mirror first)."""
    from raylm import storage

    if storage.is_uri(cfg.output_dir):
        return storage.pull(cfg.output_dir, "data", skip=storage.IN_STORE) / "tokenizer"
    return cfg.path("data", "tokenizer")
