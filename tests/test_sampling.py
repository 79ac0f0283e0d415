"""KV-cache decoding equals recomputing the prefix; top-k/top-p and guidance match their definitions."""

from __future__ import annotations

import pytest
import torch

from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.sampling import SamplingConfig, filter_logits, generate_codes, guided_logits


def tiny_model(seed: int = 0) -> DalleTransformer:
    torch.manual_seed(seed)
    config = DalleConfig(
        text_vocab_size=30,
        text_len=5,
        image_vocab_size=16,
        image_side=4,
        depth=4,
        heads=2,
        head_dim=8,
        attention_cycle=["row", "column", "conv"],
        conv_kernel_size=3,
        init_std=0.3,  # peaked logits so that top-k/top-p actually cut
    )
    # float64: cached and recomputed logits then agree to ~1e-15, so no draw can flip between them.
    return DalleTransformer(config).double()


def captions(batch: int = 3) -> torch.Tensor:
    text = torch.randint(1, 30, (batch, 5), generator=torch.Generator().manual_seed(1))
    text[0, 3:] = 0  # a shorter caption, padded
    return text


def test_cached_step_logits_equal_full_forward():
    model = tiny_model().eval()
    text = captions()
    codes = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(2))
    full = model(text, codes[:, :-1]).image_logits
    cache = model.new_cache(3, torch.device("cpu"), torch.float64)
    steps = [model.prefill(text, cache)] + [model.decode_step(codes[:, j], cache) for j in range(15)]
    # Same float64 arithmetic over the same keys (the cache holds exactly the masked-in ones): ~1e-15.
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"temperature": 0.7, "top_k": 5},
        {"top_p": 0.8},
        {"top_k": 8, "top_p": 0.9, "guidance_scale": 3.0},
    ],
)
def test_cache_and_no_cache_draw_the_same_codes(settings):
    model = tiny_model()
    text = captions()
    with_cache = generate_codes(model, text, SamplingConfig(seed=7, use_cache=True, **settings))
    without = generate_codes(model, text, SamplingConfig(seed=7, use_cache=False, **settings))
    assert with_cache.shape == (3, 16)
    assert torch.equal(with_cache, without)
    other_seed = generate_codes(model, text, SamplingConfig(seed=8, use_cache=True, **settings))
    assert not torch.equal(with_cache, other_seed)


def test_guidance_changes_the_draw_and_scale_one_is_plain_conditional():
    model = tiny_model()
    text = captions()
    plain = generate_codes(model, text, SamplingConfig(seed=3))
    guided = generate_codes(model, text, SamplingConfig(seed=3, guidance_scale=4.0))
    assert not torch.equal(plain, guided)
    logits = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(guided_logits(logits, 1.0), logits)
    cond, uncond = logits[:2], logits[2:]
    torch.testing.assert_close(guided_logits(logits, 2.5), uncond + 2.5 * (cond - uncond))


def reference_filter(row: list[float], top_k: int | None, top_p: float | None) -> set[int]:
    """Kept indices, by the textbook definition, one row at a time in plain Python."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kept = order[:top_k] if top_k else order
    if top_p is not None:
        weights = [torch.tensor(row).softmax(0)[i].item() for i in range(len(row))]
        total = sum(weights[i] for i in kept)
        nucleus, mass = [], 0.0
        for i in kept:  # top-p over what top-k kept, renormalised
            nucleus.append(i)
            mass += weights[i] / total
            if mass >= top_p:
                break
        kept = nucleus
    return set(kept)


@pytest.mark.parametrize(
    "top_k,top_p", [(3, None), (None, 0.5), (None, 0.95), (6, 0.7), (1, None), (None, 1e-6)]
)
def test_filter_logits_matches_reference(top_k, top_p):
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    filtered = filter_logits(logits, top_k, top_p)
    for row, out in zip(logits.tolist(), filtered):
        kept = {i for i, value in enumerate(out.tolist()) if value != float("-inf")}
        assert kept == reference_filter(row, top_k, top_p)


@pytest.mark.parametrize("use_cache", [True, False])
def test_guided_codes_depend_only_on_their_own_prompt(use_cache):
    """Permuting the prompts permutes the guided codes, and each equals its prompt drawn alone.

    Greedy decoding (top_k=1): with a shared generator ``multinomial`` draws row after row, so a
    sampled code depends on its row's position in the batch; the argmax does not. Float64 keeps batched
    and single-row logits equal to ~1e-15, far from any near-tie flipping an argmax. A batch of one is
    the oracle: its caption and its padding twin are the only rows, so no write-back can mix prompts.
    """
    model = tiny_model()
    text = captions(4)
    text[2] = text[1].flip(0)  # two captions with the same tokens in another order must still differ
    config = SamplingConfig(top_k=1, guidance_scale=3.0, use_cache=use_cache)
    codes = generate_codes(model, text, config)
    alone = torch.cat([generate_codes(model, row[None], config) for row in text])
    assert torch.equal(codes, alone)
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(generate_codes(model, text[order], config), codes[order])
    # Guidance is doing something here: the conditional-only argmax codes differ.
    assert not torch.equal(
        codes, generate_codes(model, text, config.model_copy(update={"guidance_scale": 1.0}))
    )
    assert len({tuple(row.tolist()) for row in codes}) > 1  # prompts lead to different images
