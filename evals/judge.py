"""The judge: a small CNN that reads a synthetic scene cell by cell (and a digit's label).

The image is resized (``evals.features.resize_images``) so each of the 3x3 layout cells is
``cell_px`` square, cut into its 9 cells, and one shared CNN describes every cell: empty or which
shape, its colour and its size. Sharing weights across cells gives 9 training examples per image and
makes position a matter of which cell, not of learning every shape at every place. The 9 cell
feature vectors, concatenated, are the image's feature vector (for FID/KID and nearest neighbours)
and feed the digit head. See evals/scenes.py for why cells, and docs/evals.md for the accuracy bar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from data_pipeline import storage
from data_pipeline.sources.synthetic import GRID, SHAPES
from evals.features import FeatureExtractor, as_float_images, resize_images
from evals.scenes import CELLS, COLOUR_NAMES, SIZE_NAMES, SceneObject, scene_from_predictions, vocabulary

# Every attribute the judge reports must reach this held-out accuracy before any verdict is used.
ACCURACY_BAR = 0.98
CARD_NAME = "judge.json"
# Bumped whenever the network changes in a way its config does not show (2: BatchNorm).
JUDGE_FORMAT = "tessera-judge/2"


class JudgeModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = "judge"
    image_size: int = Field(32, ge=8)  # the side of the images it judges
    cell_px: int = Field(12, ge=6)  # each grid cell is resized to this square
    channels: tuple[int, int] = (16, 32)
    cell_features: int = Field(32, ge=4)


class Judge(nn.Module):
    def __init__(self, config: JudgeModelConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        pooled = config.cell_px // 4
        # BatchNorm: the shape heads train in a few hundred steps instead of thousands.
        conv = lambda cin, cout: (nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
        self.cell_net = nn.Sequential(
            *conv(3, c1),
            *conv(c1, c1),
            nn.MaxPool2d(2),
            *conv(c1, c2),
            *conv(c2, c2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * pooled * pooled, config.cell_features),
            nn.ReLU(),
        )
        self.shape_head = nn.Linear(config.cell_features, 1 + len(SHAPES))  # 0 = empty cell
        self.colour_head = nn.Linear(config.cell_features, len(COLOUR_NAMES))
        self.size_head = nn.Linear(config.cell_features, len(SIZE_NAMES))
        self.digit_head = nn.Linear(CELLS * config.cell_features, 10)

    @property
    def feature_dim(self) -> int:
        return CELLS * self.config.cell_features

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` in [0, 1] -> ``(N * 9, 3, cell_px, cell_px)``, row-major cells."""
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"the judge expects images shaped (N, 3, {size}, {size}), got {tuple(images.shape)}"
            )
        px = self.config.cell_px
        grid = resize_images(images, GRID * px)
        n = grid.shape[0]
        return grid.view(n, 3, GRID, px, GRID, px).permute(0, 2, 4, 1, 3, 5).reshape(n * CELLS, 3, px, px)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = images.shape[0]
        cell_features = self.cell_net(self.cells(images))
        features = cell_features.view(n, self.feature_dim)
        return {
            "cell_shape": self.shape_head(cell_features).view(n, CELLS, -1),
            "cell_colour": self.colour_head(cell_features).view(n, CELLS, -1),
            "cell_size": self.size_head(cell_features).view(n, CELLS, -1),
            "digit": self.digit_head(features),
            "features": features,
        }


class _FeatureHead(nn.Module):
    """The judge's penultimate features as a plain module (what FeatureExtractor wraps)."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge(images)["features"]


@dataclass
class Verdicts:
    scenes: list[list[SceneObject]]
    digits: list[int]


@torch.no_grad()
def judge_images(judge: Judge, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> Verdicts:
    """What the judge sees in each image: its scene (cells) and its most likely digit."""
    images = as_float_images(images)
    scenes: list[list[SceneObject]] = []
    digits: list[int] = []
    judge.eval()
    for start in range(0, len(images), batch_size):
        out = judge(images[start : start + batch_size])
        shape, colour, size = (
            out[name].argmax(-1).tolist() for name in ("cell_shape", "cell_colour", "cell_size")
        )
        scenes.extend(scene_from_predictions(*row) for row in zip(shape, colour, size))
        digits.extend(out["digit"].argmax(-1).tolist())
    return Verdicts(scenes, digits)


def judge_extractor(judge: Judge) -> FeatureExtractor:
    return FeatureExtractor(_FeatureHead(judge), input_size=judge.config.image_size, name="judge")


# --- the judge card: what a trained judge is and how well it does, stored with its checkpoint ------


class JudgeRefused(ValueError):
    """A judge that may not be used: below the bar, or built for something else."""


def write_card(checkpoint: str, model: JudgeModelConfig, accuracy: dict[str, float], config_hash: str) -> str:
    """``judge.json`` inside the checkpoint folder: config, vocabulary and held-out accuracy."""
    card = {
        "format": JUDGE_FORMAT,
        "model": model.model_dump(mode="json"),
        "vocabulary": vocabulary(),
        "heldout_accuracy": accuracy,
        "config_hash": config_hash,
    }
    url = storage.join(checkpoint, CARD_NAME)
    storage.write_bytes_atomic(url, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return url


def read_card(checkpoint: str) -> dict[str, Any]:
    url = storage.join(checkpoint, CARD_NAME)
    if not storage.exists(url):
        raise JudgeRefused(
            f"{checkpoint}: no {CARD_NAME} (not a judge checkpoint, or training did not finish)"
        )
    return json.loads(storage.read_bytes(url))


def check_card(card: dict[str, Any], expected: JudgeModelConfig, required: list[str]) -> None:
    """Refuse a judge built from another config or vocabulary, or one below the bar on ``required``."""
    found = card.get("format")
    problems = (
        []
        if found == JUDGE_FORMAT
        else [f"format: checkpoint has {found!r}, this code reads {JUDGE_FORMAT!r}"]
    )
    problems += [
        f"model.{name}: checkpoint has {card['model'].get(name)!r}, config says {value!r}"
        for name, value in expected.model_dump(mode="json").items()
        if card["model"].get(name) != value
    ]
    problems += [
        f"vocabulary.{name}: checkpoint has {card['vocabulary'].get(name)}, this code has {value}"
        for name, value in vocabulary().items()
        if card["vocabulary"].get(name) != value
    ]
    if problems:
        raise JudgeRefused(
            "judge checkpoint does not match the eval's judge config:\n  " + "\n  ".join(problems)
        )
    accuracy = card["heldout_accuracy"]
    weak = [
        f"{name} {accuracy[name]:.4f}" if name in accuracy else f"{name} (not measured)"
        for name in required
        if accuracy.get(name, 0.0) < ACCURACY_BAR
    ]
    if weak:
        raise JudgeRefused(
            f"judge held-out accuracy below the {ACCURACY_BAR:.0%} bar, its verdicts are not trustworthy: "
            + ", ".join(weak)
            + ". Train it longer or on more data (tessera train judge)."
        )


def load_judge(checkpoint: str, expected: JudgeModelConfig, required: list[str]) -> Judge:
    """A judge that passed ``check_card``, with its weights, in eval mode."""
    from trainer.checkpoint import read_module_state

    check_card(read_card(checkpoint), expected, required)
    judge = Judge(expected)
    judge.load_state_dict(read_module_state(checkpoint))
    return judge.eval().requires_grad_(False)
