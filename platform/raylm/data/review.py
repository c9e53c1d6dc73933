"""`raylm inspect`: print samples of what `prepare` threw away (data/rejected/, by reason) or kept (train shards).

Reads only files under `output_dir/data/` with pyarrow (no Ray): `rejected/*.parquet` (doc_id, source, reason,
text, language...) for rejects, the manifest for counts, and for kept documents the first train blocks decoded
with the saved tokenizer (kept text lives only as tokens).
"""

from __future__ import annotations

import sys

from raylm import storage
from raylm.config import Config

KEPT = "kept"


def _dataset(uri: str):
    """A pyarrow dataset of the Parquet files under `uri` (local or in the store), or None when there is none."""
    import pyarrow.dataset as pds

    if not storage.exists(uri):
        return None
    fs, path = storage.resolve(uri)
    return pds.dataset(path, filesystem=fs, format="parquet")


def _print_sample(out, header: str, text: str | None, chars: int) -> None:
    text = text or "(no text: dropped before its text was cleaned)"
    more = f"\n... [{len(text) - chars:,} more characters]" if len(text) > chars else ""
    print(f"--- {header}\n{text[:chars]}{more}\n", file=out)


def inspect_data(cfg: Config, reason: str | None = None, n: int = 5, chars: int = 1000, out=None) -> int:
    """Print up to `n` samples of documents rejected with `reason` (or kept ones for `kept`); without a reason,
    the drop counts per reason. Returns the exit code: 1 when there is no prepared data or no such reason."""
    out = out or sys.stdout
    data_dir = cfg.uri("data")  # shards and rejected/ are read where prepare wrote them (a store: in place)
    if not storage.exists(storage.join(data_dir, "manifest.json")):
        print(f"raylm inspect: no prepared data at {data_dir} (run raylm prepare -c CFG first)", file=sys.stderr)
        return 1
    manifest = storage.read_json(storage.join(data_dir, "manifest.json"))
    rejected = _dataset(storage.join(data_dir, "rejected"))
    counts = dict(manifest.get("dropped") or {})
    for kind, k in (manifest.get("duplicates") or {}).items():
        if k:
            counts[f"duplicate_{kind}"] = k
    if reason is None:
        print(f"{manifest.get('documents_read', 0):,} documents read, {manifest.get('documents_kept', 0):,} kept; "
              f"rejected by reason (raylm inspect -c CFG --reason R -n N):", file=out)
        for r, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {r:<28} {k:>8,}", file=out)
        return 0
    if reason == KEPT:
        return _print_kept(cfg, manifest, n, chars, out)
    if rejected is None:
        print(f"raylm inspect: {storage.join(data_dir, 'rejected')} does not exist (prepared by an older raylm?)", file=sys.stderr)
        return 1
    import pyarrow.dataset as pds

    table = rejected.head(n, filter=pds.field("reason") == reason)
    if table.num_rows == 0:
        known = ", ".join(sorted(counts)) or "none"
        print(f"raylm inspect: no rejected documents with reason {reason!r} (reasons: {known}; or 'kept')",
              file=sys.stderr)
        return 1
    total = rejected.count_rows(filter=pds.field("reason") == reason)
    print(f"{total:,} documents rejected as {reason}; {table.num_rows} shown", file=out)
    cols = set(table.column_names)
    rows = table.to_pylist()
    for row in rows:
        extra = [f"{c}={row[c]}" for c in ("quality_detail", "language", "language_score") if c in cols and row.get(c) is not None]
        _print_sample(out, "  ".join([str(row.get("doc_id")), str(row.get("source")), reason, *extra]), row.get("text"), chars)
    return 0


def _print_kept(cfg: Config, manifest: dict, n: int, chars: int, out) -> int:
    """Kept documents as the model sees them: the first `n` rows of the train shards, decoded."""
    from transformers import AutoTokenizer

    from raylm.train.models import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(cfg)))
    rows = _dataset(cfg.uri("data", "train")).head(n, columns=["input_ids"]).to_pylist()
    print(f"{manifest.get('documents_kept', 0):,} documents kept; "
          f"first {len(rows)} train rows decoded", file=out)
    for i, row in enumerate(rows):
        _print_sample(out, f"train row {i}", tok.decode(row["input_ids"]), chars)
    return 0
