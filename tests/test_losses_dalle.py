"""DALL-E's weighted text/image cross-entropy against a float64 reference written out by hand."""

from __future__ import annotations

import pytest
import torch

from trainer.losses.dalle import dalle_loss


def reference_loss(
    text_logits, text_targets, image_logits, image_targets, text_weight, image_weight, valid=None
):
    """float64, explicit log-sum-exp and gather: the definition, not a library call."""
    rows = slice(None) if valid is None else valid

    def mean_nll(logits, targets):
        logits, targets = logits.double()[rows], targets[rows]
        log_z = logits.max(-1, keepdim=True).values
        log_z = log_z.squeeze(-1) + (logits - log_z).exp().sum(-1).log()
        picked = logits.gather(-1, targets[..., None]).squeeze(-1)
        return (log_z - picked).mean()

    text = mean_nll(text_logits, text_targets)
    image = mean_nll(image_logits, image_targets)
    return text_weight * text + image_weight * image, text, image


@pytest.mark.parametrize("weights", [(1 / 8, 7 / 8), (0.5, 0.5), (0.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(weights, seed):
    generator = torch.Generator().manual_seed(seed)
    text_logits = torch.randn(3, 7, 40, generator=generator) * 4
    image_logits = torch.randn(3, 16, 24, generator=generator) * 4
    text_targets = torch.randint(0, 40, (3, 7), generator=generator)
    image_targets = torch.randint(0, 24, (3, 16), generator=generator)

    got = dalle_loss(text_logits, text_targets, image_logits, image_targets, *weights)
    want = reference_loss(text_logits, text_targets, image_logits, image_targets, *weights)
    # float32 log-softmax over <= 40 classes of logits ~N(0, 16): relative error ~1e-7 per token;
    # 1e-5 leaves two orders of margin and still catches any wrong weight or normalisation.
    for value, reference in zip(got, want):
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)


def test_padding_rows_are_left_out():
    generator = torch.Generator().manual_seed(5)
    args = (
        torch.randn(4, 3, 9, generator=generator),
        torch.randint(0, 9, (4, 3), generator=generator),
        torch.randn(4, 5, 7, generator=generator),
        torch.randint(0, 7, (4, 5), generator=generator),
    )
    valid = torch.tensor([True, False, True, False])
    got = dalle_loss(*args, valid=valid)
    want = reference_loss(*args, 1 / 8, 7 / 8, valid=valid)
    for value, reference in zip(got, want):
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)  # as above
    nothing = dalle_loss(*args, valid=torch.zeros(4, dtype=torch.bool))[0]
    assert float(nothing) == 0.0


def test_gradients_match_float64_reference():
    generator = torch.Generator().manual_seed(3)
    text_logits = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    image_logits = torch.randn(2, 9, 13, generator=generator, dtype=torch.float64, requires_grad=True)
    text_targets = torch.randint(0, 11, (2, 5), generator=generator)
    image_targets = torch.randint(0, 13, (2, 9), generator=generator)
    loss = dalle_loss(text_logits.float(), text_targets, image_logits.float(), image_targets)[0]
    got = torch.autograd.grad(loss, (text_logits, image_logits))
    reference = reference_loss(text_logits, text_targets, image_logits, image_targets, 1 / 8, 7 / 8)[0]
    want = torch.autograd.grad(reference, (text_logits, image_logits))
    # float32 softmax gradients of magnitude <= 1/numel: 1e-6 absolute is ~10 float32 ulps of 0.1.
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_default_weights_are_one_eighth_and_seven_eighths():
    logits = torch.zeros(1, 2, 4)
    targets = torch.zeros(1, 2, dtype=torch.long)
    image_logits = torch.tensor([[[10.0, 0, 0, 0]]])  # confident and right: image loss ~0
    loss, text_loss, image_loss = dalle_loss(
        logits, targets, image_logits, torch.zeros(1, 1, dtype=torch.long)
    )
    torch.testing.assert_close(loss, text_loss / 8 + image_loss * 7 / 8)
    torch.testing.assert_close(text_loss, torch.tensor(4.0).log())


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"text \(1, 3, 5\) vs \(1, 4\)"):
        dalle_loss(
            torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 2, 3), torch.zeros(1, 2)
        )
