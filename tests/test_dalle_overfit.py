"""End to end on the tiny preset's transformer: trained on 8 caption/code pairs (captions dropped to
padding half the time, as the stage does for guidance), it must give back each pair's codes from its
caption with classifier-free guidance, through the KV-cache path and the recompute path alike.

A caption getting another row's guided logits, a cache that shows a position the wrong keys, or a
loss whose targets are shifted by one leaves some codes wrong, so exact equality is the check.
"""

from __future__ import annotations

import pytest
import torch

from cluster.config import load_config
from trainer.models.dalle import DalleTransformer
from trainer.sampling import SamplingConfig, generate_codes
from trainer.stages.dalle import DalleStageConfig, make_loss_fn

PAIRS = 8
PAD, BOS, EOS = 0, 2, 3  # data_pipeline.tokenizer's special ids


def captions(generator: torch.Generator, text_len: int, vocab: int) -> torch.Tensor:
    """Distinct ``<bos> w1 .. wn <eos> <pad>..`` rows of random words, 4 to 10 words long."""
    rows = torch.full((PAIRS, text_len), PAD)
    for row in rows:
        length = int(torch.randint(4, 11, (1,), generator=generator))
        words = torch.randint(4, vocab, (length,), generator=generator)
        row[: len(words) + 2] = torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS])])
    return rows


@pytest.fixture(scope="module")
def overfit_model():
    config = load_config(
        DalleStageConfig,
        "configs/dalle/tiny.toml",
        ["data.manifest='unused'", "data.tokenizer='unused'"],
    )
    model_config = config.model
    generator = torch.Generator().manual_seed(11)
    text = captions(generator, model_config.text_len, 400)
    shape = (PAIRS, model_config.image_side**2)
    codes = torch.randint(0, model_config.image_vocab_size, shape, generator=generator)
    torch.manual_seed(0)
    model = DalleTransformer(model_config)
    loss_fn = make_loss_fn(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # Every step sees each pair once with its caption and once with the caption dropped.
    batch = {"text": torch.cat([text, torch.full_like(text, PAD)]), "codes": torch.cat([codes, codes])}
    for _ in range(400):
        loss, metrics = loss_fn(model, batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if metrics["image_loss"] < 0.01:
            break
    return model.eval(), text, codes, metrics


@pytest.mark.parametrize("use_cache", [True, False])
def test_overfit_pairs_come_back_from_their_captions(overfit_model, use_cache):
    model, text, codes, metrics = overfit_model
    assert metrics["image_loss"] < 0.05, metrics  # memorised (a uniform guess is log 128 = 4.85)
    sampling = SamplingConfig(temperature=1.0, top_k=1, guidance_scale=3.0, use_cache=use_cache)
    drawn = generate_codes(model, text, sampling)
    assert torch.equal(drawn, codes)
    # Prompts in another order: each caption still draws its own codes.
    order = torch.randperm(PAIRS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate_codes(model, text[order], sampling), codes[order])
