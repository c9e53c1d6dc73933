"""`model/README.md`: a Hugging Face model card, written by `raylm evaluate` once test metrics exist.

YAML front matter the Hub reads (`library_name`, `pipeline_tag`, `tags`, `datasets`, `base_model`, `model-index`
with every scalar test metric, values equal to metrics.json), then the data card (documents, drops by reason,
tokens per split), the training config, the evaluation table with its baselines, and the lineage (manifest hash
and config hash).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from raylm.config import Config
from raylm.storage import write_text_atomic

PIPELINE_TAGS = {"causal_lm": "text-generation", "masked_lm": "fill-mask", "classification": "text-classification"}
TASK_NAMES = {"causal_lm": "Causal language modeling", "masked_lm": "Masked language modeling",
              "classification": "Text classification"}
SKIP_METRICS = {"rows", "wall_time_s", "tokens_scored"}  # bookkeeping, not quality


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The test metrics a card reports: top-level numbers of metrics.json (not counts or timings)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in SKIP_METRICS}


def baselines(metrics: dict) -> dict[str, dict[str, float]]:
    """metric -> {baseline name: value}: n-gram perplexities for LMs, the majority class for classifiers."""
    out: dict[str, dict[str, float]] = {}
    for key, value in (metrics.get("baselines") or {}).items():  # unigram_perplexity, bigram_perplexity
        if key.endswith("_perplexity") and isinstance(value, (int, float)):
            out.setdefault("perplexity", {})[key.removesuffix("_perplexity")] = value
    base = metrics.get("baseline") or {}
    for key in ("accuracy", "macro_f1"):
        if isinstance(base.get(key), (int, float)):
            out.setdefault(key, {})[base.get("kind", "baseline")] = base[key]
    return out


def dataset_ids(manifest: dict, cfg: Config) -> list[str]:
    sources = manifest.get("sources") or [{"name": s.name} for s in cfg.data.sources]
    return [s["name"] for s in sources]


def file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def front_matter(cfg: Config, manifest: dict, metrics: dict) -> dict[str, Any]:
    task = cfg.model.task
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": PIPELINE_TAGS[task],
        "tags": ["raylm", "ray", "deepspeed", task.replace("_", "-"),
                 cfg.model.arch.family if cfg.model.pretrained is None else "fine-tuned"],
        "datasets": dataset_ids(manifest, cfg),
    }
    if cfg.model.pretrained:
        meta["base_model"] = cfg.model.pretrained
    meta["model-index"] = [{"name": cfg.name, "results": [{
        "task": {"type": PIPELINE_TAGS[task], "name": TASK_NAMES[task]},
        "dataset": {"type": f"raylm/{cfg.name}", "name": ", ".join(meta["datasets"]), "split": "test"},
        "metrics": [{"type": k, "value": v, "name": f"test {k.replace('_', ' ')}"}
                    for k, v in scalar_metrics(metrics).items()],
    }]}]
    return meta


def data_card(manifest: dict) -> str:
    if not manifest:
        return "No data manifest was found (the model was evaluated without `raylm prepare`'s output).\n"
    lines = [f"- documents read: {manifest.get('documents_read', '?')}, kept: {manifest.get('documents_kept', '?')}",
             f"- duplicates removed: {manifest.get('duplicates', {})}"]
    dropped = manifest.get("dropped") or {}
    lines.append("- dropped by reason: " + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none"))
    lines += ["", "| source | documents read | kept |", "| --- | ---: | ---: |"]
    lines += [f"| {s['name']} | {s.get('documents_read', '')} | {s.get('documents_kept', '')} |"
              for s in manifest.get("sources") or []]
    lines += ["", "| split | documents | tokens | rows |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {s.get('documents', '')} | {s.get('tokens', '')} | {s.get('rows', '')} |"
              for name, s in (manifest.get("splits") or {}).items()]
    return "\n".join(lines) + "\n"


def eval_table(metrics: dict) -> str:
    base = baselines(metrics)
    names = sorted({n for b in base.values() for n in b})
    header = "| metric | this model | " + " | ".join(f"{n} baseline" for n in names) + " |"
    rows = [header, "| --- | ---: |" + " ---: |" * len(names)]
    for key, value in scalar_metrics(metrics).items():
        cells = [f"{base.get(key, {}).get(n):.4g}" if n in base.get(key, {}) else "" for n in names]
        rows.append(f"| {key} | {value:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def usage(cfg: Config) -> str:
    from raylm.train.models import TASK_AUTO_CLASSES  # its one home (imports torch: only when a card is written)

    auto = TASK_AUTO_CLASSES[cfg.model.task]
    return (f"```python\nfrom transformers import {auto}, AutoTokenizer\n\n"
            f"model = {auto}.from_pretrained(\"path/to/model\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"path/to/model\")\n```\n\n"
            f"Served over HTTP (OpenAI-compatible): `raylm serve -c CONFIG --model path/to/model`.\n")


def render(cfg: Config, manifest: dict, metrics: dict, summary: dict, manifest_sha: str | None) -> str:
    meta = front_matter(cfg, manifest, metrics)
    train_cfg = {k: v for k, v in cfg.public_dump().items() if k in ("model", "train", "tune", "seed")}
    val = summary.get("val") or {}
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n",
        f"# {cfg.name}\n",
        f"A {TASK_NAMES[cfg.model.task].lower()} model trained with raylm (Ray Data -> Ray Train + DeepSpeed"
        f"{' -> Ray Tune' if cfg.tune else ''}), "
        + (f"fine-tuned from `{cfg.model.pretrained}`." if cfg.model.pretrained else
           f"trained from scratch ({cfg.model.arch.family}, {cfg.model.arch.n_layer} layers, "
           f"d_model {cfg.model.arch.d_model}).") + "\n",
        "## How to use\n", usage(cfg),
        "## Evaluation (test split)\n", eval_table(metrics),
        f"\nBest checkpoint: step {summary.get('best_step', '?')} of {summary.get('steps', '?')}"
        + (f"; validation {', '.join(f'{k} {v:.4g}' for k, v in val.items())}" if val else "") + ".\n",
        "## Data card\n", data_card(manifest),
        "## Training config\n", "```yaml\n" + yaml.safe_dump(train_cfg, sort_keys=False) + "```\n",
        "## Lineage\n",
        f"- config hash: `{cfg.config_hash()}`\n"
        f"- data manifest hash (sha256 of data/manifest.json): `{manifest_sha or 'n/a'}`\n"
        f"- data manifest's config hash: `{manifest.get('config_hash', 'n/a')}`\n"
        f"- metrics: `metrics.json` (sha256 `{hashlib.sha256(json.dumps(metrics, sort_keys=True, default=str).encode()).hexdigest()[:16]}`)\n",
    ]
    return "\n".join(parts)


def write_model_card(cfg: Config, model_dir: str | Path, metrics: dict) -> Path:
    """Write `model_dir/README.md` from the config, the data manifest, training_summary.json and the test metrics."""
    model_dir = Path(model_dir)
    manifest_path = cfg.path("data", "manifest.json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    summary_path = model_dir / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    path = model_dir / "README.md"
    write_text_atomic(path, render(cfg, manifest, metrics, summary, file_hash(manifest_path)))
    return path
