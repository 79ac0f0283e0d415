"""``tessera pipeline``: a preset's stages as a graph on Ray, skipping the ones already finished.

``--dry-run`` prints the plan (what runs, what is skipped, and why) without running anything.
"""

from __future__ import annotations

import argparse
import json

from cluster.cli import add_common_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline", help="run a preset's stage graph on Ray (skips finished stages)", description=__doc__
    )
    add_common_args(parser, default_run_dir="runs/pipeline")
    parser.add_argument("--preset", default="demo", help="configs/pipeline/<preset>.toml, or a TOML path")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run just these stages")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="rerun STAGE and everything after it")
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a preset variable (e.g. store=...)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.set_defaults(func=main)


def parse_vars(pairs: list[str]) -> dict[str, str]:
    bad = [pair for pair in pairs if "=" not in pair]
    if bad:
        raise SystemExit(f"tessera pipeline: --var expects NAME=VALUE, got {bad}")
    return dict(pair.split("=", 1) for pair in pairs)


def main(args: argparse.Namespace) -> int:
    import ray

    from cluster.pipeline import format_plan, load_preset, plan, run
    from cluster.runtime import init_ray

    spec = load_preset(args.preset)
    variables = parse_vars(args.var)
    if args.dry_run:
        print(format_plan(plan(spec, variables, only=args.only, start=args.start)))
        return 0
    init_ray(args.ray_address)
    # Stage commands join this cluster: a local one by its exact address, never "auto".
    address = ray.get_runtime_context().gcs_address if args.ray_address == "local" else args.ray_address
    summary = run(spec, variables, args.run_dir, ray_address=address, only=args.only, start=args.start)
    print(json.dumps(summary, indent=2))
    return 0
