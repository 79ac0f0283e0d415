"""``tessera export``: a checkpoint -> one safetensors file plus its model config JSON, no DeepSpeed needed.

The weights are the fp32 master copy where the optimizer kept one (ZeRO-1/2/3, bf16 runs), MoE experts
included; ``--dtype bf16`` rounds that copy once. Load with ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint's model as one safetensors file (+ config JSON), loadable without DeepSpeed",
        description=__doc__,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint URL (a step-* folder)")
    parser.add_argument("--out", required=True, help="FILE.safetensors (local or s3://); FILE.json beside it")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from trainer.checkpoint import export_model

    print(json.dumps(export_model(args.checkpoint, args.out, args.dtype), indent=2))
    return 0
