"""An exponential moving average of a network's weights that lives inside the trained module.

Why a submodule of buffers rather than a separate object or file: the EMA then travels with the
model weights through everything that already handles them. DeepSpeed saves and restores module
buffers with the model states, so a resumed run gets its EMA back (diffusers bug #1895 was an EMA left
out of the resume path); it broadcasts buffers from rank 0 at start, and under ZeRO 0-2 every rank
holds the full, identical parameters after each step, so each rank's EMA is the same full-model EMA
(diffusers bug #5783 averaged a ZeRO-partitioned view instead; ZeRO-3, which partitions parameters,
is refused by the stage). The shadows stay float32 even when the engine casts the module to bf16
(see ``_apply``): a 0.9999 decay moves a bf16 number by less than its rounding step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def buffer_key(name: str) -> str:
    return name.replace(".", "__")  # buffer names cannot contain dots


class EMA(nn.Module):
    """Float32 shadows of ``source``'s parameters: ``shadow = d * shadow + (1 - d) * param``.

    With ``warmup`` the k-th update (k = 1, 2, ...) uses ``d_k = min(decay, (1 + k) / (10 + k))``, so the
    average is not dominated by the random initial weights early in training.
    """

    def __init__(self, source: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.names = [name for name, _ in source.named_parameters()]
        for name, param in source.named_parameters():
            self.register_buffer(buffer_key(name), param.detach().clone().float())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def decay_at(self, update: int) -> float:
        """The decay the ``update``-th update (1-based) applies."""
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    def shadow(self, name: str) -> torch.Tensor:
        return getattr(self, buffer_key(name))

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        """Fold ``source``'s current parameters into the average (one optimizer step's worth)."""
        weight = 1 - self.decay_at(int(self.num_updates) + 1)
        for name, param in source.named_parameters():
            self.shadow(name).lerp_(param.detach().float(), weight)
        self.num_updates += 1

    def follow(self, source: nn.Module, applied_steps: int) -> None:
        """One update if the optimizer has applied a step since the last one (skipped steps do not count)."""
        if applied_steps > int(self.num_updates):
            self.update(source)
            self.num_updates.fill_(applied_steps)

    def state_for(self) -> dict[str, torch.Tensor]:
        """The averaged weights as a state dict of the source module (its parameter names)."""
        return {name: self.shadow(name) for name in self.names}

    @torch.no_grad()
    def copy_to(self, target: nn.Module) -> None:
        for name, param in target.named_parameters():
            param.copy_(self.shadow(name).to(param.dtype))

    @contextmanager
    def swapped_into(self, target: nn.Module) -> Iterator[nn.Module]:
        """``target`` runs with the averaged weights inside the block and gets its own back after."""
        saved = [param.detach().clone() for param in target.parameters()]
        self.copy_to(target)
        try:
            yield target
        finally:
            with torch.no_grad():
                for param, original in zip(target.parameters(), saved):
                    param.copy_(original)

    def _apply(self, fn, recurse: bool = True):
        """Follow device moves, ignore dtype casts: ``module.bfloat16()`` must not round the shadows."""
        for key, buffer in self._buffers.items():
            if buffer is not None:
                device = fn(torch.empty(0, dtype=buffer.dtype, device=buffer.device)).device
                self._buffers[key] = buffer.to(device)
        return self


class WithEMA(nn.Module):
    """``net`` plus its EMA; calls go to ``net``. The engine trains this; ``ema`` holds no parameters."""

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        self.net = net
        self.ema = EMA(net, decay, warmup)
        self.config = getattr(net, "config", None)  # checkpoints record the net's config as model.json

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def applied_optimizer_steps(ds_engine) -> int:
    """Optimizer steps a DeepSpeed engine actually applied (its counters are checkpointed with it)."""
    return int(ds_engine.global_steps) - int(ds_engine.skipped_steps)
