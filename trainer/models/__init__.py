"""Model registry: ``build(config)`` for any model config, on any device (``meta`` to size it for free).

A config selects its builder by its ``kind`` field (or, without one, its class name); adding a
model is one line in ``BUILDERS``: ``"key": "module:callable"`` taking the config.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

BUILDERS: dict[str, str] = {
    "dvae": "trainer.models.dvae:DVAE",
    "dalle": "trainer.models.dalle:DalleTransformer",
    "kl_autoencoder": "trainer.models.autoencoder:KLAutoencoder",
    "unet": "trainer.models.unet:UNet",
    "dit": "trainer.models.dit:DiT",
}


def build(config: Any, device: str | torch.device = "meta") -> nn.Module:
    """The model for ``config``, with parameters allocated on ``device`` (not initialised on ``meta``)."""
    key = getattr(config, "kind", type(config).__name__)
    if key not in BUILDERS:
        raise ValueError(f"no model registered for {key!r}; known: {sorted(BUILDERS)}")
    module, _, name = BUILDERS[key].partition(":")
    builder = getattr(importlib.import_module(module), name)
    with torch.device(device):
        return builder(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
