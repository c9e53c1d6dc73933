"""The benchmark corpus: real text from Debian documentation packages, cached under bench/.cache/corpus/.

    python bench/corpus.py            # build (once): ~1.1 GB of HTML -> ~220 MB of text, ~55 K documents
    python bench/corpus.py --info     # what is cached

Packages (Debian bookworm, `apt-get download` + `dpkg-deb -x` into /tmp; nothing is committed or redistributed):
python3.11-doc (PSF license), postgresql-doc-15 (PostgreSQL license), rust-doc (MIT / Apache-2.0),
openjdk-17-doc (GPL-2 with the Classpath exception), linux-doc-6.1 (GPL-2), python-django-doc (BSD-3-Clause),
libboost1.81-doc (Boost Software License 1.0), cmake-doc (BSD-3-Clause), git-doc (GPL-2). One HTML page = one document; its text is extracted with
lxml (script/style/nav dropped). API docs are full of near-identical pages, which is what dedup is for.

`docs(mb)` reads the first `mb` MB of text (a fixed order: package, then path) as a pyarrow Table
(doc_id, text); `slice_dir(mb)` writes the same slice as a JSONL directory for `raylm prepare`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE  # noqa: E402

PACKAGES = ["python3.11-doc", "postgresql-doc-15", "rust-doc", "openjdk-17-doc", "linux-doc-6.1", "python-django-doc",
            "libboost1.81-doc", "cmake-doc", "git-doc"]
DEBS = Path("/tmp/raylm-bench-debs")
CORPUS = CACHE / "corpus"
ROWS_PER_FILE = 4000


def extract(path: str) -> str:
    import lxml.html

    try:
        doc = lxml.html.fromstring(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - an unparsable page is left out
        return ""
    for bad in doc.xpath("//script|//style|//nav"):
        bad.drop_tree()
    return " ".join(doc.text_content().split())


def build() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    DEBS.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(DEBS.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=DEBS, check=True)
    tree = DEBS / "x"
    tree.mkdir(exist_ok=True)
    for pkg in PACKAGES:
        if not (tree / pkg).exists():
            deb = sorted(DEBS.glob(f"{pkg}_*.deb"))[-1]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree / f"{pkg}.tmp")], check=True)
            (tree / f"{pkg}.tmp").rename(tree / pkg)
    pages = sorted(str(p) for pkg in PACKAGES for p in (tree / pkg).rglob("*.html"))
    print(f"extracting text from {len(pages):,} HTML pages", flush=True)
    tmp = CORPUS.with_name("corpus.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    start, total, part = time.time(), 0, 0
    with Pool(2) as pool:
        for i in range(0, len(pages), ROWS_PER_FILE):
            chunk = pages[i:i + ROWS_PER_FILE]
            texts = pool.map(extract, chunk, chunksize=64)
            keep = [(str(Path(p).relative_to(tree)), t) for p, t in zip(chunk, texts) if len(t) >= 50]
            total += sum(len(t.encode()) for _, t in keep)
            pq.write_table(pa.table({"doc_id": [k for k, _ in keep], "text": [t for _, t in keep]}),
                           tmp / f"part-{part:05d}.parquet")
            part += 1
            print(f"  {i + len(chunk):,}/{len(pages):,} pages, {total / 1e6:.0f} MB text, {time.time() - start:.0f}s",
                  flush=True)
    if CORPUS.exists():
        subprocess.run(["rm", "-rf", str(CORPUS)], check=True)
    tmp.rename(CORPUS)


def ensure() -> Path:
    if not CORPUS.exists():
        build()
    return CORPUS


def docs(mb: float | None = None):
    """The first `mb` MB of the corpus text (all of it with None) as a pyarrow Table (doc_id, text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, size = [], 0
    for f in sorted(ensure().glob("part-*.parquet")):
        t = pq.read_table(f)
        lens = [len(s.encode()) for s in t["text"].to_pylist()]
        if mb is not None:
            keep = 0
            while keep < len(lens) and size < mb * 1e6:
                size += lens[keep]
                keep += 1
            t = t.slice(0, keep)
        else:
            size += sum(lens)
        tables.append(t)
        if mb is not None and size >= mb * 1e6:
            break
    table = pa.concat_tables(tables)
    if mb is not None and size < mb * 1e6 * 0.99:
        raise SystemExit(f"corpus has only {size / 1e6:.0f} MB of text, {mb} MB asked")
    return table


def slice_dir(mb: float) -> Path:
    """The first `mb` MB as a JSONL directory (cached), for a `raylm prepare` source (`format: jsonl`)."""
    import json

    out = CACHE / "slices" / f"{mb:g}MB-jsonl"
    if not (out / "done").exists():
        out.mkdir(parents=True, exist_ok=True)
        t = docs(mb)
        step = 2000
        for i in range(0, t.num_rows, step):
            with open(out / f"part-{i // step:05d}.jsonl", "w") as f:
                for doc_id, text in zip(t["doc_id"][i:i + step].to_pylist(), t["text"][i:i + step].to_pylist()):
                    f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        (out / "done").write_text(str(t.num_rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--info", action="store_true")
    args = ap.parse_args()
    if not args.info:
        ensure()
    t = docs()
    size = sum(len(s.encode()) for s in t["text"].to_pylist())
    print(f"corpus {CORPUS}: {t.num_rows:,} documents, {size / 1e6:.0f} MB of text")


if __name__ == "__main__":
    main()
