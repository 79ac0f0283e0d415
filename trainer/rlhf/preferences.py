"""Preference data for reward modelling and DPO: K samples per prompt, ranked, written as shards.

The labeller is an interface: the evals judge's prompt-alignment score stands in for human
labellers, and human rankings from a JSONL file plug in the same way. Pairs become ordinary
WebDataset samples through ``data_pipeline.ingest`` (the chosen image as the sample's image, the
prompt as its caption, both code sequences and scores in its JSON), so the loader reads them exactly
once and resumably like any other dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from data_pipeline import storage
from data_pipeline.sources.base import Partition, Sample, split_evenly
from trainer.sampling import SamplingConfig, generate_codes


def candidate_id(prompt_index: int, sample_index: int) -> str:
    """The name a labeller knows a candidate image by (stable for a given policy, prompts and seed)."""
    return f"p{prompt_index:05d}-s{sample_index:02d}"


class Labeller(Protocol):
    """Scores candidates for their prompts; higher is better. Only the order within a prompt matters."""

    name: str

    def score(self, prompts: Sequence[str], images: torch.Tensor, ids: Sequence[str]) -> list[float]:
        """``images`` (N, 3, H, W) in [0, 1], one per prompt in ``prompts``; ``ids`` from candidate_id."""
        ...


class RankingFileLabeller:
    """Human judgements from a JSONL file: one ``{"id": "p00003-s01", "score": 2.0}`` object per line."""

    name = "ranking-file"

    def __init__(self, url: str) -> None:
        self.url = url
        self.scores: dict[str, float] = {}
        for number, line in enumerate(storage.read_bytes(url).decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.scores[str(entry["id"])] = float(entry["score"])
            except (ValueError, KeyError, TypeError) as exc:
                expected = '{"id": str, "score": number}'
                raise ValueError(f"{url}:{number}: expected {expected}: {exc}") from exc

    def score(self, prompts: Sequence[str], images: torch.Tensor, ids: Sequence[str]) -> list[float]:
        missing = [cid for cid in ids if cid not in self.scores]
        if missing:
            raise ValueError(f"{self.url} has no score for {len(missing)} candidates, e.g. {missing[:3]}")
        return [self.scores[cid] for cid in ids]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen_image: np.ndarray  # (H, W, 3) uint8
    chosen_codes: list[int]
    rejected_codes: list[int]
    chosen_score: float
    rejected_score: float


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def rank_candidates(
    prompts: Sequence[str], codes: torch.Tensor, images: torch.Tensor, labeller: Labeller
) -> tuple[list[PreferencePair], int]:
    """Best vs worst candidate of each prompt; ``codes`` (P, K, N), ``images`` (P, K, 3, H, W).

    Returns the pairs and how many prompts gave none: all K candidates scored equal, so no preference
    can be read from them (a constant labeller must not invent one).
    """
    count, k = codes.shape[:2]
    ids = [candidate_id(p, s) for p in range(count) for s in range(k)]
    flat_prompts = [prompt for prompt in prompts for _ in range(k)]
    scores = torch.tensor(labeller.score(flat_prompts, images.flatten(0, 1), ids), dtype=torch.float64)
    scores = scores.view(count, k)
    pairs, ties = [], 0
    for p in range(count):
        best, worst = int(scores[p].argmax()), int(scores[p].argmin())
        if scores[p, best] == scores[p, worst]:
            ties += 1
            continue
        pairs.append(
            PreferencePair(
                prompt=prompts[p],
                chosen_image=to_uint8(images[p, best]),
                chosen_codes=codes[p, best].tolist(),
                rejected_codes=codes[p, worst].tolist(),
                chosen_score=float(scores[p, best]),
                rejected_score=float(scores[p, worst]),
            )
        )
    return pairs, ties


class PreferenceSource:
    """Ranked pairs as a ``data_pipeline`` source, so ``ingest`` shards them like any dataset."""

    kind = "preferences"

    def __init__(self, pairs: Sequence[PreferencePair], info: dict[str, Any]) -> None:
        self.pairs = list(pairs)
        self.details = dict(info)
        self.spec = f"preferences:{info.get('policy_checkpoint', 'unknown')}"

    def partitions(self, num_partitions: int, num_samples: int | None) -> list[Partition]:
        indices = list(range(len(self.pairs)))[:num_samples]
        return [Partition(i, chunk) for i, chunk in enumerate(split_evenly(indices, num_partitions))]

    def read(self, partition: Partition) -> Iterator[tuple[int, Sample]]:
        for index in partition.items:
            pair = self.pairs[index]
            metadata = {
                "chosen_codes": pair.chosen_codes,
                "rejected_codes": pair.rejected_codes,
                "chosen_score": pair.chosen_score,
                "rejected_score": pair.rejected_score,
            }
            yield index, Sample(image=pair.chosen_image, caption=pair.prompt, metadata=metadata)

    def lineage(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "seed": self.details.get("seed"), "split": "train"}

    def info(self) -> dict[str, Any]:
        return {**self.details, "pairs": len(self.pairs)}


def pair_tensors(meta: Sequence[dict[str, Any]], image_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and rejected codes of a loader batch's ``meta`` column: two ``(B, image_len)`` tensors.

    Padding rows (empty meta) get zeros; the batch's ``valid`` mask keeps them out of every loss.
    """
    chosen = torch.zeros(len(meta), image_len, dtype=torch.long)
    rejected = torch.zeros_like(chosen)
    for row, entry in enumerate(meta):
        if entry:
            chosen[row] = torch.tensor(entry["chosen_codes"])
            rejected[row] = torch.tensor(entry["rejected_codes"])
    return chosen, rejected


@torch.no_grad()
def draw_candidates(
    policy: torch.nn.Module,
    decode: Any,
    text: torch.Tensor,
    k: int,
    sampling: SamplingConfig,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` samples per caption: codes ``(P, k, N)`` and images ``(P, k, 3, H, W)`` in [0, 1].

    ``decode`` maps codes ``(B, side, side)`` to images (the frozen dVAE's ``decode``). One seeded
    generator for the whole draw, so the candidates (and their ids) are reproducible.
    """
    generator = torch.Generator(device=text.device).manual_seed(seed)
    codes = generate_codes(policy, text.repeat_interleave(k, dim=0), sampling, generator)
    side = policy.config.image_side
    images = decode(codes.view(-1, side, side)).float().cpu()
    return codes.view(text.shape[0], k, -1).cpu(), images.view(text.shape[0], k, *images.shape[1:])


def make_pair_batch(image_len: int) -> Any:
    """Loader batch of preference samples -> ``text``, ``chosen``/``rejected`` codes, ``valid``, ``keys``."""

    def prepare(batch: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = pair_tensors(batch["meta"], image_len)
        return {
            "text": batch["text"],
            "chosen": chosen,
            "rejected": rejected,
            "valid": batch["valid"],
            "keys": list(batch["__key__"]),
        }

    return prepare
