"""Prompt alignment: the caption parser against the source's own metadata, scoring, intervals."""

from __future__ import annotations

import random

import pytest
from scipy.stats import binomtest

from data_pipeline.sources.digits import DigitsSource
from data_pipeline.sources.synthetic import INVERSE, contains_heldout, generate_scene
from evals.accuracy import wilson_interval
from evals.alignment import CaptionError, alignment, parse_caption
from evals.scenes import CELL_OF_POSITION, scene_from_metadata


def canonical(objects: list[dict], relation: str | None) -> tuple:
    """Objects as a sorted tuple, the relation as (left/above subject, relation, object).

    "a left of b" and "b right of a" are the same caption text under two templates of the source,
    so slot order is not recoverable from text; their meaning (this canonical form) is.
    """
    items = [(o["shape"], o["colour"], o["size"]) for o in objects]
    statement = None
    if relation is not None:
        subject, obj = items[0], items[1]
        statement = (
            (subject, relation, obj)
            if relation in ("left of", "above")
            else (obj, INVERSE[relation], subject)
        )
    return tuple(sorted(items)), statement


def test_parser_recovers_every_caption_of_the_source():
    """Every caption the source writes parses back to the objects and relation it stored."""
    for split in ("train", "heldout"):
        for index in range(200):
            scene = generate_scene(5, index, image_size=32, split=split)
            meta = scene.metadata
            required = parse_caption(scene.caption)
            expected = canonical(meta["objects"], (meta["relation"] or {}).get("relation"))
            assert canonical(list(required.objects), required.relation) == expected, scene.caption
            if "{where}" in meta["template"]:
                assert required.position == CELL_OF_POSITION[meta["objects"][0]["position"]]
            assert required.heldout == contains_heldout(meta)


def test_parser_reads_digit_captions_and_refuses_free_text():
    source = DigitsSource(image_size=32)
    for sample in source.read(source.partitions(1, 50)[0]):
        assert parse_caption(sample[1].caption).digit == sample[1].metadata["label"]
    for text in ("a small red circle near a large blue square", "a tiny red circle", "a cat"):
        with pytest.raises(CaptionError, match="not produced by the synthetic or digits grammar"):
            parse_caption(text)


def test_ground_truth_scenes_align_and_shuffled_pairs_do_not():
    """With the true scene as the 'judge', alignment is 100%; shuffled captions score near chance."""
    samples = [generate_scene(6, i, image_size=32, split=s) for s in ("train", "heldout") for i in range(300)]
    captions = [s.caption for s in samples]
    truth = [scene_from_metadata(s.metadata) for s in samples]
    report = alignment(captions, truth, [-1] * len(samples))
    assert report["all"]["prompt"]["accuracy"] == 1.0
    assert report["seen"]["prompt"]["total"] + report["heldout"]["prompt"]["total"] == len(samples)
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    mixed = alignment(shuffled, truth, [-1] * len(samples))
    # Chance of a random caption matching a random scene whole is well under 5%.
    assert mixed["all"]["prompt"]["accuracy"] < 0.05
    assert mixed["all"]["colour"]["accuracy"] < 0.5


def test_wilson_interval_covers_like_scipy():
    # Oracle: scipy's binomtest(...).proportion_ci(method="wilson") (independent implementation).
    for k, n in ((0, 10), (7, 10), (98, 100), (500, 500), (1, 3)):
        expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson_interval(k, n)
        assert low == pytest.approx(expected.low, abs=1e-9)
        assert high == pytest.approx(expected.high, abs=1e-9)


def test_unjudged_attributes_are_neither_scored_nor_matched():
    """A judge below the bar on small shapes / digits: those verdicts are left out, not guessed."""
    from dataclasses import replace

    scene = generate_scene(7, 3, image_size=32)
    while not any(o["size"] == "small" for o in scene.metadata["objects"]):
        scene = generate_scene(7, scene.metadata["index"] + 1, image_size=32)
    truth = scene_from_metadata(scene.metadata)
    wrong = [
        replace(o, shape="star" if o.shape != "star" else "circle") if o.size == "small" else o for o in truth
    ]
    strict = alignment([scene.caption], [wrong], [-1])
    lenient = alignment([scene.caption], [wrong], [-1], small_shapes=False)
    assert strict["all"]["prompt"]["accuracy"] == 0.0
    assert lenient["all"]["prompt"]["accuracy"] == 1.0
    assert "shape" not in lenient["all"] or lenient["all"]["shape"]["accuracy"] == 1.0
    digits = alignment(["a handwritten 7", scene.caption], [[], truth], [7, -1], digits=False)
    assert digits["unjudged"]["digit_prompt"]["total"] == 1
    assert digits["all"]["prompt"]["total"] == 1
