"""``tessera``: one CLI for every stage; each sub-command lives in ``cluster/commands/<name>.py``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from cluster import environment
from cluster.config import ConfigError

# Sub-command modules, each exposing ``register(subparsers)``; imported lazily so ``tessera --help``
# stays fast and a command's heavy imports (torch, ray, deepspeed) load only when it runs.
COMMAND_MODULES = (
    "cluster.commands.ingest",
    "cluster.commands.tokenizer",
    "cluster.commands.train",
    "cluster.commands.sample",
    "cluster.commands.export",
    "cluster.commands.importer",
    "cluster.commands.plan",
    "cluster.commands.demo",
    "cluster.commands.tracking",
    "cluster.commands.verify",
    "cluster.commands.rlhf",
    "cluster.commands.eval",
    "cluster.commands.pipeline",
    "cluster.commands.submit",
    "cluster.commands.inspect",
)


def add_common_args(parser: argparse.ArgumentParser, default_run_dir: str | None = None) -> None:
    """Flags every command shares: a TOML config, overrides, a run folder and the Ray cluster."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config field, e.g. --set engine.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--run-dir",
        default=default_run_dir or f"runs/{parser.prog.split()[-1]}",
        help="where logs, the embedded MLflow store and local checkpoints go",
    )
    parser.add_argument(
        "--ray-address",
        default="local",
        help='Ray cluster: "local" starts one in-process; "auto" or ray://head:10001 joins one',
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera", description="Distributed training of text-to-image models on Ray + DeepSpeed."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of a path, storage or config error"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


# Errors a user fixes by changing a path, a URL, a permission or a config field: one line, exit 2.
# (module, class) pairs are looked up only if that module was imported: nothing heavy loads here.
USER_ERRORS = (
    ("data_pipeline.manifest", "ManifestError"),
    ("trainer.checkpoint", "CheckpointError"),
    ("botocore.exceptions", "BotoCoreError"),
    ("aiohttp", "ClientError"),
)


def is_user_error(exc: BaseException) -> bool:
    """A missing or unwritable path, an unreachable object store, a bad manifest or checkpoint."""
    types = [OSError]
    for module, name in USER_ERRORS:
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return isinstance(exc, tuple(types))


def main(argv: list[str] | None = None) -> int:
    environment.configure()  # before any command imports torch, DeepSpeed or Ray
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"tessera: config error:\n{exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if args.debug:
            traceback.print_exc()
        # str(exc) of a retried storage call lacks the note saying how long it was retried: add it.
        detail = "; ".join([str(exc) or type(exc).__name__, *getattr(exc, "__notes__", [])]).replace(
            "\n", " "
        )
        print(
            f"tessera: {type(exc).__name__}: {detail}" + ("" if args.debug else " (--debug: traceback)"),
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
