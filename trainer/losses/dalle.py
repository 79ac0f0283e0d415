"""DALL-E's training loss: next-token cross-entropy on text and image tokens, weighted.

The paper weights the text loss 1/8 and the image loss 7/8 because the image is the output that
matters and it has four times as many tokens; the weights are arguments so a run can change them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dalle_loss(
    text_logits: torch.Tensor,
    text_targets: torch.Tensor,
    image_logits: torch.Tensor,
    image_targets: torch.Tensor,
    text_weight: float = 1 / 8,
    image_weight: float = 7 / 8,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, text_loss, image_loss)``: mean token cross-entropies and their weighted sum.

    ``text_logits`` (B, T, Vt) against ``text_targets`` (B, T); ``image_logits`` (B, N, Vi) against
    ``image_targets`` (B, N). ``valid`` (B,) bool leaves out the loader's padding rows. Logits are
    upcast to float32 so a bf16 model's loss is not rounded.
    """
    if text_logits.shape[:2] != text_targets.shape or image_logits.shape[:2] != image_targets.shape:
        raise ValueError(
            f"logits/targets mismatch: text {tuple(text_logits.shape)} vs {tuple(text_targets.shape)}, "
            f"image {tuple(image_logits.shape)} vs {tuple(image_targets.shape)}"
        )
    text_loss = token_cross_entropy(text_logits, text_targets, valid)
    image_loss = token_cross_entropy(image_logits, image_targets, valid)
    return text_weight * text_loss + image_weight * image_loss, text_loss, image_loss


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the tokens of valid rows; zero (with a graph) when there are none."""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
    weights = (
        torch.ones_like(per_token) if valid is None else valid[:, None].to(per_token).expand_as(per_token)
    )
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)
