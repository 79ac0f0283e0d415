"""Prompt alignment: does an image show what its caption asks for, attribute by attribute?

A caption is parsed back into what it requires with the synthetic source's own grammar (its
templates, object phrases, relation and position phrases, and the digits source's templates), by
exact full-string match; a caption the grammar cannot produce is an error, never a guess. The judge
describes the image (``evals.judge.judge_images``); each required object is matched to the detected
object that agrees with it on most attributes (distinct objects, best assignment by brute force over
at most 3 objects), then every attribute is scored. Results split into prompts naming a held-out
(colour, shape) pair and prompts that do not, each with a Wilson 95% interval.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.sources import digits, synthetic
from evals.accuracy import wilson_interval
from evals.scenes import CELL_OF_POSITION, SceneObject, relation_holds

OBJECT_ATTRIBUTES = ("shape", "colour", "size")
ALIGNMENT_ATTRIBUTES = (*OBJECT_ATTRIBUTES, "position", "relation", "count", "digit", "prompt")


class CaptionError(ValueError):
    """A caption the known grammar does not produce."""


@dataclass(frozen=True)
class Requirements:
    objects: tuple[dict[str, str], ...] = ()  # shape, colour, size
    position: tuple[int, int] | None = None  # of objects[0], when the caption says where it is
    relation: str | None = None  # objects[0] <relation> objects[1]
    digit: int | None = None

    @property
    def heldout(self) -> bool:
        return any((o["colour"], o["shape"]) in synthetic.HELDOUT_COMBINATIONS for o in self.objects)


def _alternation(words) -> str:
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


def _object_pattern(name: str) -> str:
    return (
        f"a (?P<{name}_size>{_alternation(synthetic.SIZES)}) "
        f"(?P<{name}_colour>{_alternation(synthetic.COLOURS)}) "
        f"(?P<{name}_shape>{_alternation(synthetic.SHAPES)})"
    )


WHERE = {synthetic.where_phrase(position): cell for position, cell in CELL_OF_POSITION.items()}
RELATION_OF_PHRASE = {phrase: relation for relation, phrase in synthetic.RELATIONS.items()}


def _compile(template: str) -> re.Pattern[str]:
    """A caption template -> a full-match regex with one named group per slot."""
    pattern = re.escape(template)
    slots = {
        "a": _object_pattern("a"),
        "b": _object_pattern("b"),
        "c": _object_pattern("c"),
        "rel": f"(?P<rel>{_alternation(RELATION_OF_PHRASE)})",
        "where": f"(?P<where>{_alternation(WHERE)})",
        "digit": "(?P<digit>[0-9])",
        "word": f"(?P<word>{_alternation(digits.NUMBER_WORDS)})",
    }
    for slot, regex in slots.items():
        pattern = pattern.replace(re.escape("{" + slot + "}"), regex)
    return re.compile(pattern)


@functools.cache
def _grammar() -> list[re.Pattern[str]]:
    # "{b} {inv} {a}" writes exactly the text "{a} {rel} {b}" writes for the inverse relation, so it
    # parses as that (the same requirement with the roles named the other way round); leave it out.
    pairs = [template for template in synthetic.PAIR_TEMPLATES if "{inv}" not in template]
    templates = [
        *synthetic.SINGLE_TEMPLATES,
        *pairs,
        *(third.replace("{pair}", pair) for third in synthetic.THIRD_TEMPLATES for pair in pairs),
        *digits.TEMPLATES,
    ]
    return [_compile(template) for template in templates]


def parse_caption(caption: str) -> Requirements:
    """What ``caption`` requires of an image, per the synthetic and digits grammars."""
    for pattern in _grammar():
        match = pattern.fullmatch(caption)
        if match:
            return _requirements(match.groupdict())
    raise CaptionError(f"caption not produced by the synthetic or digits grammar: {caption!r}")


def _requirements(groups: dict[str, str | None]) -> Requirements:
    if groups.get("digit") or groups.get("word"):
        return Requirements(
            digit=int(groups["digit"]) if groups.get("digit") else digits.NUMBER_WORDS.index(groups["word"])
        )
    objects = tuple(
        {attribute: groups[f"{slot}_{attribute}"] for attribute in OBJECT_ATTRIBUTES}
        for slot in "abc"
        if groups.get(f"{slot}_shape")
    )
    relation = RELATION_OF_PHRASE[groups["rel"]] if groups.get("rel") else None
    position = WHERE[groups["where"]] if groups.get("where") else None
    return Requirements(objects=objects, position=position, relation=relation)


def _agreement(wanted: dict[str, str], found: SceneObject) -> int:
    return sum(getattr(found, name) == value for name, value in wanted.items())


def judged(obj: dict[str, str], small_shapes: bool) -> dict[str, str]:
    """The attributes of a required object the judge can verify (small shapes only if it passed on them)."""
    return obj if small_shapes or obj["size"] != "small" else {k: v for k, v in obj.items() if k != "shape"}


def _best_match(objects: tuple[dict[str, str], ...], scene: list[SceneObject]) -> list[SceneObject | None]:
    """Distinct detected objects for the required ones, agreeing on the most attributes in total."""
    if not objects:
        return []
    padded: list[SceneObject | None] = list(scene) + [None] * len(objects)
    best, best_score = None, -1
    for choice in itertools.permutations(range(len(padded)), len(objects)):
        score = sum(_agreement(o, padded[i]) for o, i in zip(objects, choice) if padded[i] is not None)
        if score > best_score:
            best, best_score = [padded[i] for i in choice], score
    return best


def _position_shown(matched: list[SceneObject | None], position: tuple[int, int]) -> bool:
    return matched[0] is not None and (matched[0].row, matched[0].col) == position


def _relation_shown(scene: list[SceneObject], objects: tuple[dict[str, str], ...], relation: str) -> bool:
    """The relation holds between some pair of detected objects that fully match subject and object."""
    subjects = [s for s in scene if s.matches(objects[0])]
    others = [s for s in scene if s.matches(objects[1])]
    return any(s is not o and relation_holds(s, o, relation) for s in subjects for o in others)


def score_image(
    required: Requirements, scene: list[SceneObject], digit: int, *, small_shapes: bool = True
) -> dict[str, bool]:
    """Attribute -> satisfied, for the attributes this prompt requires and the judge can verify.

    ``small_shapes=False`` (a judge below the bar on small objects' shapes) leaves the shape of small
    objects unjudged: neither scored nor used to match objects.
    """
    if required.digit is not None:
        return {"digit": digit == required.digit, "prompt": digit == required.digit}
    objects = tuple(judged(o, small_shapes) for o in required.objects)
    matched = _best_match(objects, scene)
    verdict: dict[str, bool] = {}
    for attribute in OBJECT_ATTRIBUTES:
        hits = [
            m is not None and getattr(m, attribute) == o[attribute]
            for o, m in zip(objects, matched)
            if attribute in o
        ]
        if hits:
            verdict[attribute] = all(hits)
    whole = [m is not None and m.matches(o) for o, m in zip(objects, matched)]
    if required.position is not None:
        verdict["position"] = _position_shown(matched, required.position)
    if required.relation is not None:
        verdict["relation"] = _relation_shown(scene, objects, required.relation)
    verdict["count"] = len(scene) == len(required.objects)
    verdict["prompt"] = all(whole) and all(verdict.values())
    return verdict


def alignment_score(
    required: Requirements, scene: list[SceneObject], digit: int, *, small_shapes: bool = True
) -> float:
    """How much of the prompt an image shows, in [0, 1]; 1 exactly when ``score_image`` says ``prompt``.

    The labeller's (and the reranker's) graded score. Objects are scored like precision and recall at
    once: each required object's share of agreeing attributes with its match, summed and divided by
    ``max(required, detected)``, so drawing extra objects (which gives the matching more chances) costs
    as much as leaving one out; the relation and the position, where asked for, are one term each, and
    the score is the mean of the terms. A share of the per-attribute verdicts instead pays for
    scattering objects: each extra one is another chance for a required object to find its match.
    """
    if required.digit is not None:
        return float(digit == required.digit)
    objects = tuple(judged(o, small_shapes) for o in required.objects)
    matched = _best_match(objects, scene)
    agreement = sum(_agreement(o, m) / len(o) for o, m in zip(objects, matched) if m is not None)
    terms = [agreement / max(len(objects), len(scene))]
    if required.relation is not None:
        terms.append(float(_relation_shown(scene, objects, required.relation)))
    if required.position is not None:
        terms.append(float(_position_shown(matched, required.position)))
    return sum(terms) / len(terms)


@dataclass
class AlignmentReport:
    counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # group -> attribute -> [ok, n]

    def add(self, group: str, verdict: dict[str, bool]) -> None:
        for name, ok in verdict.items():
            tally = self.counts.setdefault(group, {}).setdefault(name, [0, 0])
            tally[0] += int(ok)
            tally[1] += 1

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """group -> attribute -> accuracy, counts and Wilson 95% interval."""
        return {
            group: {
                name: {
                    "accuracy": ok / n,
                    "correct": ok,
                    "total": n,
                    "ci95": list(wilson_interval(ok, n)),
                }
                for name, (ok, n) in sorted(attributes.items())
            }
            for group, attributes in sorted(self.counts.items())
        }


def alignment(
    captions: list[str],
    scenes: list[list[SceneObject]],
    digit_guesses: list[int],
    *,
    small_shapes: bool = True,
    digits: bool = True,
) -> dict[str, Any]:
    """Alignment of judged images with their captions: groups ``all``, ``seen`` and ``heldout``.

    ``digits=False`` (a judge not measured or below the bar on digits) skips digit prompts; they are
    counted under ``unjudged``.
    """
    if not len(captions) == len(scenes) == len(digit_guesses):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} judged images")
    report = AlignmentReport()
    for caption, scene, digit in zip(captions, scenes, digit_guesses):
        required = parse_caption(caption)
        if required.digit is not None and not digits:
            report.add("unjudged", {"digit_prompt": False})
            continue
        verdict = score_image(required, scene, digit, small_shapes=small_shapes)
        report.add("all", verdict)
        if required.digit is None:
            report.add("heldout" if required.heldout else "seen", verdict)
    return report.summary()
