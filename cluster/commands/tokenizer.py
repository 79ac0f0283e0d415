"""``tessera tokenizer train``: a byte-level BPE on a dataset's captions, saved beside its manifest."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cluster.cli import add_common_args
from cluster.config import apply_overrides, read_toml, validate
from data_pipeline.prep_config import DataPrepConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="caption tokenizer tools")
    actions = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a byte-level BPE on every caption of a manifest")
    add_common_args(train, default_run_dir="runs/tokenizer")
    train.add_argument("--manifest", required=True, help="manifest.json URL or the dataset folder")
    train.add_argument("--vocab-size", type=int, help="vocabulary size including special tokens")
    train.add_argument("--out", help="where to write tokenizer.json (default: beside the manifest)")
    train.set_defaults(func=main)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer

    data: dict[str, Any] = read_toml(args.config) if args.config else {}
    if args.vocab_size is not None:
        data.setdefault("tokenizer", {})["vocab_size"] = args.vocab_size
    apply_overrides(data, args.overrides)
    config = validate(DataPrepConfig, data, (args.config or "<defaults>") + " + command-line flags").tokenizer
    url = train_tokenizer(
        args.manifest, vocab_size=config.vocab_size, min_frequency=config.min_frequency, out_url=args.out
    )
    return {"tokenizer": url, "vocab_size": load_tokenizer(url).vocab_size}


def main(args: argparse.Namespace) -> int:
    print(json.dumps(run(args), indent=2))
    return 0
