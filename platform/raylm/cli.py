"""The `raylm` command line: parse, validate the config (exit 2), run one stage function (exit 1 on failure).

The same parser serves `jobs/*.py`, so `ray job submit -- python jobs/train.py -c X` behaves like `raylm train -c X`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from raylm.config import Config, ConfigError, load_config

# verb -> "module:function"; each stage is entered by one function named after its verb
STAGES: dict[str, str] = {
    "prepare": "raylm.data:prepare",
    "train": "raylm.train:train",
    "tune": "raylm.tune:tune",
    "evaluate": "raylm.evaluate:evaluate",
    "serve": "raylm.serve:serve",
    "run": "raylm.run:run",
}
HELP = {
    "validate": "check the config; print the resolved config",
    "prepare": "Ray Data pipeline: read, clean, dedup, tokenize, pack, split, write shards",
    "train": "one Ray Train run with DeepSpeed; exports the final model",
    "tune": "Ray Tune search, each trial a Ray Train run; exports the best model",
    "evaluate": "metrics on the held-out test split",
    "serve": "deploy a model on Ray Serve and serve HTTP until stopped",
    "run": "prepare, tune or train, evaluate, serve, one real request, summary",
    "inspect": "print samples of rejected (--reason R) or kept (--reason kept) documents from data/",
}


class UsageError(Exception):
    """Bad arguments: exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Raw text to a served language model on Ray.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for verb, text in HELP.items():
        p = sub.add_parser(verb, help=text, description=text)
        add_common_args(p, verb)
    return parser


def add_common_args(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("-c", "--config", required=True, help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, YAML-typed); repeatable")
    p.add_argument("--address", default=None, help="Ray cluster address (else RAY_ADDRESS, else a local cluster)")
    if verb in ("evaluate", "serve"):
        p.add_argument("--model", default=None, help="model directory (default: output_dir/model)")
    if verb == "serve":
        p.add_argument("--print-config", action="store_true",
                       help="print the Ray Serve config (serveConfigV2 YAML) for this model and exit")
    if verb == "inspect":
        p.add_argument("--reason", default=None, help="a drop reason from the manifest, or 'kept'; omitted: counts per reason")
        p.add_argument("-n", type=int, default=5, help="samples to print")
        p.add_argument("--chars", type=int, default=1000, help="characters of each sample to print")
    if verb == "run":
        p.add_argument("--no-wait", action="store_true", help="exit after the sample request instead of serving")
    if verb == "train":
        p.add_argument("--force", action="store_true", help="train again even when this config's run already finished")


def stage_kwargs(verb: str, args: argparse.Namespace) -> dict:
    kw = {}
    if getattr(args, "model", None):
        kw["model_dir"] = args.model
    if verb == "run":
        kw["wait"] = not args.no_wait
    if getattr(args, "force", False):
        kw["force"] = True
    return kw


def log_dir() -> str:
    """Where Ray writes this session's logs (for the one-line failure message)."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info = ray._private.worker.global_worker.node  # noqa: SLF001 - the only place Ray exposes it
            return os.path.join(info.get_session_dir_path(), "logs") if info else str(ctx)
    except Exception:  # noqa: BLE001 - best effort for an error message
        pass
    return "/tmp/ray/session_latest/logs"


def main(argv: list[str] | None = None, verb: str | None = None) -> int:
    """Entry point for `raylm` and for `jobs/<verb>.py` (which pass their verb)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if verb is not None:
        argv = [verb, *argv]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 on --help
        return int(e.code or 0)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.verb == "validate":
        print(cfg.to_yaml(), end="")
        return 0
    if args.verb == "inspect":  # reads data/ with pyarrow; no Ray
        from raylm.data.review import inspect_data

        return inspect_data(cfg, reason=args.reason, n=args.n, chars=args.chars)
    if args.verb == "serve" and args.print_config:
        from raylm.serve import serve_config

        print(serve_config(cfg, model_dir=args.model), end="")
        return 0
    return run_stage(args.verb, cfg, address=args.address, **stage_kwargs(args.verb, args))


def run_stage(verb: str, cfg: Config, address: str | None = None, **kwargs) -> int:
    module, _, func = STAGES[verb].partition(":")
    try:
        stage = getattr(importlib.import_module(module), func)
    except ImportError as e:
        print(missing_dependency(verb, e), file=sys.stderr)
        return 1
    from raylm.runtime import ensure_ray

    try:
        # a stage's `preflight(cfg)` checks config against data/ before any Ray work (exit 2 on a ConfigError)
        getattr(importlib.import_module(module), "preflight", lambda cfg: None)(cfg)
        ensure_ray(address)
        stage(cfg, **kwargs)
    except ImportError as e:  # a lazy import inside the stage, e.g. on a worker's or the job's python
        print(missing_dependency(verb, e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"raylm {verb}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:  # a config problem only visible with the data at hand (e.g. vocab mismatch)
        print(str(e), file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback to the log file
        logs = log_dir()
        trace = cfg.path("logs", f"{verb}-error.log")  # local (this node's mirror when output_dir is a URI)
        try:
            trace.parent.mkdir(parents=True, exist_ok=True)
            trace.write_text(traceback.format_exc())
        except OSError:
            trace = Path("(unwritable)")
        print(f"raylm {verb} failed: {type(e).__name__}: {first_line(e)}\n"
              f"  traceback: {trace}\n  ray logs: {logs}", file=sys.stderr)
        return 1
    return 0


# import name -> what to pip install, where the two differ
PIP_NAMES: dict[str, str] = {"yaml": "pyyaml", "sklearn": "scikit-learn", "ray": "ray[data,train,tune,serve]",
                             "PIL": "pillow", "google": "protobuf"}


def missing_dependency(verb: str, e: ImportError) -> str:
    """One line naming the module this python lacks and how to install it."""
    name = (e.name or str(e)).split(".")[0]
    return (f"raylm {verb}: missing dependency: {e} (python: {sys.executable})\n"
            f"  install it into that environment: pip install '{PIP_NAMES.get(name, name)}' "
            f"(or the whole stack: pip install -e . from the raylm checkout)")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else repr(e)


if __name__ == "__main__":
    sys.exit(main())
