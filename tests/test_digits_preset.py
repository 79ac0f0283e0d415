"""The digits preset (configs/pipeline/digits.toml) without training: every stage's command line parses
with the real CLI and its config validates, the three ingests take disjoint slices of the digits order
(the models, the judge and the eval never share a scan), the stages agree on sizes and paths, and
every caption the digits source can write parses back to the digit it asks for."""

from __future__ import annotations

import argparse
import os

import pytest

from cluster.cli import build_parser
from cluster.commands import ingest
from cluster.commands.train import load_stage_config
from cluster.config import load_config
from cluster.pipeline import load_preset
from data_pipeline.sources.digits import NUMBER_WORDS, TEMPLATES, num_digits
from evals.alignment import alignment, parse_caption
from evals.config import EvalConfig
from evals.run import judge_verdict_scope
from trainer.checkpoint import checkpoint_url


@pytest.fixture(scope="module")
def stages() -> dict[str, argparse.Namespace]:
    spec = load_preset("digits")
    parser = build_parser()
    return {name: parser.parse_args(spec.command(name)) for name in spec.order()}


def test_the_preset_is_a_valid_graph_ending_in_the_eval():
    spec = load_preset("digits")
    assert spec.order()[-1] == "eval"
    assert spec.upstream({"eval"}) == set(spec.stages)  # every stage feeds the verdict


def test_ingests_take_disjoint_slices_of_the_digits(stages):
    slices = {}
    for name, args in stages.items():
        if args.command == "ingest":
            config = ingest.load(args).ingest
            assert config.source == "digits" and config.image_size == 32, name
            slices[config.dest] = range(config.skip, config.skip + config.num_samples)
    ordered = sorted(slices.values(), key=lambda r: r.start)
    assert len(ordered) == 3
    assert all(a.stop <= b.start for a, b in zip(ordered, ordered[1:])), slices
    assert ordered[-1].stop <= num_digits()
    models = load_stage_config(stages["dvae"])[1].data.manifest
    judge = load_stage_config(stages["judge"])[1].data
    assert sorted(os.path.abspath(dest) for dest in slices) == sorted(
        [models, judge.manifest, judge.validation_manifest]
    )


def test_stage_configs_validate_and_agree(stages):
    _, dvae = load_stage_config(stages["dvae"])
    _, dalle = load_stage_config(stages["dalle"])
    _, judge = load_stage_config(stages["judge"])
    eval_args = stages["eval"]
    evaluation = load_config(EvalConfig, eval_args.config, eval_args.overrides)
    data = ingest.load(stages["ingest"])
    assert dvae.data.manifest == dalle.data.manifest
    assert dvae.model.image_size == judge.model.image_size == data.ingest.image_size
    assert dalle.model.image_side == dvae.model.image_size // dvae.model.downsample
    assert dalle.model.image_vocab_size == dvae.model.vocab_size
    assert dalle.model.text_vocab_size == data.tokenizer.vocab_size
    assert dalle.model.text_len == dalle.data.text_len
    checkpoints = {
        name: os.path.join(stages[name].run_dir, "checkpoints") for name in ("dvae", "dalle", "judge")
    }
    # The dalle stage names one checkpoint: the dVAE run's last step (a changed schedule must follow).
    assert same(dalle.dalle.dvae_checkpoint, checkpoint_url(checkpoints["dvae"], dvae.engine.total_steps))
    # The eval reads exactly what the stages before it wrote, and the judge is the one trained here.
    assert evaluation.judge.config == stages["judge"].config
    assert same(evaluation.judge.checkpoint, checkpoints["judge"])
    assert same(evaluation.dalle.checkpoint, checkpoints["dalle"])
    assert same(evaluation.dvae.checkpoint, checkpoints["dvae"])
    assert same(evaluation.dalle.dvae_checkpoint, checkpoints["dvae"])
    assert same(evaluation.dalle.tokenizer, dalle.data.tokenizer)
    assert same(evaluation.data.eval_manifests[0], judge.data.validation_manifest)
    assert same(evaluation.data.train_manifest, dvae.data.manifest)
    assert evaluation.samples_per_manifest == ingest.load(stages["ingest-eval"]).ingest.num_samples


def same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def test_every_digits_caption_asks_for_its_digit():
    captions, asked = [], []
    for template in TEMPLATES:
        for digit, word in enumerate(NUMBER_WORDS):
            captions.append(template.format(digit=digit, word=word))
            asked.append(digit)
    assert [parse_caption(caption).digit for caption in captions] == asked
    right = alignment(captions, [[] for _ in captions], asked)["all"]
    assert right["digit"]["accuracy"] == right["prompt"]["accuracy"] == 1.0
    wrong = alignment(captions, [[] for _ in captions], [(d + 1) % 10 for d in asked])["all"]
    assert wrong["digit"]["correct"] == wrong["prompt"]["correct"] == 0
    unjudged = alignment(captions, [[] for _ in captions], asked, digits=False)
    assert set(unjudged) == {"unjudged"} and unjudged["unjudged"]["digit_prompt"]["total"] == len(captions)


@pytest.mark.parametrize(("accuracy", "judged"), [(0.99, True), (0.975, False)])
def test_a_digits_only_judge_gives_digit_verdicts_only_at_the_bar(accuracy, judged):
    """A judge measured on digits alone is not refused for the scene attributes it never saw; its
    digit verdicts count at or above the bar, and below it the digit prompts go unjudged, with a note."""
    scope, notes = judge_verdict_scope({"heldout_accuracy": {"digit": accuracy}})
    assert scope == {"small_shapes": False, "digits": judged}
    assert any(note.startswith("digit not judged") for note in notes) != judged
