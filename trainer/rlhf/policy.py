"""The DALL-E transformer seen as an RL policy: per-token log-probs of image codes, and the heads RLHF adds.

An episode is one image for one caption; an action is the next image code. ``image_logprobs`` scores
codes under a model in one teacher-forced forward (what PPO's ratio and DPO's likelihoods need);
``RewardModel`` and ``ValueModel`` are the transformer with a scalar head, initialised from the SFT
weights as in InstructGPT.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.losses.rlhf import token_logprobs
from trainer.models.dalle import DalleConfig, DalleTransformer


def image_logprobs(model: nn.Module, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``log p(code_t | caption, codes_<t)`` for every image code: ``(B, image_len)`` in float32."""
    out = model(text, codes[:, :-1])
    return token_logprobs(out.image_logits, codes)


class _ScalarHeadModel(nn.Module):
    """A DALL-E transformer plus a zero-initialised linear head on its final hidden states."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = DalleTransformer(config)
        self.head = nn.Linear(config.width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def load_policy_state(self, state: dict[str, torch.Tensor]) -> None:
        """Initialise the transformer from a policy (SFT) checkpoint's module state; the head stays new."""
        self.transformer.load_state_dict(state)

    def hidden(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Final hidden states at the positions that predict image codes 0..N-1: ``(B, N, width)``."""
        out = self.transformer(text, codes[:, :-1])
        return out.hidden[:, self.config.text_len - 1 :]


class RewardModel(_ScalarHeadModel):
    """Scalar reward for (caption, image codes).

    The sequence holds at most N-1 image codes (the last one is only ever a target), so the final
    position has seen every code but the last; the last code's embedding is added to that state before
    the head, which is what the next layer's input would have been.
    """

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        last_state = self.hidden(text, codes)[:, -1]
        last_code = self.transformer.image_embedding(codes[:, -1])
        return self.head(last_state + last_code).squeeze(-1).float()


class ValueModel(_ScalarHeadModel):
    """PPO's critic: the value of the state before each image code, ``(B, N)``."""

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(text, codes)).squeeze(-1).float()
