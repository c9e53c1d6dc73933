"""The embedded `python-docs` corpus: the running interpreter's standard-library docstrings, one document per module.

Built at run time with `inspect` (no download): a module's docstring, then every public class (with its public
methods) and function, each as its signature and docstring. Reprs that vary between processes (object addresses,
a worker's redirected stdout) are blanked. What a module's docs say can depend on what the process imported
before (a Ray worker's import history), so the corpus is rendered once per Python version in a clean subprocess
(`python -S -s pydocs.py OUT`, fixed hash seed, stdlib only, modules in sorted order) and cached as JSONL.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import subprocess
import importlib.util
import inspect
import io
import re
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

# modules with side effects at import (a browser, printing), platform-only ones, and the test suite
SKIP = {
    "antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter", "test", "ensurepip", "pydoc_data",
    "msvcrt", "winreg", "winsound", "nt", "lib2to3", "xxlimited", "xxsubtype", "sre_compile", "sre_constants",
    "sre_parse", "asyncio.__main__", "idlelib", "venv", "pip",
    # their rendered docs vary with the process's import order and hash seed: prepare must be reproducible
    "inspect", "cgi",
}
_VOLATILE = re.compile(r"<[^<>]*>")  # object reprs in default values: addresses, file names of this process


def module_names() -> list[str]:
    """Public standard-library modules of this interpreter, in a fixed order."""
    import pkgutil

    names = set()
    for top in sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in SKIP):
        names.add(top)
        spec = importlib.util.find_spec(top) if top not in sys.builtin_module_names else None
        if spec is None or not spec.submodule_search_locations:
            continue
        # a package's submodules are documents of their own, found on disk without importing them
        for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=top + ".", onerror=lambda _: None):
            leaves = info.name.split(".")[1:]
            if not any(p.startswith("_") or "test" in p or p in SKIP for p in leaves) and info.name not in SKIP:
                names.add(info.name)
    return sorted(names)


def _signature(obj) -> str:
    try:
        return _VOLATILE.sub("...", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return _VOLATILE.sub(lambda m: "..." if " at 0x" in m.group(0) else m.group(0), doc)


def module_document(name: str) -> str | None:
    """One module's documentation as plain text; None when it cannot be imported here."""
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - platform-specific or broken modules are skipped, not fatal
        return None
    parts = [f"Module {name}", _doc(mod)]
    public = getattr(mod, "__all__", None)
    # public names first, then documented private helpers defined here (real text, same interpreter every run)
    own = sorted(n for n in vars(mod) if not n.startswith("__"))
    names = (sorted(public) + [n for n in own if n not in public]) if isinstance(public, (list, tuple)) else own
    for attr in names:
        obj = getattr(mod, attr, None)
        if obj is None or getattr(obj, "__module__", name) not in (name, None) and attr not in (public or ()):
            continue  # re-exported from elsewhere: documented with its own module
        if inspect.isclass(obj):
            parts.append(f"class {attr}{_signature(obj)}\n{_doc(obj)}".rstrip())
            for meth_name, meth in sorted(vars(obj).items()):
                if meth_name.startswith("__") and meth_name not in ("__init__", "__call__") or not (
                        callable(meth) or isinstance(meth, property)):
                    continue
                doc = _doc(meth)
                if doc:
                    parts.append(f"{attr}.{meth_name}{_signature(meth)}\n{doc}")
        elif inspect.isroutine(obj):
            parts.append(f"def {attr}{_signature(obj)}\n{_doc(obj)}".rstrip())
    return "\n\n".join(p for p in parts if p.strip())


def render(out: str) -> None:
    """Every module's document, in sorted order, as JSONL lines {"module", "text"} (run in a clean process)."""
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for name in module_names():
            text = module_document(name)
            if text is not None:  # not importable on this platform: not part of the corpus
                f.write(json.dumps({"module": name, "text": text}) + "\n")
    os.replace(tmp, out)


def cache_path() -> Path:
    """Keyed by the interpreter and this file: another Python or another renderer renders anew."""
    root = Path(os.environ.get("RAYLM_CACHE_DIR") or Path.home() / ".cache" / "raylm")
    key = hashlib.sha256(Path(__file__).read_bytes() + sys.version.encode()).hexdigest()[:12]
    return root / f"python-docs-{platform.python_version()}-{key}.jsonl"


def corpus():
    """The corpus as an Arrow table (module, text), rendered on first use."""
    import pyarrow as pa

    path = cache_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "HOME": os.environ.get("HOME", "/")}
        subprocess.run([sys.executable, "-S", "-s", "-B", __file__, str(path)], check=True, env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pa.table({"module": [r["module"] for r in rows], "text": [r["text"] for r in rows]})


if __name__ == "__main__":
    render(sys.argv[1])
