"""Document quality rules (Gopher repetition and quality, C4, FineWeb) and language ID, as FineWeb runs them.

Each rule is a function `text -> (text, detail)`: `detail` names the sub-rule that failed (e.g. `dup_line_frac`),
None when the document passes; C4 also removes lines. `apply_quality` runs the configured rules in FineWeb's
order (language -> gopher_repetition -> gopher_quality -> c4 -> fineweb) and returns the first failing rule as
the drop reason. The rules and defaults are DataTrove's (huggingface/datatrove, datatrove/pipeline/filters/),
re-written here because DataTrove's word and sentence splitting needs NLTK punkt data downloaded at run time;
words and sentences are split with regexes close to NLTK's instead (see `words_of`, `count_sentences`).

`quality_summary` builds the manifest's `quality` section from a Ray Dataset of cleaned rows with Ray Data
aggregations (nothing per document reaches the driver).
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Callable

from raylm.config import C4Rules, FineWebRules, GopherRules, Quality

# ------------------------------------------------------------------------------------------ splitting
# NLTK-like word tokens: words (with inner ' - . joins), an ellipsis, or one symbol (nltk.word_tokenize splits so)
_WORD = re.compile(r"\w+(?:[-'’.]\w+)*|\.\.\.|[^\w\s]")
# sentence ends for counting (punkt splits after . ! ? followed by space or end; abbreviations ignored here)
_SENTENCE_END = re.compile(r"[.!?。！？]+[\"'”’)\]]*(?=\s|$)")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
# datatrove/utils/text.py TERMINAL_PUNCTUATION (the Latin, Indic, Arabic and CJK members)
TERMINAL_PUNCTUATION = tuple("!.?։؝؞؟۔܀܁܂।॥၊။።፧፨᙮᜵᜶។៕៖᠃᠉‼‽⁇⁈⁉⸮⸼。．？！")
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])  # DataTrove gopher_quality_filter.py


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def is_symbol(word: str) -> bool:
    """A token with no letter or digit (DataTrove: every character in PUNCTUATION_SET)."""
    return not any(ch.isalnum() for ch in word)


def count_sentences(line: str) -> int:
    return max(1, len(_SENTENCE_END.findall(line))) if line.strip() else 0


# ------------------------------------------------------------------------------------ Gopher repetition
def _duplicates(items: list[str]) -> tuple[int, int]:
    """(duplicated elements, their characters): every repeat after the first occurrence counts."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    grams = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by repeated word n-grams, skipping past each repeat (DataTrove find_all_duplicate)."""
    seen: set[str] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = "".join(words[i:i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_repetition(text: str, g: GopherRules) -> tuple[str, str | None]:
    """MassiveText table A1 (arXiv:2112.11446); DataTrove GopherRepetitionFilter, gopher_repetition_filter.py."""
    size = len(text)
    paragraphs = _PARAGRAPHS.split(text.strip())
    n, chars = _duplicates(paragraphs)
    if g.dup_para_frac is not None and n / len(paragraphs) > g.dup_para_frac:
        return text, "dup_para_frac"
    if g.dup_para_char_frac is not None and chars / size > g.dup_para_char_frac:
        return text, "dup_para_char_frac"
    lines = _LINES.split(text)
    n, chars = _duplicates(lines)
    if g.dup_line_frac is not None and n / len(lines) > g.dup_line_frac:
        return text, "dup_line_frac"
    if g.dup_line_char_frac is not None and chars / size > g.dup_line_char_frac:
        return text, "dup_line_char_frac"
    words = words_of(text)
    for n_, frac in sorted(g.top_n_grams.items()):
        if _top_ngram_chars(words, n_) / size > frac:
            return text, f"top_{n_}_gram"
    for n_, frac in sorted(g.dup_n_grams.items()):
        if _dup_ngram_chars(words, n_) / size > frac:
            return text, f"duplicated_{n_}_n_grams"
    return text, None


# --------------------------------------------------------------------------------------- Gopher quality
def gopher_quality(text: str, g: GopherRules) -> tuple[str, str | None]:
    """MassiveText quality rules; DataTrove GopherQualityFilter, gopher_quality_filter.py."""
    words = words_of(text)
    if not words:
        return text, "gopher_short_doc"
    real = [w for w in words if not is_symbol(w)]
    if g.min_doc_words is not None and len(real) < g.min_doc_words:
        return text, "gopher_short_doc"
    if g.max_doc_words is not None and len(real) > g.max_doc_words:
        return text, "gopher_long_doc"
    avg = sum(map(len, real)) / len(real) if real else 0.0
    if g.min_avg_word_length is not None and avg < g.min_avg_word_length:
        return text, "gopher_below_avg_threshold"
    if g.max_avg_word_length is not None and avg > g.max_avg_word_length:
        return text, "gopher_above_avg_threshold"
    if g.max_symbol_word_ratio is not None:
        if text.count("#") / len(words) > g.max_symbol_word_ratio:
            return text, "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / len(words) > g.max_symbol_word_ratio:
            return text, "gopher_too_many_ellipsis"
    lines = text.splitlines() or [""]
    if g.max_bullet_lines_ratio is not None and \
            sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > g.max_bullet_lines_ratio:
        return text, "gopher_too_many_bullets"
    if g.max_ellipsis_lines_ratio is not None and \
            sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > g.max_ellipsis_lines_ratio:
        return text, "gopher_too_many_end_ellipsis"
    if g.min_alpha_words_ratio is not None and \
            sum(any(c.isalpha() for c in w) for w in words) / len(words) < g.min_alpha_words_ratio:
        return text, "gopher_below_alpha_threshold"
    if g.min_stop_words is not None and len(STOP_WORDS.intersection(words)) < g.min_stop_words:
        return text, "gopher_enough_stop_words"
    return text, None


# ---------------------------------------------------------------------------------------------------- C4
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def c4(text: str, c: C4Rules) -> tuple[str, str | None]:
    """C4 (arXiv:1910.10683 s2.2) line and page rules; DataTrove C4QualityFilter, c4_filters.py. Removes lines."""
    kept, sentences = [], 0
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if any(len(w) > c.max_word_length for w in words):
            continue
        if c.remove_citations:
            line = _CITATION.sub("", line)
        if c.filter_no_terminal_punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < c.min_words_per_line:
            continue
        low = line.lower()
        if c.filter_lorem_ipsum and "lorem ipsum" in low:
            return text, "lorem_ipsum"
        if c.filter_javascript and "javascript" in low:
            continue
        if c.filter_curly_bracket and "{" in line:
            return text, "curly_bracket"
        if c.filter_policy and any(p in low for p in _POLICY):
            continue
        sentences += count_sentences(line)
        kept.append(line)
    if sentences < c.min_num_sentences:
        return text, "too_few_sentences"
    return "\n".join(kept).strip(), None


# ----------------------------------------------------------------------------------------------- FineWeb
def fineweb(text: str, f: FineWebRules) -> tuple[str, str | None]:
    """FineWeb's rules (arXiv:2406.17557); DataTrove FineWebQualityFilter, fineweb_quality_filter.py."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return text, "empty"
    ratio = sum(ln.endswith(TERMINAL_PUNCTUATION) for ln in lines) / len(lines)
    if ratio < f.line_punct_thr and not (ratio == 0 and f.line_punct_exclude_zero):
        return text, "line_punct_ratio"
    if sum(len(ln) <= f.short_line_length for ln in lines) / len(lines) > f.short_line_thr:
        return text, "short_line_ratio"
    if _duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > f.char_duplicates_ratio:
        return text, "char_dup_ratio"
    if text.count("\n") / max(1, len(words_of(text))) > f.new_line_ratio:
        return text, "list_ratio"
    return text, None


# ------------------------------------------------------------------------------------------ language ID
LANGID_CHARS = 10_000  # the language of a page shows in its first 10k characters; bounds the cost of long pages


@lru_cache(maxsize=1)
def _identifier():
    """py3langid's model (97 languages, shipped inside the wheel), probabilities normalized; once per process."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of `text` (newlines folded, as FineWeb does before fastText)."""
    lang, score = _identifier().classify(text[:LANGID_CHARS].replace("\n", " "))
    return lang, round(float(score), 4)


def language_rule(q: Quality, lang: str, score: float) -> str | None:
    if q.languages is not None and lang not in q.languages:
        return f"not_{'_'.join(q.languages) or 'listed'}"
    if score < q.min_language_score:
        return "low_score"
    return None


# ------------------------------------------------------------------------------------------- the chain
# rule name -> (text, its Quality section) -> (text, detail); `language` is handled in apply_quality
RULES: dict[str, Callable] = {
    "gopher_repetition": lambda text, q: gopher_repetition(text, q.gopher),
    "gopher_quality": lambda text, q: gopher_quality(text, q.gopher),
    "c4": lambda text, q: c4(text, q.c4),
    "fineweb": lambda text, q: fineweb(text, q.fineweb),
}


def apply_quality(text: str, q: Quality) -> tuple[str, str | None, str | None, str | None, float | None]:
    """Run the enabled rules in order: (text, reason = first failing rule, its sub-rule, language, score).
    The language is detected whenever any rule is enabled, so kept and dropped documents are counted per language."""
    if not q.enabled:
        return text, None, None, None, None
    original = text  # a dropped document is kept for review as it entered the rules
    lang, score = detect_language(text)
    if "language" in q.rules:
        detail = language_rule(q, lang, score)
        if detail:
            return original, "language", detail, lang, score
    for name in q.rules:
        if name == "language":
            continue
        text, detail = RULES[name](text, q)
        if detail:
            return original, name, detail, lang, score
    return text, None, None, lang, score


# ------------------------------------------------------------------------------------ manifest section
KEPT = "(kept)"  # reason value standing for "not dropped" in the summary (group keys cannot be null)
EXAMPLE_CHARS = 600  # characters of each example text kept in the manifest


def _pick_key(rule: str, doc_id: str) -> str:
    """Sortable key whose minimum picks one document per rule: a seeded hash (not the first read), then the id."""
    import hashlib

    return hashlib.blake2b(f"{rule}:{doc_id}".encode(), digest_size=8).hexdigest() + doc_id


def _summary_rows(batch, rules: list[str]):
    """Per document: its group (reason, sub-rule, source, language) and example keys; no text."""
    import pyarrow as pa

    reasons = batch["reason"].to_pylist()
    ids = batch["doc_id"].to_pylist()
    out = {
        "reason": [r or KEPT for r in reasons],
        "detail": [d or "" for d in batch["quality_detail"].to_pylist()],
        "source": batch["source"].to_pylist(),
        "language": [lang or "und" for lang in batch["language"].to_pylist()],
        "rejected_key": [_pick_key(r, i) if r in rules else None for r, i in zip(reasons, ids)],
    }
    for rule in rules:  # a kept document is a "kept" example for every rule it passed (all of them)
        out[f"kept_key_{rule}"] = [_pick_key(rule, i) if r is None else None for r, i in zip(reasons, ids)]
    return pa.table({k: pa.array(v, pa.string()) for k, v in out.items()})


def quality_summary(cleaned, q: Quality) -> dict:
    """The manifest's `quality` section from the cleaned Ray Dataset (columns doc_id, source, reason, text,
    language, quality_detail): per rule the documents dropped, their share of the documents checked, per source,
    per language and per sub-rule, one rejected and one kept example; documents per language (kept, dropped).
    Totals per (reason, sub-rule, source, language) group (`group_totals`) plus a filter for the few example
    texts: the driver only sees one row per group."""
    from raylm.data.shuffle import group_totals

    section: dict = {"preset": q.preset, "rules": list(q.rules), "languages_kept": q.languages,
                     "min_language_score": q.min_language_score}
    if not q.enabled:
        return section
    totals = {"n": (None, "count"), "rejected_key": ("rejected_key", "min"),
              **{f"kept_key_{r}": (f"kept_key_{r}", "min") for r in q.rules}}
    groups = (cleaned.select_columns(["doc_id", "source", "reason", "language", "quality_detail"])
              .map_batches(_summary_rows, fn_kwargs={"rules": list(q.rules)}, batch_format="pyarrow"))
    groups = group_totals(groups, ["reason", "detail", "source", "language"], totals)
    checked = [g for g in groups if g["reason"] == KEPT or g["reason"] in q.rules]  # reached the rules
    n_checked = sum(g["n"] for g in checked)

    def tally(rows, key):
        c: Counter = Counter()
        for g in rows:
            c[g[key]] += g["n"]
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    def first(keys):
        keys = [k for k in keys if k]
        return min(keys)[16:] if keys else None  # strip the 16-hex-digit hash: the doc_id

    per_rule, wanted = {}, set()
    for rule in q.rules:
        rows = [g for g in checked if g["reason"] == rule]
        n = sum(g["n"] for g in rows)
        ex_rej, ex_kept = first(g["rejected_key"] for g in rows), first(g[f"kept_key_{rule}"] for g in checked)
        wanted.update(x for x in (ex_rej, ex_kept) if x)
        per_rule[rule] = {"dropped": n, "share": round(n / n_checked, 4) if n_checked else 0.0,
                          "by_detail": tally(rows, "detail"), "by_source": tally(rows, "source"),
                          "by_language": tally(rows, "language"),
                          "example_rejected": ex_rej, "example_kept": ex_kept}
    texts = {}
    if wanted:
        import pyarrow.compute as pc
        import pyarrow as pa

        ids = pa.array(sorted(wanted), pa.string())
        for row in (cleaned.select_columns(["doc_id", "text"])
                    .map_batches(lambda t: t.filter(pc.is_in(t["doc_id"], value_set=ids)), batch_format="pyarrow")
                    .take_all()):
            texts[row["doc_id"]] = (row["text"] or "")[:EXAMPLE_CHARS]
    for stats in per_rule.values():
        for k in ("example_rejected", "example_kept"):
            stats[k] = {"doc_id": stats[k], "text": texts.get(stats[k])} if stats[k] else None
    languages: dict[str, dict[str, int]] = {}
    for g in checked:
        lang = languages.setdefault(g["language"], {"kept": 0, "dropped": 0})
        lang["kept" if g["reason"] == KEPT else "dropped"] += g["n"]
    section.update({"documents_checked": n_checked,
                    "documents_dropped": sum(s["dropped"] for s in per_rule.values()),
                    "per_rule": per_rule,
                    "languages": dict(sorted(languages.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])))})
    return section
