"""Reranking keeps each prompt's highest-scoring candidate, whatever the candidates' order; N=1 is plain
sampling; `tessera sample --rerank N` keeps the judge's best and says so."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import torch

from cluster import cli
from data_pipeline import storage
from data_pipeline.tokenizer import TextTokenizer, build_untrained
from evals.judge import Judge, JudgeModelConfig, write_card
from trainer.checkpoint import save_weights
from trainer.inference import draw_samples
from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.models.dvae import DVAE, DVAEConfig
from trainer.rerank import Candidates, draw_ranked
from trainer.sampling import SamplingConfig

PROMPTS = [
    "a large red circle",
    "a small blue square to the left of a large green triangle",
    "a large yellow triangle",
]


def preset(name: str) -> dict:
    with open(f"configs/{name}.toml", "rb") as handle:
        return tomllib.load(handle)["model"]


@pytest.fixture(scope="module")
def parts():
    """The tiny presets' transformer and dVAE (random weights) and a tokenizer on the prompts."""
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig.model_validate(preset("dvae/tiny"))).eval()
    model = DalleTransformer(DalleConfig.model_validate(preset("dalle/tiny"))).eval()
    tokenizer, trainer = build_untrained(vocab_size=300, min_frequency=1)
    tokenizer.train_from_iterator(PROMPTS * 4, trainer=trainer)
    return model, dvae, TextTokenizer(tokenizer)


class Brightness:
    """A stand-in judge with distinct scores: the image's mean pixel value."""

    name = "brightness"

    def score(self, prompts, images, ids):
        return images.mean(dim=(1, 2, 3)).tolist()


SAMPLING = SamplingConfig(temperature=1.0, top_k=32, guidance_scale=2.0, seed=3)


def test_one_candidate_is_plain_sampling(parts):
    model, dvae, tokenizer = parts
    images, codes = draw_samples(model, dvae, tokenizer, PROMPTS, SAMPLING)
    kept_images, kept_codes = draw_ranked(model, dvae, tokenizer, PROMPTS, SAMPLING, 1, Brightness()).best()
    assert torch.equal(kept_codes, codes) and torch.equal(kept_images, images)


def test_the_kept_sample_is_the_one_the_scorer_ranks_highest_in_any_order(parts):
    model, dvae, tokenizer = parts
    ranked = draw_ranked(model, dvae, tokenizer, PROMPTS, SAMPLING, 5, Brightness())
    assert ranked.images.shape[:2] == (3, 5) and ranked.codes.shape == (3, 5, 64)
    # Independently: float64 brightness of every candidate, and the brightest one by a plain loop.
    brightness = ranked.images.double().numpy().mean(axis=(2, 3, 4))
    assert len({round(b, 9) for b in brightness.ravel()}) == brightness.size  # distinct: no ties to hide in
    brightest = [max(range(5), key=lambda s, p=p: brightness[p, s]) for p in range(3)]
    assert brightest != [0, 0, 0]  # else "keep the first" would pass
    images, codes = ranked.best()
    for p, s in enumerate(brightest):
        assert torch.equal(images[p], ranked.images[p, s]) and torch.equal(codes[p], ranked.codes[p, s])
    # Shuffle each prompt's candidates: the same image is kept.
    generator = torch.Generator().manual_seed(4)
    order = torch.stack([torch.randperm(5, generator=generator) for _ in range(3)])
    rows = torch.arange(3)[:, None]
    shuffled = Candidates(
        PROMPTS, ranked.codes[rows, order], ranked.images[rows, order], ranked.scores[rows, order]
    )
    assert torch.equal(shuffled.best()[0], images)
    # The first n candidates are a draw of n: the kept one is the brightest among them.
    first_two = [int(np.argmax(brightness[p, :2])) for p in range(3)]
    assert ranked.kept(2).tolist() == first_two


def test_sample_rerank_keeps_the_judges_best(parts, tmp_path, capsys):
    """End to end through the CLI with real checkpoints of the tiny models and an untrained judge (its
    card claims the bar: the judge's training and bar are tests/test_evals_judge.py's subject)."""
    model, dvae, tokenizer = parts
    tokenizer_url = str(tmp_path / "tokenizer.json")
    storage.write_bytes_atomic(tokenizer_url, tokenizer.to_str().encode())
    dalle_url = save_weights(str(tmp_path / "dalle"), model)
    dvae_url = save_weights(str(tmp_path / "dvae"), dvae)
    judge_model = JudgeModelConfig.model_validate(preset("judge/tiny"))
    judge_url = save_weights(str(tmp_path / "judge"), Judge(judge_model))
    write_card(judge_url, judge_model, {"shape": 1.0, "colour": 1.0, "size": 1.0}, config_hash="")
    sample = [
        *("sample", "--config", "configs/dalle/tiny.toml", "--checkpoint", dalle_url),
        *("--set", f"data.tokenizer={tokenizer_url}", "--set", f"dalle.dvae_checkpoint={dvae_url}"),
        *("--run-dir", str(tmp_path / "run"), "--judge", judge_url, "--seed", "3"),
    ]
    status = cli.main([*sample, "--rerank", "3", *(arg for p in PROMPTS for arg in ("--prompt", p))])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    scores = np.array(result["rerank"]["scores"])
    assert scores.shape == (3, 3) and result["rerank"]["kept"] == scores.argmax(axis=1).tolist()
    saved = torch.load(tmp_path / "run" / "samples.pt", weights_only=True)
    assert saved["codes"].shape == (3, 64) and saved["rerank"]["n"] == 3

    status = cli.main([*sample, "--rerank", "2", "--prompt", "a cat"])
    assert status == 2 and "the judge cannot score this prompt" in capsys.readouterr().err
