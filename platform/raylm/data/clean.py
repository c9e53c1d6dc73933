"""Cleaning one document at a time: HTML to text, unicode repair and normalization, control characters and
whitespace, PII scrub, length bounds. `clean_batch` runs it over a Ray Data batch and records why a document
was dropped (`reason`) instead of raising, so the manifest can count every drop."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata

import ftfy
import pyarrow as pa
from selectolax.lexbor import LexborHTMLParser

from raylm.config import Clean, Quality
from raylm.data.quality import apply_quality

# ---------------------------------------------------------------------------------------------- HTML
DROP_TAGS = ["script", "style", "nav", "noscript", "template", "iframe", "svg", "header", "footer", "aside",
             "form", "button", "select", "head"]
BLOCK_TAGS = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
              "dl", "dt", "dd", "pre", "blockquote", "table", "tr", "figure", "figcaption", "hr", "body",
              "address", "details", "summary"}
_LOOKS_HTML = re.compile(r"<(?:!doctype|html|body|div|p|br|script|style|span|a\s)[\s>/]", re.IGNORECASE)


def looks_like_html(text: str) -> bool:
    return bool(_LOOKS_HTML.search(text[:10_000]))


def html_to_text(html: str) -> str:
    """Visible text of an HTML document, one paragraph per block element (a real parser: lexbor)."""
    tree = LexborHTMLParser(html)
    tree.strip_tags(DROP_TAGS)
    root = tree.body or tree.root
    if root is None:
        return ""
    out: list[str] = []
    # explicit stack (deeply nested pages would overflow recursion); "\n\n" markers around block elements
    stack: list = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            out.append(node)
            continue
        tag = node.tag
        if tag == "-text":
            out.append(node.text(deep=False) or "")
        elif tag == "br":
            out.append("\n")
        elif tag in ("-comment", "!doctype"):
            continue
        else:
            block = tag in BLOCK_TAGS
            children = list(node.iter(include_text=True))
            if block:
                stack.append("\n\n")
            stack.extend(reversed(children))
            if block:
                stack.append("\n\n")
    return "".join(out)


def trafilatura_main_text(html: str) -> str:
    """Main content only (navigation, boilerplate, footers removed) with trafilatura; "" when none is found."""
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=True, favor_recall=True,
                               deduplicate=False) or ""


# data.clean.html_extractor -> HTML-to-text function
HTML_EXTRACTORS = {"selectolax": html_to_text, "trafilatura": trafilatura_main_text}


# ------------------------------------------------------------------------------------- whitespace etc.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING = re.compile(r" *\n *")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Drop control/format characters, collapse space runs, keep paragraph breaks (at most one blank line)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


# --------------------------------------------------------------------------------------------- PII
def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"\D", "", m.group(0))
    return "<CREDIT_CARD>" if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


def _iban(m: re.Match) -> str | None:
    from stdnum import iban  # ISO 13616 country formats and the mod-97 check

    return "<IBAN>" if iban.is_valid(m.group(0)) else None


def _ipv6(m: re.Match) -> str | None:
    text = m.group(0)
    if sum(1 for part in text.split(":") if part) < 2:
        return None  # "::" or "a::" in prose is not an address worth scrubbing
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return "<IPV6>"


# (type, pattern, replacement: a placeholder or a function returning one, or None to keep the match);
# order matters: keys, emails and IBANs (checksummed) before numbers, cards (Luhn-checked) before phones; a phone never sits inside
# a longer digit group, so a card number failing Luhn is kept whole
PII_RULES: list[tuple[str, re.Pattern, object]] = [
    ("API_KEY", re.compile(r"\b(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|"
                           r"xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20})\b"), "<API_KEY>"),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), "<EMAIL>"),
    ("IBAN", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"), _iban),
    ("IPV6", re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){1,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,7}|[0-9A-Fa-f]{1,4})(?![\w:])"), _ipv6),
    ("IPV4", re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"), "<IPV4>"),
    ("CREDIT_CARD", re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), _card),
    ("PHONE", re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![ .-]?\d)(?!\w)"), "<PHONE>"),
]
PII_TYPES = [name for name, _, _ in PII_RULES]


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace PII by typed placeholders such as `<EMAIL>`; returns the text and counts per type."""
    counts = dict.fromkeys(PII_TYPES, 0)
    for name, pattern, repl in PII_RULES:
        def sub(m: re.Match, name=name, repl=repl) -> str:
            out = repl(m) if callable(repl) else repl
            if out is None:
                return m.group(0)
            counts[name] += 1
            return out
        text = pattern.sub(sub, text)
    return text, counts


# ------------------------------------------------------------------------------------------ the step
def clean_text(text: str, cfg: Clean, is_html: bool = False) -> tuple[str | None, str | None, dict[str, int]]:
    """One document through every enabled step but the quality rules: (text, drop reason or None, PII counts)."""
    pii = dict.fromkeys(PII_TYPES, 0)
    html = cfg.strip_html and (is_html or looks_like_html(text))
    # far beyond max_chars: no step below shrinks plain text tenfold, so skip the expensive ones
    if not html and len(text) > 10 * cfg.max_chars:
        return None, "too_long", pii
    if html:
        text = HTML_EXTRACTORS[cfg.html_extractor](text)
    if cfg.fix_unicode:
        text = ftfy.fix_text(text, normalization=None)
    if cfg.normalize:
        text = unicodedata.normalize(cfg.normalize, text)
    text = normalize_whitespace(text)
    if cfg.scrub_pii:
        text, pii = scrub_pii(text)
    if not text:
        return None, "empty", pii
    if len(text) < cfg.min_chars:
        return None, "too_short", pii
    if len(text) > cfg.max_chars:
        return None, "too_long", pii
    return text, None, pii


def exact_key(text: str) -> str:
    """Hash of the text up to case and whitespace: equal keys are exact duplicates."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).hexdigest()


# columns clean_batch adds for the quality rules (null when the rules are off or the document was dropped before)
QUALITY_COLUMNS = {"language": pa.string(), "language_score": pa.float32(), "quality_detail": pa.string()}


def clean_batch(batch: pa.Table, cfg: Clean, quality: Quality | None = None) -> pa.Table:
    """Ray Data map_batches: clean `text`, run the quality rules, set `reason` for drops (the first step or rule
    that failed), add `exact_key`, `pii_<TYPE>` counts and `language`, `language_score`, `quality_detail`.
    A document dropped by a quality rule keeps its text (for data/rejected/); one dropped earlier has none."""
    quality = quality or Quality()
    texts, reasons, keys = [], [], []
    extra: dict[str, list] = {c: [] for c in QUALITY_COLUMNS}
    pii_cols: dict[str, list[int]] = {t: [] for t in PII_TYPES}
    for text, reason, fmt in zip(batch["text"].to_pylist(), batch["reason"].to_pylist(), batch["format"].to_pylist()):
        pii = dict.fromkeys(PII_TYPES, 0)
        detail = lang = score = None
        if reason is None:
            text, reason, pii = clean_text(text, cfg, is_html=fmt == "html")
            if reason is None:
                text, reason, detail, lang, score = apply_quality(text, quality)
        else:
            text = None
        texts.append(text)
        reasons.append(reason)
        keys.append(exact_key(text) if text is not None and reason is None else None)
        for c, v in zip(QUALITY_COLUMNS, (lang, score, detail)):
            extra[c].append(v)
        for t in PII_TYPES:
            pii_cols[t].append(pii[t])
    out = batch.drop_columns(["text", "reason"])
    out = out.append_column("text", pa.array(texts, pa.string())).append_column("reason", pa.array(reasons, pa.string()))
    out = out.append_column("exact_key", pa.array(keys, pa.string()))
    for c, typ in QUALITY_COLUMNS.items():
        out = out.append_column(c, pa.array(extra[c], typ))
    for t in PII_TYPES:
        out = out.append_column(f"pii_{t}", pa.array(pii_cols[t], pa.int64()))
    return out
