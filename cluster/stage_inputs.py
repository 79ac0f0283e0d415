"""What a stage reads from another run, resolved by the CLI before the stage starts.

The trainer never reads another run's TOML (it must not import ``cluster``): the dalle stage is handed
a concrete dVAE checkpoint URL, and that checkpoint carries its own model config.
"""

from __future__ import annotations

import os
from typing import Any

from cluster.config import ConfigError, load_config


def resolve_stage_inputs(config: Any) -> Any:
    """``config`` with ``dalle.dvae_checkpoint = "auto"`` replaced by the newest checkpoint of the
    ``dalle.dvae_config`` run (configs without a dalle section pass through)."""
    section = getattr(config, "dalle", None)
    if section is None or section.dvae_checkpoint != "auto":
        return config
    from trainer.inference import resolve_checkpoint
    from trainer.stages.dvae import DVAEStageConfig
    from trainer.stages.loop import checkpoint_dir_of

    root = checkpoint_dir_of(load_config(DVAEStageConfig, section.dvae_config))
    root = root if "://" in root else os.path.abspath(root)  # ranks may not start in this directory
    try:
        url = resolve_checkpoint("auto", root)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"dalle.dvae_checkpoint = auto: {exc}; train the dVAE first "
            f"(tessera train dvae --config {section.dvae_config}) or set dalle.dvae_checkpoint"
        ) from exc
    return config.model_copy(update={"dalle": section.model_copy(update={"dvae_checkpoint": url})})
