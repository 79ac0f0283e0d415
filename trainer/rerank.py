"""Reranking, as DALL-E did with CLIP: draw N images per prompt, keep the one a scorer ranks highest.

The scorer is any :class:`trainer.rlhf.preferences.Labeller` (the evals judge's prompt-alignment score
in ``tessera sample --rerank N``; higher is better). Candidates come from one seeded draw of N codes per
prompt (``draw_candidates``); N=1 is exactly plain sampling (``draw_samples`` with the same
``SamplingConfig``). The candidates are independent draws, so the first N' of a draw of N are a draw of
N': a benchmark reads N=1..N from one draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data_pipeline.tokenizer import TextTokenizer
from trainer.models.dalle import DalleTransformer
from trainer.models.dvae import DVAE
from trainer.rlhf.preferences import Labeller, candidate_id, draw_candidates
from trainer.sampling import SamplingConfig


def keep_best(scores: torch.Tensor) -> torch.Tensor:
    """``(P, N)`` scores -> ``(P,)`` index of each prompt's highest-scoring candidate (the first on a tie)."""
    return scores.argmax(dim=1)


@dataclass
class Candidates:
    prompts: list[str]
    codes: torch.Tensor  # (P, N, image_len)
    images: torch.Tensor  # (P, N, 3, H, W) in [0, 1]
    scores: torch.Tensor  # (P, N) float64, the labeller's

    def kept(self, n: int | None = None) -> torch.Tensor:
        """Index of the candidate kept from the first ``n`` (default all) of each prompt."""
        return keep_best(self.scores[:, : n or self.scores.shape[1]])

    def best(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept images ``(P, 3, H, W)`` and codes ``(P, image_len)`` from the first ``n`` candidates."""
        rows = torch.arange(len(self.prompts))
        index = self.kept(n)
        return self.images[rows, index], self.codes[rows, index]


@torch.no_grad()
def draw_ranked(
    model: DalleTransformer,
    dvae: DVAE,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    n: int,
    labeller: Labeller,
) -> Candidates:
    """``n`` scored candidates per prompt; ``.best()`` is the reranked sample."""
    if n < 1:
        raise ValueError(f"rerank: n must be >= 1, got {n}")
    device = next(model.parameters()).device
    text = tokenizer.encode_batch(list(prompts), model.config.text_len).to(device)
    dvae_device = next(dvae.parameters()).device
    decode = lambda codes: dvae.decode(codes.to(dvae_device))
    codes, images = draw_candidates(model, decode, text, n, sampling, sampling.seed)
    ids = [candidate_id(p, s) for p in range(len(prompts)) for s in range(n)]
    flat_prompts = [prompt for prompt in prompts for _ in range(n)]
    scores = torch.tensor(labeller.score(flat_prompts, images.flatten(0, 1), ids), dtype=torch.float64)
    return Candidates(list(prompts), codes, images, scores.view(len(prompts), n))
