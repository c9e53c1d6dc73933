"""`raylm evaluate`: metrics of a model on the held-out test split, then metrics.json and report.md.

The test shards are scored by Ray Data `map_batches` with a callable class (the model is loaded once per actor);
each scorer returns per-row numbers (loss sums, token counts, probabilities) and the driver aggregates them into
the task's metrics. Classification metrics come from scikit-learn; the majority-class baseline is the train
split's most frequent label, scored on the test split.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raylm.config import Config, ConfigError
from raylm.storage import add_file, is_uri, list_files, materialize, read_parquet, resolve as resolve_storage, stage_io, write_json_atomic

log = logging.getLogger(__name__)

MASK_FRACTION = 0.15  # BERT's masking rate, applied with a fixed seed per row so runs are comparable
NUM_COMPLETIONS = 3  # sampled completions for a causal LM, from the first test rows' opening tokens
PROMPT_TOKENS = 16
COMPLETION_TOKENS = 32
ROC_POINTS = 101  # ROC curves kept in metrics.json are thinned to at most this many points per class


def load_model(model_dir: str, task: str, device: str = "cpu"):
    from raylm.train.models import auto_class

    model = auto_class(task).from_pretrained(materialize(model_dir))  # a URI: this node's verified copy
    return model.to(device).eval()


# ------------------------------------------------------------------------------------ per-row scoring
def score_causal_lm(model, batch: dict[str, np.ndarray], ctx: dict) -> dict[str, np.ndarray]:
    """Next-token loss sum, token count and correct next-token predictions per packed row."""
    import torch

    ids = torch.as_tensor(np.stack(batch["input_ids"]).astype(np.int64), device=ctx["device"])
    logits = model(input_ids=ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return {
        "loss_sum": losses.double().sum(1).cpu().numpy(),
        "n_tokens": np.full(len(ids), targets.shape[1], dtype=np.int64),
        "n_correct": (logits.argmax(-1) == targets).sum(1).cpu().numpy(),
    }


def masking_context(manifest: dict, seed: int) -> dict[str, Any]:
    """What `mask_row` needs from data/manifest.json: the [MASK] id, the ids never masked, the vocab size."""
    special = manifest.get("special_tokens") or {}
    if special.get("mask_token_id") is None:
        raise ConfigError("model.task", "masked_lm evaluation needs a [MASK] token in the tokenizer")
    return {"seed": seed, "mask_token_id": special["mask_token_id"], "vocab_size": manifest["vocab_size"],
            "special_ids": np.array([v for v in special.values() if v is not None and v != special["mask_token_id"]])}


def mask_row(ids: np.ndarray, ctx: dict) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one row for validation and test (training's collator applies the same rule): 15% of
    non-special tokens chosen (at least one); of those 80% become [MASK], 10% a random token, 10% stay. Seeded by
    the row's content, so a row is masked the same way whatever the batching or order. Returns (inputs, chosen)."""
    rng = np.random.default_rng([ctx["seed"], zlib.crc32(ids.astype(np.int32).tobytes())])
    candidates = ~np.isin(ids, ctx["special_ids"])
    chosen = (rng.random(len(ids)) < MASK_FRACTION) & candidates
    if not chosen.any() and candidates.any():
        chosen[rng.choice(np.flatnonzero(candidates))] = True
    action = rng.random(len(ids))
    masked = ids.copy()
    masked[chosen & (action < 0.8)] = ctx["mask_token_id"]
    randomized = chosen & (action >= 0.8) & (action < 0.9)
    masked[randomized] = rng.integers(0, ctx["vocab_size"], int(randomized.sum()))
    return masked, chosen


def score_masked_lm(model, batch: dict[str, np.ndarray], ctx: dict) -> dict[str, np.ndarray]:
    """Loss sum, masked-token count and correct predictions per row, with the seeded 80/10/10 masking."""
    import torch

    ids = np.stack(batch["input_ids"]).astype(np.int64)
    rows = [mask_row(row, ctx) for row in ids]
    masked, chosen = np.stack([m for m, _ in rows]), np.stack([c for _, c in rows])
    attention = np.stack(batch["attention_mask"]) if "attention_mask" in batch else (ids != ctx["pad_id"])
    logits = model(input_ids=torch.as_tensor(masked, device=ctx["device"]),
                   attention_mask=torch.as_tensor(attention.astype(np.int64), device=ctx["device"])).logits.float()
    targets = torch.as_tensor(ids, device=ctx["device"])
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    where = torch.as_tensor(chosen, device=ctx["device"])
    return {
        "loss_sum": (losses.double() * where).sum(1).cpu().numpy(),
        "n_tokens": chosen.sum(1).astype(np.int64),
        "n_correct": ((logits.argmax(-1) == targets) & where).sum(1).cpu().numpy(),
    }


def score_classification(model, batch: dict[str, np.ndarray], ctx: dict) -> dict[str, np.ndarray]:
    """Class probabilities and the true label per row."""
    import torch

    ids = torch.as_tensor(np.stack(batch["input_ids"]).astype(np.int64), device=ctx["device"])
    attention = torch.as_tensor(np.stack(batch["attention_mask"]).astype(np.int64), device=ctx["device"])
    probs = torch.softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
    return {"label": np.asarray(batch["label"], dtype=np.int64), "probs": probs.cpu().numpy()}


SCORERS: dict[str, Callable] = {
    "causal_lm": score_causal_lm,
    "masked_lm": score_masked_lm,
    "classification": score_classification,
}


class SplitScorer:
    """Ray Data callable class: loads the model once per actor, scores batches of test rows."""

    def __init__(self, model_dir: str, task: str, ctx: dict):
        import torch

        self.ctx = dict(ctx, device="cuda" if ctx.get("use_gpu") and torch.cuda.is_available() else "cpu")
        self.task = task
        self.model = load_model(model_dir, task, self.ctx["device"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            return SCORERS[self.task](self.model, batch, self.ctx)


# ------------------------------------------------------------------------------- driver aggregation
def aggregate_lm(cols: dict[str, np.ndarray], ctx: dict) -> dict[str, Any]:
    tokens = int(cols["n_tokens"].sum())
    loss = float(cols["loss_sum"].sum() / max(tokens, 1))
    accuracy_key = "token_accuracy" if ctx["task"] == "causal_lm" else "masked_token_accuracy"
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        accuracy_key: float(cols["n_correct"].sum() / max(tokens, 1)),
        "tokens_scored": tokens,
    }


def roc_points(y_true: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y_true, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
    return {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}


def aggregate_classification(cols: dict[str, np.ndarray], ctx: dict) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels, probs = cols["label"], np.asarray(cols["probs"], dtype=np.float64)
    names: list[str] = ctx["label_names"]
    class_ids = list(range(len(names)))
    preds = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=class_ids, average=None, zero_division=0)
    present = [c for c in class_ids if (labels == c).any()]
    auc_per_class, roc = {}, {}
    for c in present:
        if 0 < (labels == c).sum() < len(labels):  # AUC needs both positives and negatives
            auc_per_class[names[c]] = float(roc_auc_score(labels == c, probs[:, c]))
            roc[names[c]] = roc_points(labels == c, probs[:, c])
    majority = ctx["majority_label"]
    baseline_preds = np.full_like(labels, majority)
    _, _, baseline_f1, _ = precision_recall_fscore_support(
        labels, baseline_preds, labels=class_ids, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {names[c]: {"precision": float(precision[c]), "recall": float(recall[c]),
                                 "f1": float(f1[c]), "support": int(support[c])} for c in class_ids},
        "auc_roc_macro": float(np.mean(list(auc_per_class.values()))) if auc_per_class else None,
        "auc_roc": auc_per_class,
        "confusion_matrix": {"labels": names,  # rows: true label, columns: predicted label
                             "matrix": confusion_matrix(labels, preds, labels=class_ids).tolist()},
        "baseline": {"kind": "majority_class", "label": names[majority],
                     "accuracy": float((labels == majority).mean()), "macro_f1": float(baseline_f1)},
        "roc_curves": roc,
    }


AGGREGATES: dict[str, Callable[[dict, dict], dict]] = {
    "causal_lm": aggregate_lm,
    "masked_lm": aggregate_lm,
    "classification": aggregate_classification,
}


# --------------------------------------------------------------------------------------- completions
def sample_completions(model_dir: str, prompts: list[list[int]], seed: int, use_gpu: bool) -> list[dict]:
    """A few sampled continuations of fixed prompts (run as a Ray task next to the scorers)."""
    import torch
    from transformers import AutoTokenizer

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, "causal_lm", device)
    tokenizer = AutoTokenizer.from_pretrained(materialize(model_dir))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # the model cannot attend past its context: a completion stops there
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    out = []
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50,
                                 max_new_tokens=max(1, min(COMPLETION_TOKENS, context - len(prompt))),
                                 pad_token_id=pad)
        out.append({"prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(gen[0, len(prompt):])})
    return out


def first_rows(split_dir: str | Path, n: int, columns: list[str]) -> dict[str, list]:
    import pyarrow.parquet as pq

    rows: dict[str, list] = {c: [] for c in columns}
    fs, _ = resolve_storage(split_dir)
    for shard in list_files(split_dir, ".parquet"):
        table = pq.read_table(shard, columns=columns, filesystem=fs).slice(0, n - len(rows[columns[0]]))
        for c in columns:
            rows[c].extend(table.column(c).to_pylist())
        if len(rows[columns[0]]) >= n:
            break
    return rows


# ----------------------------------------------------------------------------------- n-gram baselines
BIGRAM_LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # interpolation weights tried on val


def split_rows(split_dir: str | Path):
    """The `input_ids` rows of one split, shard by shard (each an int64 matrix of packed blocks)."""
    import pyarrow.parquet as pq

    fs, _ = resolve_storage(split_dir)
    for shard in list_files(split_dir, ".parquet"):
        column = pq.read_table(shard, columns=["input_ids"], filesystem=fs).column("input_ids").to_pylist()
        if column:
            yield np.asarray(column, dtype=np.int64)


def ngram_counts(split_dir: str | Path, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unigram counts (length vocab) and the distinct bigram codes (prev * vocab + next, sorted) with their counts,
    over next-token positions inside rows, as the model is scored (bounded by vocab^2, not by the corpus)."""
    unigram = np.zeros(vocab, dtype=np.int64)
    codes, counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    for rows in split_rows(split_dir):
        unigram += np.bincount(rows[:, 1:].ravel(), minlength=vocab)[:vocab]
        c, n = np.unique((rows[:, :-1] * vocab + rows[:, 1:]).ravel(), return_counts=True)
        merged, inverse = np.unique(np.concatenate([codes, c]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([counts, n]), minlength=len(merged)).astype(np.int64)
        codes = merged
    return unigram, codes, counts


def ngram_log_probs(rows: np.ndarray, model: dict, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Per next-token position: log P_unigram (add-one) and log P_bigram (Jelinek-Mercer: lam * c(a,b)/c(a) +
    (1 - lam) * P_unigram(b); the unigram alone after a token never seen in context)."""
    vocab, unigram, codes, counts, context = model["vocab"], model["unigram"], model["codes"], model["counts"], model["context"]
    prev, nxt = rows[:, :-1].ravel(), rows[:, 1:].ravel()
    p_uni = (unigram[nxt] + 1) / (unigram.sum() + vocab)
    q = prev * vocab + nxt
    idx = np.clip(np.searchsorted(codes, q), 0, max(len(codes) - 1, 0))
    c_ab = np.where((len(codes) > 0) & (codes[idx] == q), counts[idx], 0) if len(codes) else np.zeros_like(q)
    c_a = context[prev]
    p_bi = np.where(c_a > 0, lam * c_ab / np.maximum(c_a, 1) + (1 - lam) * p_uni, p_uni)
    return np.log(p_uni), np.log(p_bi)


def ngram_baselines(cfg: Config, manifest: dict) -> dict[str, Any]:
    """Unigram and bigram perplexities of the test tokens the model is scored on (counts from the train split;
    the bigram's interpolation weight chosen on the val split): what "perplexity N" is to be compared with."""
    vocab = int(manifest["vocab_size"])
    unigram, codes, counts = ngram_counts(cfg.uri("data", "train"), vocab)
    context = np.bincount(codes // vocab, weights=counts, minlength=vocab)[:vocab] if len(codes) else np.zeros(vocab)
    model = {"vocab": vocab, "unigram": unigram, "codes": codes, "counts": counts, "context": context}

    def mean_nll(split: str, lam: float) -> tuple[float, float, int]:
        uni = bi = 0.0
        n = 0
        for rows in split_rows(cfg.uri("data", split)):
            lu, lb = ngram_log_probs(rows, model, lam)
            uni, bi, n = uni - lu.sum(), bi - lb.sum(), n + lu.size
        return uni / max(n, 1), bi / max(n, 1), n

    has_val = bool(list_files(cfg.uri("data", "val"), ".parquet"))
    lam = min(BIGRAM_LAMBDAS, key=lambda x: mean_nll("val", x)[1]) if has_val else 0.5
    uni, bi, n = mean_nll("test", lam)
    return {"unigram_perplexity": math.exp(min(uni, 700.0)), "bigram_perplexity": math.exp(min(bi, 700.0)),
            "bigram_lambda": lam, "tokens_scored": n,
            "smoothing": "unigram add-one; bigram interpolated with it (weight chosen on val); counts from train"}


# ---------------------------------------------------------------------------------------- the stage
def scoring_context(cfg: Config, model_dir: Path, manifest: dict) -> dict[str, Any]:
    """What the scorers and aggregators need besides the rows: special ids, label names, the baseline."""
    task = cfg.model.task
    special = manifest.get("special_tokens") or {}
    ctx: dict[str, Any] = {"task": task, "seed": cfg.seed, "use_gpu": cfg.train.use_gpu,
                           "pad_id": special.get("pad_token_id")}
    if task == "masked_lm":
        ctx.update(masking_context(manifest, cfg.seed))
    if task == "classification":
        model_config = json.loads((model_dir / "config.json").read_text())
        id2label = {int(k): v for k, v in (model_config.get("id2label") or {}).items()}
        if not id2label and manifest.get("label_map"):
            id2label = {i: name for name, i in manifest["label_map"].items()}
        ctx["label_names"] = [str(id2label[i]) for i in range(len(id2label))]
        ctx["majority_label"] = majority_label(cfg.uri("data", "train"))
    return ctx


def majority_label(train_dir: str | Path) -> int:
    import pyarrow.parquet as pq

    counts: dict[int, int] = {}
    fs, _ = resolve_storage(train_dir)
    for shard in list_files(train_dir, ".parquet"):
        for label in pq.read_table(shard, columns=["label"], filesystem=fs).column("label").to_pylist():
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        raise FileNotFoundError(f"no training labels under {train_dir} for the majority-class baseline")
    return max(sorted(counts), key=counts.get)


def score_test_split(cfg: Config, model_dir: str | Path, ctx: dict) -> dict[str, np.ndarray]:
    """Scores every test row with Ray Data actors; returns the per-row outputs as concatenated columns."""
    import ray

    test_dir = cfg.uri("data", "test")  # local or in an object store: Ray Data reads it where it is
    if not list_files(test_dir, ".parquet"):
        raise FileNotFoundError(f"no test shards under {test_dir}; run `raylm prepare` first")
    columns = ["input_ids"] + {"classification": ["attention_mask", "label"]}.get(cfg.model.task, [])
    ds = read_parquet(test_dir, columns)
    scored = ds.map_batches(
        SplitScorer,
        fn_constructor_kwargs={"model_dir": str(model_dir), "task": cfg.model.task, "ctx": ctx},
        batch_size=max(cfg.train.batch_size, 8),
        batch_format="numpy",
        # one actor per training worker's worth of resources, at least one; a laptop gets one
        concurrency=(1, max(1, cfg.train.num_workers)),
        num_cpus=cfg.train.cpus_per_worker,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    parts: dict[str, list[np.ndarray]] = {}
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value) if value.dtype != object else np.stack(value))
    if not parts:
        raise ValueError(f"the test split under {test_dir} has no rows")
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}


@stage_io("evaluate")  # remote output_dir: report.md and plots/ are written to the mirror, then uploaded
def evaluate(cfg: Config, model_dir: str | Path | None = None) -> dict[str, Any]:
    """Scores the model on the test split; writes metrics.json, report.md and plots/*.png."""
    import ray

    from raylm.modelcard import write_model_card
    from raylm.report import write_report

    start = time.time()
    model_ref = str(model_dir) if model_dir else cfg.uri("model")  # what scorers load, on any node (path or URI)
    model_dir = materialize(model_ref)  # this node's copy: downloaded and verified when it is a URI
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no model at {model_ref} (run `raylm train` or `raylm tune`, or pass --model)")
    manifest_path = cfg.path("data", "manifest.json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    task = cfg.model.task
    ctx = scoring_context(cfg, model_dir, manifest)
    log.info("evaluate: scoring %s (%s) on %s", model_ref, task, cfg.uri("data", "test"))

    completions_ref = None
    if task == "causal_lm":
        prompt_len = min(PROMPT_TOKENS, cfg.data.block_size // 2)
        prompts = [ids[:prompt_len] for ids in first_rows(cfg.uri("data", "test"), NUM_COMPLETIONS, ["input_ids"])["input_ids"]]
        completions_ref = ray.remote(sample_completions).options(
            num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0,
        ).remote(model_ref, prompts, cfg.seed, cfg.train.use_gpu)

    cols = score_test_split(cfg, model_ref, ctx)
    metrics: dict[str, Any] = {"task": task, "split": "test", "model_dir": model_ref,
                               "rows": int(len(next(iter(cols.values())))), **AGGREGATES[task](cols, ctx)}
    if task == "causal_lm":  # the same test tokens under n-gram models of the train split
        metrics["baselines"] = ngram_baselines(cfg, manifest)
    if completions_ref is not None:
        metrics["completions"] = ray.get(completions_ref)
    metrics["wall_time_s"] = round(time.time() - start, 2)
    write_json_atomic(cfg.uri("metrics.json"), metrics)
    write_report(cfg, metrics, model_dir)
    card = write_model_card(cfg, model_dir, metrics)  # model/README.md: the metrics now exist
    if is_uri(model_ref):  # model_dir is this node's cache of the stored model: the card goes to the store too
        add_file(model_ref, card)
    log.info("evaluate: %s", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics
