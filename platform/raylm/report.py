"""report.md with PNG plots: what a run did, read back from the files the stages wrote.

Sources: `metrics.json`'s dict (test metrics), `model/training_summary.json` (`history`, `evals`),
`tune/best.json` (trial table and per-trial curves), `data/manifest.json` (the data card). Each section is a
function that returns markdown and draws its plots; a missing source skips its section.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from raylm.config import Config

PLOT_DPI = 100


def new_figure(width: float = 7, height: float = 4):
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe inside Ray workers
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig, path: Path) -> str:
    """Writes the PNG atomically; returns its path relative to the report."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    plt.close(fig)
    tmp.replace(path)
    return f"{path.parent.name}/{path.name}"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sections
def test_metrics_section(ctx: dict) -> str:
    m = ctx["metrics"]
    scalars = [[k, v] for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = [f"## Test metrics ({m.get('task')}, {m.get('rows')} rows)", "", table(["metric", "value"], scalars)]
    if "baseline" in m:
        b = m["baseline"]
        out += ["", f"Majority-class baseline (always `{b['label']}`): accuracy {fmt(b['accuracy'])}, "
                    f"macro F1 {fmt(b['macro_f1'])}; the model: accuracy {fmt(m['accuracy'])}, macro F1 {fmt(m['macro_f1'])}."]
    if "baselines" in m:  # language models: n-gram perplexities of the same test tokens
        b = m["baselines"]
        out += ["", f"Baselines on the same test tokens ({b['smoothing']}): unigram perplexity "
                    f"{fmt(b['unigram_perplexity'])}, bigram perplexity {fmt(b['bigram_perplexity'])}; "
                    f"the model: perplexity {fmt(m['perplexity'])}."]
    if "per_class" in m:
        rows = [[name, c["precision"], c["recall"], c["f1"], c["support"], m["auc_roc"].get(name, "n/a")]
                for name, c in m["per_class"].items()]
        out += ["", table(["class", "precision", "recall", "F1", "support", "AUC-ROC"], rows)]
    if m.get("completions"):
        out += ["", "Sampled completions (prompt → completion):", ""]
        out += [f"- `{c['prompt']!r}` → `{c['completion']!r}`" for c in m["completions"]]
    return "\n".join(out)


def training_section(ctx: dict) -> str:
    summary = read_json(ctx["model_dir"] / "training_summary.json")
    if not summary:
        return ""
    history, evals = summary.get("history") or [], summary.get("evals") or []
    out = ["## Training", "", f"Steps {summary.get('steps')}, best step {summary.get('best_step')}, "
           f"tokens seen {summary.get('tokens_seen')}, {fmt(summary.get('tokens_per_s'))} tokens/s, "
           f"wall time {fmt(summary.get('wall_time_s'))} s."]
    if history or evals:
        fig, ax = new_figure()
        if history:
            ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], label="train loss")
        if evals:
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="val loss")
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        out += ["", f"![loss]({save_figure(fig, ctx['plots'] / 'loss.png')})"]
    if any("lr" in h for h in history):
        fig, ax = new_figure(7, 3)
        ax.plot([h["step"] for h in history if "lr" in h], [h["lr"] for h in history if "lr" in h])
        ax.set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule")
        ax.grid(alpha=0.3)
        out += ["", f"![learning rate]({save_figure(fig, ctx['plots'] / 'lr_schedule.png')})"]
    return "\n".join(out)


def tune_section(ctx: dict) -> str:
    best = read_json(ctx["cfg"].path("tune", "best.json"))
    if not best:
        return ""
    metric, trials = best["metric"], best.get("trials") or []
    winner = best.get("best_trial", {}).get("trial_id")
    keys = sorted({k for t in trials for k in t.get("hyperparameters", {})})
    out = ["## Tuning", "", f"{len(trials)} trials, `{metric}` ({best['mode']}), scheduler "
           f"{best.get('scheduler')}, search {best.get('search')}; winner `{winner}`."]
    fig, ax = new_figure(8, 4.5)
    for t in trials:
        curve = t.get("curve") or []
        if not curve:
            continue
        xs, ys = [p["step"] for p in curve], [p["value"] for p in curve]
        line, = ax.plot(xs, ys, lw=2.5 if t["trial_id"] == winner else 1.2, label=t["trial_id"])
        stopped = t["status"] != "finished"
        # a stopped trial's curve ends in a red cross, a finished one in a dot
        ax.plot(xs[-1], ys[-1], "X" if stopped else "o", ms=10 if stopped else 6,
                color="red" if stopped else line.get_color())
    ax.set(xlabel="step", ylabel=metric, title=f"Trials: {metric} per evaluation (× = stopped early)")
    ax.grid(alpha=0.3)
    if trials:
        ax.legend(fontsize=7, ncol=2)
    out += ["", f"![trials]({save_figure(fig, ctx['plots'] / 'tune_trials.png')})", ""]
    rows = [[t["trial_id"] + (" (best)" if t["trial_id"] == winner else ""),
             *[t.get("hyperparameters", {}).get(k, "") for k in keys], t["status"], t.get("metric"),
             t.get("iterations")] for t in trials]
    out.append(table(["trial", *keys, "status", metric, "evaluations"], rows))
    return "\n".join(out)


def classification_section(ctx: dict) -> str:
    m = ctx["metrics"]
    if "confusion_matrix" not in m:
        return ""
    import numpy as np

    names, matrix = m["confusion_matrix"]["labels"], np.array(m["confusion_matrix"]["matrix"])
    fig, ax = new_figure(1.5 + 0.6 * len(names), 1 + 0.6 * len(names))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    ax.tick_params(axis="x", rotation=45)
    out = ["## Classification", "", f"![confusion matrix]({save_figure(fig, ctx['plots'] / 'confusion_matrix.png')})"]
    if m.get("roc_curves"):
        fig, ax = new_figure(5.5, 5)
        for name, curve in m["roc_curves"].items():
            ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {m['auc_roc'][name]:.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one-vs-rest (test)")
        ax.legend(fontsize=8)
        out += ["", f"![ROC curves]({save_figure(fig, ctx['plots'] / 'roc.png')})"]
    return "\n".join(out)


def data_card_section(ctx: dict) -> str:
    manifest = read_json(ctx["cfg"].path("data", "manifest.json"))
    if not manifest:
        return ""
    sources = [s if isinstance(s, dict) else {"name": s} for s in manifest.get("sources") or []]
    source_keys = list(dict.fromkeys(k for s in sources for k in s))
    out = ["## Data card", "", f"Task {manifest.get('task')}, block size {manifest.get('block_size')}, "
           f"vocabulary {manifest.get('vocab_size')}, config hash `{manifest.get('config_hash')}`.", "",
           f"Documents read {manifest.get('documents_read')}, kept {manifest.get('documents_kept')}."]
    if sources:
        out += ["", table(source_keys, [[s.get(k, "") for k in source_keys] for s in sources])]
    dropped = manifest.get("dropped") or {}
    dups, pii = manifest.get("duplicates") or {}, manifest.get("pii") or {}
    out += ["", table(["dropped / removed / replaced", "count"],
                      [[f"dropped: {k}", v] for k, v in dropped.items()]
                      + [[f"duplicates: {k}", v] for k, v in dups.items()]
                      + [[f"PII replaced: {k}", v] for k, v in pii.items()])]
    out += quality_card(manifest.get("quality") or {})
    splits = manifest.get("splits") or {}
    out += ["", table(["split", "documents", "tokens", "rows", "shards"],
                      [[name, s.get("documents"), s.get("tokens"), s.get("rows"), s.get("shards")]
                       for name, s in splits.items()])]
    return "\n".join(out)


def quality_card(q: dict) -> list[str]:
    """The quality rules' drops (manifest `quality`): per rule with sub-rules, sources and languages, examples."""
    if not q.get("per_rule"):
        return []

    def top(counts: dict, k: int = 3) -> str:
        return ", ".join(f"{name} {n}" for name, n in list(counts.items())[:k])

    out = ["", f"Quality rules (preset `{q['preset']}`, languages {q.get('languages_kept')}): "
               f"{q['documents_dropped']} of {q['documents_checked']} documents checked were dropped; "
               "`raylm inspect -c CFG --reason RULE` prints them.", "",
           table(["rule", "dropped", "share", "sub-rules", "sources", "languages"],
                 [[r, s["dropped"], f"{s['share']:.1%}", top(s["by_detail"]), top(s["by_source"], 2), top(s["by_language"])]
                  for r, s in q["per_rule"].items()])]
    out += ["", table(["language", "kept", "dropped"], [[lang, c["kept"], c["dropped"]] for lang, c in q["languages"].items()][:10])]
    for rule, s in q["per_rule"].items():
        for kind in ("rejected", "kept"):
            ex = s.get(f"example_{kind}")
            if ex and ex.get("text"):
                snippet = " ".join(ex["text"].split())[:240].replace("|", "\\|")
                out += ["", f"*{rule}, {kind}* (`{ex['doc_id']}`): {snippet}..."]
    return out


SECTIONS: list[Callable[[dict], str]] = [
    test_metrics_section, classification_section, training_section, tune_section, data_card_section,
]


def write_report(cfg: Config, metrics: dict, model_dir: str | Path) -> Path:
    """Writes output_dir/report.md and output_dir/plots/*.png; returns the report's path."""
    ctx = {"cfg": cfg, "metrics": metrics, "model_dir": Path(model_dir), "plots": cfg.path("plots")}
    parts = [f"# raylm report: {cfg.name}", f"Model `{model_dir}`; output `{cfg.output_dir}`."]
    parts += [text for section in SECTIONS if (text := section(ctx))]
    path = cfg.path("report.md")
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n\n".join(parts) + "\n")
    tmp.replace(path)
    return path
