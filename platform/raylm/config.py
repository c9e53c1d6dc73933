"""The config schema: the one place a key, its type, default and doc are defined.

`load_config(path, overrides)` reads YAML, applies `--set a.b.c=VALUE` overrides, expands `${ENV}` and
`pkg:` references, and validates. Every failure raises `ConfigError("dotted.key", "reason")`; the CLI prints
it as `config error: dotted.key: reason` and exits 2 before any Ray work starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem, attached to the dotted key it concerns."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason

    def __str__(self) -> str:
        # always one line: a key a user typed with odd characters is quoted, whitespace in the reason collapsed
        plain = self.key == "(top level)" or (self.key.isprintable() and not any(c.isspace() or c == ":" for c in self.key)
                                             and self.key != "")
        reason = " ".join(str(self.reason).split())
        return f"config error: {self.key if plain else repr(self.key)}: {reason}"


class Strict(BaseModel):
    # Unknown keys are errors; assignments are re-validated.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------- data
Format = Literal["jsonl", "txt", "parquet", "csv", "html"]
EXTENSION_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".text": "txt", ".md": "txt", ".parquet": "parquet",
    ".csv": "csv", ".html": "html", ".htm": "html",
}


class Source(Strict):
    """One input: a file glob/directory (`path`), the embedded corpus (`builtin`), or a local HF dataset."""

    path: str | None = Field(None, description="file, directory or glob")
    format: Format | None = Field(None, description="reader; inferred from the file extension when omitted")
    text_field: str = Field("text", description="column/field holding the text (jsonl, parquet, csv, hf_dataset)")
    label_field: str | None = Field(None, description="column/field holding the label, for classification")
    split_lines: bool = Field(False, description="txt only: one document per line instead of per file")
    builtin: Literal["python-docs"] | None = Field(None, description="embedded corpus, built with no download")
    hf_dataset: str | None = Field(None, description="a local `datasets` save_to_disk dir (read by Ray tasks, one per Arrow file) or data dir (loaded on the driver: give large corpora as files)")
    split: str = Field("train", description="hf_dataset split to read")
    max_docs: int | None = Field(None, gt=0, description="read at most this many documents from this source")

    @model_validator(mode="after")
    def _one_kind(self) -> "Source":
        kinds = [k for k in ("path", "builtin", "hf_dataset") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of path, builtin, hf_dataset")
        if self.path is not None and self.format is None:
            ext = Path(self.path.rstrip("/*")).suffix.lower()
            fmt = EXTENSION_FORMATS.get(ext)
            if fmt is None:
                raise ValueError(f"cannot infer format from {self.path!r}; set format to one of jsonl, txt, parquet, csv, html")
            object.__setattr__(self, "format", fmt)
        return self

    @property
    def name(self) -> str:
        return self.path or (f"builtin:{self.builtin}" if self.builtin else f"hf_dataset:{self.hf_dataset}")


class Clean(Strict):
    strip_html: bool = Field(True, description="HTML to text with a real parser (drops script/style/nav)")
    fix_unicode: bool = Field(True, description="repair mojibake with ftfy")
    normalize: Literal["NFKC", "NFC", "NFKD", "NFD"] | None = Field("NFKC", description="unicode normal form")
    min_chars: int = Field(50, ge=0, description="drop documents shorter than this after cleaning")
    max_chars: int = Field(200_000, gt=0, description="drop documents longer than this after cleaning")
    dedup: Literal["none", "exact", "near"] = Field("near", description="exact: normalized-text hash; near: MinHash+LSH")
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard threshold for near duplicates")
    num_perm: int = Field(128, ge=16, description="MinHash permutations")
    shingle_size: int = Field(5, ge=1, description="words per shingle for MinHash")
    scrub_pii: bool = Field(False, description="replace emails, phones, IPs, card numbers, IBANs, API keys by <TYPE>")
    html_extractor: Literal["selectolax", "trafilatura"] = Field(
        "selectolax", description="HTML to text: selectolax strips tags; trafilatura keeps only the main content")

    @model_validator(mode="after")
    def _bounds(self) -> "Clean":
        if self.min_chars >= self.max_chars:
            raise ValueError("min_chars must be below max_chars")
        return self


# -------------------------------------------------------------------------------- data.quality
# Rules and defaults follow DataTrove's filters (datatrove/pipeline/filters/*.py), which implement the published
# Gopher (MassiveText, arXiv:2112.11446 table A1), C4 (arXiv:1910.10683 s2.2) and FineWeb rules.
QualityRule = Literal["language", "gopher_repetition", "gopher_quality", "c4", "fineweb"]
QUALITY_RULE_ORDER: tuple[str, ...] = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb")


class GopherRules(Strict):
    """Gopher repetition and quality thresholds (DataTrove GopherRepetitionFilter / GopherQualityFilter)."""

    dup_line_frac: float | None = Field(0.3, ge=0, description="max share of duplicated lines")
    dup_para_frac: float | None = Field(0.3, ge=0, description="max share of duplicated paragraphs")
    dup_line_char_frac: float | None = Field(0.2, ge=0, description="max share of characters in duplicated lines")
    dup_para_char_frac: float | None = Field(0.2, ge=0, description="max share of characters in duplicated paragraphs")
    top_n_grams: dict[int, float] = Field({2: 0.2, 3: 0.18, 4: 0.16},
                                          description="n -> max character share of the most frequent word n-gram")
    dup_n_grams: dict[int, float] = Field({5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
                                          description="n -> max character share of duplicated word n-grams")
    min_doc_words: int | None = Field(50, ge=0)
    max_doc_words: int | None = Field(100_000, ge=1)
    min_avg_word_length: float | None = Field(3, ge=0)
    max_avg_word_length: float | None = Field(10, ge=0)
    max_symbol_word_ratio: float | None = Field(0.1, ge=0, description="max '#' or ellipsis per word")
    max_bullet_lines_ratio: float | None = Field(0.9, ge=0, description="max share of lines starting with a bullet")
    max_ellipsis_lines_ratio: float | None = Field(0.3, ge=0, description="max share of lines ending with an ellipsis")
    min_alpha_words_ratio: float | None = Field(0.8, ge=0, description="min share of words with a letter")
    min_stop_words: int | None = Field(2, ge=0, description="min distinct stop words (the, be, to, of, and, that, have, with)")


class C4Rules(Strict):
    """C4's line and document rules (DataTrove C4QualityFilter): lines failing a line rule are removed."""

    filter_no_terminal_punct: bool = Field(True, description="remove lines not ending in . ? ! \" '")
    min_words_per_line: int = Field(3, ge=0, description="remove lines with fewer words")
    max_word_length: int = Field(1000, ge=1, description="remove lines with a longer word")
    min_num_sentences: int = Field(5, ge=0, description="drop documents with fewer sentences left")
    remove_citations: bool = Field(True, description="strip [1], [edit], [citation needed]")
    filter_lorem_ipsum: bool = Field(True, description="drop documents containing 'lorem ipsum'")
    filter_javascript: bool = Field(True, description="remove lines mentioning javascript")
    filter_curly_bracket: bool = Field(True, description="drop documents with a '{' in a kept line")
    filter_policy: bool = Field(True, description="remove cookie / terms-of-use lines")


class FineWebRules(Strict):
    """FineWeb's own rules (DataTrove FineWebQualityFilter)."""

    line_punct_thr: float = Field(0.12, ge=0, le=1, description="min share of lines ending in terminal punctuation")
    line_punct_exclude_zero: bool = False
    short_line_length: int = Field(30, ge=0)
    short_line_thr: float = Field(0.67, ge=0, le=1, description="max share of lines of at most short_line_length chars")
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1, description="max share of characters in duplicated lines")
    new_line_ratio: float = Field(0.3, ge=0, description="max newlines per word")


# preset -> defaults it gives (anything the user sets wins); FineWeb's pipeline runs C4 without the
# terminal-punctuation line rule (datatrove examples/fineweb.py)
QUALITY_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"rules": []},
    "c4": {"rules": ["language", "c4"]},
    "gopher": {"rules": ["language", "gopher_repetition", "gopher_quality"]},
    "fineweb": {"rules": ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb"],
                "c4": {"filter_no_terminal_punct": False}},
}


class Quality(Strict):
    """Document quality rules run inside cleaning; a dropped document's reason is the first rule that failed."""

    preset: Literal["none", "c4", "gopher", "fineweb"] = Field("none", description="rule set and defaults to start from")
    rules: list[QualityRule] = Field(default_factory=list, description="rules to run (the preset's when omitted)")
    languages: list[str] | None = Field(["en"], min_length=1,
                                        description="ISO 639-1 codes to keep (null: any); rule `language`")
    min_language_score: float = Field(0.65, ge=0, le=1, description="min language-ID probability to keep")
    gopher: GopherRules = Field(default_factory=GopherRules)
    c4: C4Rules = Field(default_factory=C4Rules)
    fineweb: FineWebRules = Field(default_factory=FineWebRules)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or raw.get("preset", "none") not in QUALITY_PRESETS:
            return raw  # pydantic reports the bad preset
        return deep_merge(QUALITY_PRESETS[raw.get("preset", "none")], raw)

    @model_validator(mode="after")
    def _order(self) -> "Quality":
        if len(set(self.rules)) != len(self.rules):
            raise ValueError("rules: a rule is listed twice")
        self.__dict__["rules"] = [r for r in QUALITY_RULE_ORDER if r in self.rules]  # always the pipeline order
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.rules)


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursively for nested mappings."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class TokenizerTrain(Strict):
    type: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    vocab_size: int = Field(8000, ge=64, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    sample_bytes: int = Field(256 << 20, ge=1 << 16, description="train on a seeded sample of about this many "
                              "bytes of the train split's text (the whole split when smaller)")


class TokenizerCfg(Strict):
    """Either `train` a tokenizer on the train split, or load a `pretrained` one (path or hub id)."""

    train: TokenizerTrain | None = None
    pretrained: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "TokenizerCfg":
        if (self.train is None) == (self.pretrained is None):
            raise ValueError("give exactly one of train, pretrained")
        return self


class SplitCfg(Strict):
    train: float = Field(0.7, ge=0.0, le=1.0)
    val: float = Field(0.15, ge=0.0, le=1.0)
    test: float = Field(0.15, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sum(self) -> "SplitCfg":
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {self.train + self.val + self.test:g})")
        if self.train <= 0:
            raise ValueError("train fraction must be positive")
        return self


class Data(Strict):
    sources: list[Source] = Field(default_factory=lambda: [Source(builtin="python-docs")], min_length=1)
    clean: Clean = Field(default_factory=Clean)
    quality: Quality = Field(default_factory=Quality)
    tokenizer: TokenizerCfg = Field(default_factory=lambda: TokenizerCfg(train=TokenizerTrain()))
    block_size: int = Field(256, ge=8, le=65536, description="tokens per packed block (or max tokens per row)")
    split: SplitCfg = Field(default_factory=SplitCfg)
    shards_per_split: int = Field(4, ge=1, description="Parquet files written per split (fewer for tiny splits)")


# ---------------------------------------------------------------------------------------------- model
class Arch(Strict):
    family: Literal["gpt2", "llama", "bert"] = "gpt2"
    n_layer: int = Field(4, ge=1)
    d_model: int = Field(256, ge=8)
    n_head: int = Field(4, ge=1)
    d_ff: int | None = Field(None, ge=8, description="feed-forward width; 4 * d_model when omitted")

    @model_validator(mode="after")
    def _heads(self) -> "Arch":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


class Freeze(Strict):
    embeddings: bool = False
    layers: int = Field(0, ge=0, description="freeze the first N transformer layers")


class Lora(Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="module names; the family's attention by default")


class ModelCfg(Strict):
    task: Literal["causal_lm", "masked_lm", "classification"] = "causal_lm"
    pretrained: str | None = Field(None, description="path or hub id to fine-tune; null trains from `arch`")
    arch: Arch = Field(default_factory=Arch)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    freeze: Freeze = Field(default_factory=Freeze)
    lora: Lora | None = None
    chat_template: str | None = Field(
        None, description="causal_lm: Jinja chat template (the template itself, or a file holding it) exported with "
                          "the tokenizer; null keeps a pretrained tokenizer's own, else writes raylm's default")

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        """A file path is read; the template must parse as Jinja (one error here, not a 500 at serve time)."""
        if v is None:
            return v
        if "{{" not in v and "{%" not in v:
            p = Path(v).expanduser()
            if not p.is_file():
                raise ValueError(f"neither a Jinja template (no '{{{{' or '{{%') nor an existing file: {v}")
            v = p.read_text()
        import jinja2

        try:
            jinja2.Environment().parse(v)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"not a valid Jinja template: line {e.lineno}: {e.message}") from None
        return v

    @field_validator("pretrained")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and looks_like_path(v):
            p = Path(v).expanduser()
            if not p.exists():
                raise ValueError(f"path does not exist: {v}")
            if p.is_dir() and not (p / "config.json").exists():
                raise ValueError(f"not a Hugging Face model directory (no config.json): {v}")
        return v


# ---------------------------------------------------------------------------------------------- train
class DeepSpeedCfg(Strict):
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="CPU offload of parameters (ZeRO-3 only)")
    gradient_checkpointing: bool = False
    tensor_parallel: int = Field(1, ge=1, description="DeepSpeed AutoTP degree; needs GPUs")

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedCfg":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class EarlyStopping(Strict):
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0.0)


class TrainCfg(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_steps: int | None = Field(200, ge=1, description="optimizer steps; or set epochs (and max_steps: null)")
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1, description="per worker, per micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3.0e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    clip_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_every: int = Field(50, ge=1)
    eval_batches: int | None = Field(None, ge=1, description="cap on val batches per evaluation (the same first batches each time: read once per worker group, then held)")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping: EarlyStopping | None = Field(default_factory=EarlyStopping)
    max_failures: int = Field(1, ge=-1)
    log_every: int = Field(10, ge=1)
    deepspeed: DeepSpeedCfg = Field(default_factory=DeepSpeedCfg)
    metric: Literal["val_loss", "val_ppl", "val_accuracy"] = Field(
        "val_loss", description="validation metric that picks the best checkpoint (exported) and drives early stopping")
    mode: Literal["min", "max"] = Field("min", description="whether a lower or higher `metric` is better")
    compile: bool = Field(False, description="torch.compile the model inside the DeepSpeed engine: pays for runs longer than its one-time compile (make bench-train-compile)")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="offline experiment tracking under output_dir/tracking/ (rank 0): "
                                          "TensorBoard event files, an MLflow run in a SQLite store")

    @model_validator(mode="after")
    def _length(self) -> "TrainCfg":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of max_steps, epochs")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs use_gpu: true (CPU has no fp16 training kernels); use bf16 or fp32")
        return self


# validation metrics each task's training reports, and the direction in which each is better
TASK_METRICS: dict[str, tuple[str, ...]] = {"causal_lm": ("val_loss", "val_ppl"), "masked_lm": ("val_loss", "val_ppl"),
                                            "classification": ("val_loss", "val_accuracy")}
METRIC_MODES: dict[str, str] = {"val_loss": "min", "val_ppl": "min", "val_accuracy": "max"}


# ----------------------------------------------------------------------------------------------- tune
DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "choice", "randint", "grid")


class TuneScheduler(Strict):
    type: Literal["asha", "median", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="evaluations before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1)


class TuneCfg(Strict):
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    space: dict[str, dict[str, Any]] = Field(default_factory=dict, description="dotted key -> {distribution: args}")
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: TuneScheduler = Field(default_factory=TuneScheduler)
    seed: int | None = Field(None, description="search seed; the top-level seed when omitted")

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, dist in space.items():
            check_distribution(key, dist)
        return space


def check_distribution(key: str, dist: Any) -> None:
    """A distribution is one mapping entry `{kind: args}`; raise ConfigError naming `tune.space.<key>`."""
    where = f"tune.space.{key}"
    if not isinstance(dist, dict) or len(dist) != 1:
        raise ConfigError(where, f"must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
    (kind, args), = dist.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(where, f"unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(where, f"{kind} takes a non-empty list of values")
        return
    n = 3 if kind == "quniform" else 2
    if not (isinstance(args, list) and len(args) == n and all(isinstance(a, (int, float)) for a in args)):
        raise ConfigError(where, f"{kind} takes [{'low, high, q' if n == 3 else 'low, high'}] numbers, got {args!r}")
    if not args[0] < args[1]:
        raise ConfigError(where, f"{kind} needs low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(where, "loguniform needs low > 0")


# ---------------------------------------------------------------------------------------------- serve
class Autoscaling(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="window Serve averages ongoing requests over")

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServeCfg(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", pattern=r"^/", description="URL prefix of this application (several can share a port)")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    num_cpus_per_replica: float = Field(1, gt=0)
    num_gpus_per_replica: float = Field(0, ge=0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_prompt_tokens: int = Field(1024, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    api_key_env: str | None = Field(None, description="env var holding the API key; requests then need a Bearer token")
    api_keys_env: str | None = Field(None, description="several API keys, one per line: an env var name, or a file "
                                                       "path (contains '/'); any of them (or api_key_env's) is accepted")
    log_request_bodies: bool = Field(False, description="log request bodies (prompt text) in the replica logs; off "
                                                        "because prompts can hold personal data or secrets")
    request_timeout_s: float = Field(120.0, gt=0, description="server-side limit on one HTTP request (Serve's "
                                                              "request_timeout_s): no request hangs on a stuck replica")
    ingress_replicas: int = Field(0, ge=0, description="0: the HTTP API (FastAPI) runs in each model replica, one "
                                                       "hop per request, and scales with it; N: a separate ingress "
                                                       "deployment of N replicas in front of the model replicas "
                                                       "(keeps HTTP and tokenizing off GPU replicas)")

    @model_validator(mode="after")
    def _exposed_needs_key(self) -> "ServeCfg":
        # beyond loopback, anyone who reaches the port could use the model: only with an API key
        if not is_loopback(self.host) and not (self.api_key_env or getattr(self, "api_keys_env", None)):
            raise ConfigError("serve.host", f"{self.host} is reachable from other machines: set serve.api_key_env "
                                            "(requests then need that key), or serve on 127.0.0.1")
        return self


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname other than localhost may resolve to any interface
        return False


# --------------------------------------------------------------------------------------------- config
# output_dir URI schemes (pyarrow.fs): object stores, HDFS, Azure; file:// is a local path
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


class Config(Strict):
    name: str = Field("raylm", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = "outputs/raylm"
    seed: int = 0
    data: Data = Field(default_factory=Data)
    model: ModelCfg = Field(default_factory=ModelCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    tune: TuneCfg | None = None
    serve: ServeCfg = Field(default_factory=ServeCfg)
    # path -> the text of each value that was written with `${ENV}` (set by load_config; see public_dump)
    _env_refs: dict[tuple, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        t = self.train
        if t.deepspeed.tensor_parallel > 1 and not t.use_gpu:
            raise ConfigError("train.deepspeed.tensor_parallel",
                              "tensor parallelism (DeepSpeed AutoTP) needs GPUs; set train.use_gpu: true or use 1")
        if t.deepspeed.tensor_parallel > 1 and t.num_workers % t.deepspeed.tensor_parallel:
            raise ConfigError("train.deepspeed.tensor_parallel", "must divide train.num_workers")
        if self.model.pretrained is None and self.model.task == "causal_lm" and self.model.arch.family == "bert":
            raise ConfigError("model.arch.family", "bert is an encoder; causal_lm needs gpt2 or llama")
        if self.model.pretrained is None and self.model.task != "causal_lm" and self.model.arch.family != "bert":
            raise ConfigError("model.arch.family", f"task {self.model.task} from scratch needs family: bert")
        if self.tune is not None:
            for key in self.tune.space:
                check_key_exists(self, key, where=f"tune.space.{key}")
        self._check_metric()
        if self.model.pretrained is not None and self.data.tokenizer.train is not None:
            raise ConfigError("data.tokenizer", f"a freshly trained tokenizer does not match the pretrained model's "
                                                f"embeddings; set data.tokenizer: {{pretrained: {self.model.pretrained}}}")
        return self

    def _check_metric(self) -> None:
        """`train.metric`/`train.mode` pick the best checkpoint; a search ranks trials by the same metric (given in
        either section, the other follows), which the task's validation must report, in its better direction."""
        t = self.train
        if self.tune is not None:
            tune_set, train_set = {"metric", "mode"} & self.tune.model_fields_set, {"metric", "mode"} & t.model_fields_set
            if tune_set and not train_set:
                if self.tune.metric not in METRIC_MODES:
                    raise ConfigError("tune.metric", f"{self.tune.metric!r} is not a validation metric; use one of "
                                                     f"{', '.join(TASK_METRICS[self.model.task])}")
                t.metric, t.mode = self.tune.metric, self.tune.mode
            elif (self.tune.metric, self.tune.mode) != (t.metric, t.mode):
                if tune_set:
                    raise ConfigError("tune.metric", f"{self.tune.metric} ({self.tune.mode}) differs from train.metric "
                                                     f"{t.metric} ({t.mode}): the search and the exported checkpoint "
                                                     "use one metric; set it in one section")
                self.tune.metric, self.tune.mode = t.metric, t.mode
        if t.metric not in TASK_METRICS[self.model.task]:
            raise ConfigError("train.metric", f"{self.model.task} validation reports "
                                              f"{', '.join(TASK_METRICS[self.model.task])}, not {t.metric}")
        if t.mode != METRIC_MODES[t.metric]:
            raise ConfigError("train.mode", f"a {'lower' if METRIC_MODES[t.metric] == 'min' else 'higher'} "
                                            f"{t.metric} is better: use {METRIC_MODES[t.metric]}")

    @field_validator("output_dir")
    @classmethod
    def _storage(cls, v: str) -> str:
        scheme = v.split("://", 1)[0].lower() if "://" in v else None
        if scheme is not None and scheme not in STORAGE_SCHEMES:
            raise ValueError(f"unsupported storage scheme {scheme}://; use a local path or one of "
                             f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}")
        return v

    # paths under output_dir, one place: `path` is local (for a remote output_dir, this node's mirror of it,
    # synced by raylm.storage at stage boundaries); `uri` is where the files live (what Ray reads and writes)
    def path(self, *parts: str) -> Path:
        from raylm import storage

        if storage.is_uri(self.output_dir):
            return storage.mirror_dir(self.output_dir).joinpath(*parts)
        return Path(self.output_dir.removeprefix("file://")).expanduser().joinpath(*parts)

    def uri(self, *parts: str) -> str:
        from raylm import storage

        return storage.join(self.output_dir, *parts)

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def public_dump(self) -> dict:
        """The config as JSON data with every `${ENV}` value written as the reference, never its (secret) value:
        what manifest.json, best.json, summary.json and `raylm validate` show."""
        data = self.model_dump(mode="json")
        for path, text in self._env_refs.items():
            node = data
            try:
                for part in path[:-1]:
                    node = node[part]
                node[path[-1]]  # noqa: B018 - only replace what the validated config still has
                node[path[-1]] = text
            except (KeyError, IndexError, TypeError):
                pass  # the key was normalised away by validation
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dump(), sort_keys=False)


def check_key_exists(cfg: BaseModel, dotted: str, where: str) -> None:
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, BaseModel) and part in type(node).model_fields:
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise ConfigError(where, f"no config key {dotted!r}")
    if isinstance(node, BaseModel):
        raise ConfigError(where, f"{dotted!r} is a section, not a value")


# ----------------------------------------------------------------------------------------- loading
def looks_like_path(s: str) -> bool:
    """A model/tokenizer reference is a path (must exist) unless it looks like a hub id `org/name`."""
    return s.startswith(("/", ".", "~")) or os.sep in s.strip("/").split("/", 1)[-1] or Path(s).exists()


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_refs(value: Any, key: str = "", env_refs: dict[tuple, str] | None = None, path: tuple = ()) -> Any:
    """Expand `${ENV_VAR}` in strings and `pkg:PACKAGE[/sub/path]` to a path inside an installed package.
    With `env_refs`, records path -> the unexpanded text of every string that used `${...}` (see Config.public_dump)."""
    if isinstance(value, dict):
        return {k: resolve_refs(v, f"{key}.{k}" if key else str(k), env_refs, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, f"{key}.{i}", env_refs, (*path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if env_refs is not None and _ENV.search(value):
        env_refs[path] = value

    def env(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise ConfigError(key, f"environment variable {m.group(1)} is not set")
        return os.environ[m.group(1)]

    value = _ENV.sub(env, value)
    if value.startswith("pkg:"):
        pkg, _, sub = value[4:].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(key, f"package {pkg!r} is not installed (from {value!r})")
        value = str(Path(list(spec.submodule_search_locations)[0]) / sub)
    return value


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b.c=VALUE` (YAML-typed value) to the raw config dict."""
    if "=" not in assignment:
        raise ConfigError(assignment or "--set", "expected KEY=VALUE")
    key, _, text = assignment.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(key or "--set", "empty key in --set")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(key, f"value is not valid YAML: {e.problem if hasattr(e, 'problem') else e}") from None
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, cannot set a key inside it")
        node = nxt
    node[parts[-1]] = value


def _dotted(loc: tuple) -> str:
    # pydantic puts the union/tag member names in loc for some errors; keep only real keys and indexes
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def validate_config(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, ConfigError):
            raise ctx_err from None
        key = _dotted(err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(key, msg) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("-c", f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("-c", f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("(top level)", "a config file is a YAML mapping")
    for a in overrides:
        apply_override(raw, a)
    env_refs: dict[tuple, str] = {}
    cfg = validate_config(resolve_refs(raw, env_refs=env_refs))
    cfg._env_refs = env_refs
    return cfg


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted-key values applied and re-validated (used by tune trials)."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    new = validate_config(raw)
    # `${ENV}` references stay recorded for the keys the overrides left alone
    new._env_refs = {p: t for p, t in cfg._env_refs.items() if ".".join(map(str, p)) not in values}
    return new
