"""Process settings the CLI makes before torch, DeepSpeed or Ray load, and the one-time op build.

DeepSpeed on CPU JIT-compiles its shared-memory comm op (``deepspeed_shm_comm``) at every
``deepspeed.init_distributed``, a single process included, into ``TORCH_EXTENSIONS_DIR``: 30-50 s once,
minutes on a busy box, silently. ``make install`` builds it here (``python -m cluster.environment``)
with a message, and every ``tessera`` command defaults to the same folder, so it is built once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# The Makefile exports the same folder (tests/test_cli.py keeps the two in step).
EXTENSIONS_DIR = Path.home() / ".cache" / "tessera-torch-extensions"
# Ray reads these when it is imported: advertise loopback for a local cluster and let `ray job submit`
# work without a token on a developer box. A real cluster's own settings win.
RAY_DEFAULTS = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def configure() -> None:
    """Defaults only: anything already in the environment (a launcher's, the user's) wins."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    for name, value in RAY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def build_comm_op() -> str:
    """Compile (or load, when cached) DeepSpeed's comm op for this machine; returns what happened."""
    configure()
    from deepspeed.accelerator import get_accelerator

    from trainer.engine import comm_op_built

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return f"DeepSpeed on {get_accelerator().device_name()} needs no shared-memory comm op"
    if not comm_op_built():
        print(
            f"Building DeepSpeed's CPU comm op once into {os.environ['TORCH_EXTENSIONS_DIR']} "
            "(about a minute on 2 idle cores; later runs load it)...",
            flush=True,
        )
    start = time.monotonic()
    builder.load(verbose=False)
    return f"DeepSpeed's CPU comm op is ready ({time.monotonic() - start:.0f} s)"


if __name__ == "__main__":
    print(build_comm_op())
