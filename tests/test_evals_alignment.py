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


def test_alignment_score_by_hand():
    """Hand-evaluated scores: extra objects cost as much as missing ones; 1 only for the whole prompt."""
    from evals.alignment import alignment_score
    from evals.scenes import SceneObject

    required = parse_caption("a large red circle to the left of a small blue square")
    circle, square = SceneObject("circle", "red", "large", 1, 0), SceneObject("square", "blue", "small", 1, 2)
    extra = SceneObject("star", "green", "small", 0, 1)
    cases = {
        "truth": ([circle, square], 1.0),
        # objects: (1 + 1) / max(2, 3); relation holds: (2/3 + 1) / 2
        "one extra object": ([circle, square, extra], (2 / 3 + 1) / 2),
        # objects: 1 / 2; no square, so the relation fails: (1/2 + 0) / 2
        "square missing": ([circle], 0.25),
        # the circle agrees on 2 of 3; no fully matching subject for the relation: (5/6 + 0) / 2
        "circle blue": ([SceneObject("circle", "blue", "large", 1, 0), square], 5 / 12),
        "sides swapped": (
            [SceneObject("circle", "red", "large", 1, 2), SceneObject("square", "blue", "small", 1, 0)],
            0.5,
        ),
    }
    for name, (scene, expected) in cases.items():
        assert alignment_score(required, scene, -1) == pytest.approx(expected, abs=1e-12), name
    single = parse_caption("a small red star")
    scattered = [SceneObject("star", "red", "small", 0, 0)] + [
        SceneObject(shape, colour, "large", 2, col)
        for col, (shape, colour) in enumerate([("circle", "blue"), ("square", "green"), ("diamond", "white")])
    ]
    # Scattering objects so that one of them matches scores below one object with a wrong colour.
    assert alignment_score(single, scattered, -1) == pytest.approx(1 / 4)
    assert alignment_score(single, [SceneObject("star", "blue", "small", 0, 0)], -1) == pytest.approx(2 / 3)
    assert alignment_score(parse_caption("a handwritten 7"), [], 7) == 1.0
    assert alignment_score(parse_caption("a handwritten 7"), [], 1) == 0.0


def test_alignment_score_is_one_exactly_for_the_whole_prompt():
    """On perturbed ground-truth scenes, score == 1 iff the per-attribute verdict says ``prompt``."""
    from dataclasses import replace

    from data_pipeline.sources.synthetic import COLOURS, SHAPES
    from evals.alignment import alignment_score, score_image
    from evals.scenes import SceneObject

    rng = random.Random(5)
    seen = {True: 0, False: 0}
    for index in range(300):
        scene = generate_scene(3, index, image_size=32)
        required, objects = parse_caption(scene.caption), scene_from_metadata(scene.metadata)
        edit = rng.choice(["none", "colour", "shape", "drop", "add"])
        if edit in ("colour", "shape"):
            k = rng.randrange(len(objects))
            pool = COLOURS if edit == "colour" else SHAPES
            objects[k] = replace(
                objects[k], **{edit: rng.choice([v for v in pool if v != getattr(objects[k], edit)])}
            )
        elif edit == "drop":
            objects.pop(rng.randrange(len(objects)))
        elif edit == "add":
            free = [
                (r, c) for r in range(3) for c in range(3) if all((o.row, o.col) != (r, c) for o in objects)
            ]
            objects.append(SceneObject("hexagon", "orange", "large", *rng.choice(free)))
        score = alignment_score(required, objects, -1)
        whole = score_image(required, objects, -1)["prompt"]
        assert 0.0 <= score <= 1.0
        assert (score == 1.0) == whole, (scene.caption, edit, objects, score)
        seen[whole] += 1
    assert min(seen.values()) > 30  # both outcomes exercised
