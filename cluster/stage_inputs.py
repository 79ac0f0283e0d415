"""What a stage reads from another run, resolved by the CLI before the stage starts.

The trainer never reads another run's TOML (it must not import ``cluster``): the dalle stage is handed
a concrete dVAE checkpoint URL, and that checkpoint carries its own model config.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from cluster.config import ConfigError, load_config

# Stage section -> (its checkpoint field, the field naming the upstream run's TOML, that TOML's schema).
UPSTREAM: dict[str, tuple[str, str, str]] = {
    "dalle": ("dvae_checkpoint", "dvae_config", "trainer.stages.dvae:DVAEStageConfig"),
    "diffusion": (
        "autoencoder_checkpoint",
        "autoencoder_config",
        "trainer.stages.autoencoder:AutoencoderStageConfig",
    ),
}


def resolve_stage_inputs(config: Any) -> Any:
    """``config`` with an upstream checkpoint of ``"auto"`` (``dalle.dvae_checkpoint``,
    ``diffusion.autoencoder_checkpoint``) replaced by the newest checkpoint of the run its TOML names
    (configs without such a section pass through)."""
    for name, (checkpoint_field, config_field, schema_path) in UPSTREAM.items():
        section = getattr(config, name, None)
        if section is None or getattr(section, checkpoint_field) != "auto":
            continue
        from trainer.inference import resolve_checkpoint
        from trainer.stages.loop import checkpoint_dir_of

        module, _, schema = schema_path.partition(":")
        upstream_toml = getattr(section, config_field)
        root = checkpoint_dir_of(load_config(getattr(importlib.import_module(module), schema), upstream_toml))
        root = root if "://" in root else os.path.abspath(root)  # ranks may not start in this directory
        try:
            url = resolve_checkpoint("auto", root)
        except FileNotFoundError as exc:
            stage = module.rsplit(".", 1)[-1]
            raise ConfigError(
                f"{name}.{checkpoint_field} = auto: {exc}; train the {stage} stage first "
                f"(tessera train {stage} --config {upstream_toml}) or set {name}.{checkpoint_field}"
            ) from exc
        return config.model_copy(update={name: section.model_copy(update={checkpoint_field: url})})
    return config
