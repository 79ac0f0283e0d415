"""The judge trained through the shared loop reaches its bar; alignment with it; refusals; `eval run` pieces.

One judge is trained per module (the expensive part) and shared by every test here.
"""

from __future__ import annotations

import random
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import load_config
from evals.accuracy import SCENE_ATTRIBUTES
from evals.alignment import alignment
from evals.judge import (
    ACCURACY_BAR,
    JudgeModelConfig,
    JudgeRefused,
    check_card,
    judge_images,
    load_judge,
    read_card,
)
from tests.evals_data import scenes, write_dataset

REPO = Path(__file__).resolve().parents[1]
BARRED = [name for name in SCENE_ATTRIBUTES if name != "shape_small"]


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory):
    from evals import judge_stage

    root = tmp_path_factory.mktemp("judge")
    # The held-out split shows every (colour, shape) pair; the judge's held-out set is other streams.
    train = write_dataset(root / "train", scenes(11, 1024, "heldout"))
    heldout = write_dataset(root / "heldout", scenes(12, 256, "heldout") + scenes(13, 256, "train"))
    config = load_config(
        judge_stage.JudgeStageConfig,
        REPO / "configs" / "judge" / "tiny.toml",
        [
            f"data.manifest='{train}'",
            f"data.validation_manifest='{heldout}'",
            f"run.run_dir='{root / 'run'}'",
            "data.num_workers=0",
        ],
    )
    summary = judge_stage.train(config)
    return {"summary": summary, "config": config, "heldout": heldout, "root": root}


def test_judge_reaches_the_bar_on_held_out_scenes(judge_run):
    summary = judge_run["summary"]
    accuracy = summary["heldout_accuracy"]
    print("judge held-out accuracy:", accuracy)
    first = summary["first_eval"]
    assert first["heldout_acc_colour"] < 0.5  # untrained: the bar is earned by training
    for name in BARRED:
        assert accuracy[name] >= ACCURACY_BAR, (name, accuracy)
    card = read_card(summary["checkpoint"])
    assert card["heldout_accuracy"] == accuracy


def test_judged_alignment_of_the_data_passes_and_of_shuffled_pairs_does_not(judge_run):
    card = read_card(judge_run["summary"]["checkpoint"])
    judge = load_judge(judge_run["summary"]["checkpoint"], judge_run["config"].model, required=BARRED)
    samples = scenes(21, 200, "train") + scenes(22, 200, "heldout")
    images = torch.tensor(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
    verdicts = judge_images(judge, images)
    small_shapes = card["heldout_accuracy"]["shape_small"] >= ACCURACY_BAR
    captions = [s.caption for s in samples]
    report = alignment(captions, verdicts.scenes, verdicts.digits, small_shapes=small_shapes)
    print("alignment of the data itself:", {g: report[g]["prompt"] for g in report})
    for group in ("seen", "heldout"):
        assert report[group]["prompt"]["accuracy"] >= 0.98, report[group]
    random.Random(0).shuffle(captions)
    shuffled = alignment(captions, verdicts.scenes, verdicts.digits, small_shapes=small_shapes)
    assert shuffled["all"]["prompt"]["accuracy"] < 0.1
    assert shuffled["all"]["prompt"]["ci95"][1] < report["all"]["prompt"]["ci95"][0]


def test_a_judge_from_another_config_or_below_the_bar_is_refused(judge_run):
    card = read_card(judge_run["summary"]["checkpoint"])
    other = JudgeModelConfig(**{**card["model"], "cell_features": card["model"]["cell_features"] * 2})
    with pytest.raises(JudgeRefused, match=r"model.cell_features: checkpoint has 32, config says 64"):
        check_card(card, other, BARRED)
    weak = {**card, "heldout_accuracy": {**card["heldout_accuracy"], "colour": 0.9}}
    with pytest.raises(JudgeRefused, match=r"below the 98% bar.*colour 0.9000"):
        check_card(weak, JudgeModelConfig.model_validate(card["model"]), BARRED)
    with pytest.raises(JudgeRefused, match=r"digit \(not measured\)"):
        check_card(card, JudgeModelConfig.model_validate(card["model"]), ["digit"])


def test_feature_extractor_checks_the_input_shape(judge_run):
    from evals.judge import judge_extractor

    judge = load_judge(judge_run["summary"]["checkpoint"], judge_run["config"].model, required=[])
    extractor = judge_extractor(judge)
    with pytest.raises(ValueError, match=r"expects images shaped \(N, 3, H, W\)"):
        extractor(torch.zeros(2, 1, 32, 32))
    assert extractor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, judge.feature_dim)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in ("meta", "img", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()


def test_eval_report_with_a_memorising_model(judge_run, tmp_path, ray_local):
    """`eval run`'s pipeline with a 'model' that returns training images: the probe must say so."""
    from evals.config import EvalConfig
    from evals.report import log_report, metrics_of, render_html
    from evals.run import evaluate, read_train_images
    from trainer.tracking import Tracker, default_tracking_uri, list_artifacts

    train_samples = scenes(31, 128)
    train = write_dataset(tmp_path / "train", train_samples)
    seen = write_dataset(tmp_path / "eval-seen", scenes(32, 64) + train_samples[:8])  # 8 contaminated
    config = EvalConfig.model_validate(
        {
            "data": {"train_manifest": train, "eval_manifests": [seen]},
            "judge": {"checkpoint": judge_run["summary"]["checkpoint"]},
            "features": {"kid_subsets": 5, "kid_subset_size": 32},
        }
    )
    judge = load_judge(judge_run["summary"]["checkpoint"], judge_run["config"].model, required=[])
    card = read_card(judge_run["summary"]["checkpoint"])
    train_images = read_train_images(train)
    memorising = lambda evalset: train_images[: len(evalset.images)].float() / 255
    report, visuals = evaluate(config, judge, card, {"copycat": memorising}, train_images)
    contamination = report["contamination"][seen]
    assert contamination["methods"]["exact"]["flagged"] == 8
    assert contamination["clean_samples"] == 64
    section = report["manifests"][seen]
    assert section["data"]["clean"]["samples"] == 64
    probe = section["models"]["copycat"]["memorisation"]
    assert probe["pixel_fraction_under_threshold"] == 1.0
    assert probe["feature_fraction_over_threshold"] == 1.0
    assert section["data"]["full"]["alignment"]["all"]["prompt"]["accuracy"] >= 0.98
    metrics = metrics_of(report)
    assert metrics["eval0.contamination.exact_rate"] == pytest.approx(8 / 72)
    page = render_html(report, visuals, {"train_manifest_sha256": "abc"})
    parser = _Collect()
    parser.feed(page)
    assert not parser.open and parser.tags.count("table") >= 5 and parser.tags.count("img") >= 2
    with Tracker("evals-test", "report", run_dir=tmp_path / "mlflow") as tracker:
        log_report(tracker, report, visuals, {"train_manifest_sha256": "abc"})
        run_id = tracker.run_id
    artifacts = list_artifacts(default_tracking_uri(), run_id)
    assert {"report.json", "report.html"} <= {Path(a).name for a in artifacts}
