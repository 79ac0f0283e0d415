"""``tessera import openai-dvae``: openai's released DALL-E dVAE -> a Tessera dVAE checkpoint.

Reads ``encoder.pkl`` and ``decoder.pkl`` (whole ``dall_e`` modules pickled by ``torch.save``) from
local files you name; nothing is downloaded, and no URL is accepted. They are read with
``torch.load(weights_only=True)``, the ``dall_e`` classes allowlisted to stand-ins that run no code.
A legacy-format file is refused unless ``--trust-pickle`` says to unpickle it in full (arbitrary code:
only for a file you trust, e.g. openai's own, with ``pip install --no-deps DALL-E``). The checkpoint
lands at ``OUT/step-000000000``: name ``OUT`` as ``dalle.dvae_checkpoint`` (or an eval's dVAE).
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="convert another project's released weights")
    actions = parser.add_subparsers(dest="import_command", required=True, metavar="WHAT")
    dvae = actions.add_parser(
        "openai-dvae",
        help="openai's DALL-E dVAE (encoder.pkl, decoder.pkl) -> a Tessera dVAE checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dvae.add_argument("--encoder", required=True, help="local path of openai's encoder.pkl")
    dvae.add_argument("--decoder", required=True, help="local path of openai's decoder.pkl")
    dvae.add_argument("--out", required=True, help="checkpoint folder (local or s3://)")
    dvae.add_argument(
        "--image-size", type=int, default=256, help="model.image_size to record (the weights are conv-only)"
    )
    dvae.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle the files in full (runs code from them): only for local files you trust",
    )
    dvae.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from trainer.models.openai_dvae_import import import_openai_dvae

    try:
        files = (args.encoder, args.decoder, args.out)
        result = import_openai_dvae(*files, image_size=args.image_size, trust_pickle=args.trust_pickle)
    except ValueError as exc:
        print(f"tessera import openai-dvae: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
