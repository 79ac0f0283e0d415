"""Image -> feature vector for FID/KID and nearest-neighbour search, with one resize everywhere.

clean-fid showed that FID moves with the resize library (aliasing, quantisation). Here every image
an extractor sees is resized by ``resize_images`` only: float32 in [0, 1], torch bicubic with
``antialias=True`` (PIL-like filtering when shrinking), clamped back to [0, 1]; nothing else resizes.

An extractor is the judge (default) or any ``torch.nn.Module`` built by a ``module:factory`` import
path whose weights come from a local file (``torch.load(weights_only=True)``; nothing is downloaded),
e.g. torchvision's ``inception_v3`` with a locally saved state dict, when torchvision is installed.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
import torch.nn.functional as F


def as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` (or float in [0, 1]) -> float32 in [0, 1]."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0, 1)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """The one resize of this package (see the module docstring); a no-op at the right size."""
    images = as_float_images(images)
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)


class FeatureExtractor:
    """A module that maps ``(N, channels, input_size, input_size)`` images to ``(N, D)`` features."""

    def __init__(self, module: torch.nn.Module, *, input_size: int, channels: int = 3, name: str = "custom"):
        self.module = module.eval()
        self.input_size = input_size
        self.channels = channels
        self.name = name
        probe = torch.zeros(2, channels, input_size, input_size)
        try:
            with torch.no_grad():
                out = self._flat(self.module(probe))
        except RuntimeError as exc:
            raise ValueError(
                f"feature extractor {name!r} failed on its declared input shape "
                f"(N, {channels}, {input_size}, {input_size}): {exc}"
            ) from None
        self.dim = out.shape[1]

    @staticmethod
    def _flat(output: torch.Tensor | tuple) -> torch.Tensor:
        output = output[0] if isinstance(output, tuple | list) else output
        return output.flatten(1)

    def __call__(self, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"feature extractor {self.name!r} expects images shaped (N, {self.channels}, H, W) "
                f"(resized to {self.input_size}x{self.input_size}), got {tuple(images.shape)}"
            )
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = resize_images(images[start : start + batch_size], self.input_size)
                chunks.append(self._flat(self.module(batch)).double().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim))


def load_module_extractor(
    factory: str, weights: str, *, input_size: int, channels: int = 3
) -> FeatureExtractor:
    """``module:callable`` building an ``nn.Module``; weights from a local state dict (no pickled code)."""
    module_name, _, attribute = factory.partition(":")
    if not attribute:
        raise ValueError(f"feature extractor factory must be 'module:callable', got {factory!r}")
    model = getattr(importlib.import_module(module_name), attribute)()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return FeatureExtractor(model, input_size=input_size, channels=channels, name=factory)
