"""``tessera tracking replay``: send what an MLflow outage left in a run folder, and finish those runs.

A run that ended while MLflow was away wrote ``<run dir>/tracking-unsent.jsonl`` (metrics, params,
tags, artifacts, its final status). The next run in the same folder replays it on its own; this
command does it now, e.g. once the server is back.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tracking", help="MLflow tracking tools")
    actions = parser.add_subparsers(dest="tracking_command", required=True, metavar="ACTION")
    replay = actions.add_parser(
        "replay", help="send a run folder's unsent tracking records to MLflow", description=__doc__
    )
    replay.add_argument("--run-dir", required=True, help="the run folder holding tracking-unsent.jsonl")
    replay.add_argument(
        "--tracking-uri", help="MLflow to send to (default: MLFLOW_TRACKING_URI, else ./runs/mlflow.db)"
    )
    replay.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from trainer.tracking import replay_unsent

    result = replay_unsent(args.run_dir, args.tracking_uri)
    print(json.dumps(result, indent=2))
    return 1 if result["left"] else 0
