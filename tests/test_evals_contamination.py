"""Contamination index (Ray tasks over shards, incremental) and check: planted duplicates, false positives."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline.sources.base import Sample
from evals.contamination import CheckSettings, check, nearest_cosine
from evals.fingerprints import caption_ngrams, normalise_text
from evals.index import IndexSettings, build_index, fingerprint_samples, load_index
from tests.evals_data import scenes, write_dataset

TRAIN = 256
DISJOINT = 256
PLANTS = 6


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def shift(image: np.ndarray, pixels: int) -> np.ndarray:
    return np.pad(image, ((pixels, 0), (pixels, 0), (0, 0)), mode="edge")[: image.shape[0], : image.shape[1]]


def crop(image: np.ndarray) -> np.ndarray:
    """1 px off every side, resized back (a 2 px crop per axis)."""
    side = image.shape[0]
    return np.asarray(Image.fromarray(image[1:-1, 1:-1]).resize((side, side), Image.BICUBIC))


def decoded(sample: Sample) -> np.ndarray:
    """The training image as the index saw it (after the dataset's JPEG at quality 95)."""
    return jpeg(sample.image, 95)


# Every eval image is stored as JPEG q95 again, like the training set: a copy is the same source pixels
# through the same encoder (identical decoded pixels); the others are altered copies, then re-encoded.
PLANTED = {
    "copy": lambda s: s.image,
    "jpeg70": lambda s: jpeg(decoded(s), 70),
    "shift1": lambda s: shift(decoded(s), 1),
    "shift2": lambda s: shift(decoded(s), 2),
    "crop1": lambda s: crop(decoded(s)),
}
# The method meant to catch each kind of planted duplicate.
MEANT_FOR = {"copy": "exact", "jpeg70": "pixels", "shift1": "pixels", "shift2": "pixels", "crop1": "pixels"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("contamination")
    train_samples = scenes(0, TRAIN)
    train = write_dataset(root / "train", train_samples, shard_samples=64)
    disjoint = scenes(1, DISJOINT)  # another seed: a different scene stream, same distribution
    planted = [
        Sample(image=make(train_samples[i]), caption=f"planted {kind} {i}", metadata={"kind": kind})
        for kind, make in PLANTED.items()
        for i in range(PLANTS)
    ]
    evals = write_dataset(root / "eval", disjoint + planted, shard_samples=64)
    settings = IndexSettings()
    for url in (train, evals):
        build_index(url, settings)
    return {"train": train, "eval": evals, "root": root, "train_samples": train_samples}


def test_eval_equal_to_train_is_fully_flagged(datasets):
    train, _ = load_index(datasets["train"])
    report = check(train, train, CheckSettings())
    assert report["eval_samples"] == TRAIN
    assert report["clean_samples"] == 0
    for name in ("exact", "phash", "pixels", "ngram13", "minhash"):
        assert report["methods"][name]["rate"] == 1.0, name


def test_planted_duplicates_are_caught_and_disjoint_scenes_are_not(datasets):
    train, _ = load_index(datasets["train"])
    evals, _ = load_index(datasets["eval"])
    report = check(train, evals, CheckSettings())
    samples = report["samples"]
    disjoint, planted = samples[:DISJOINT], samples[DISJOINT:]
    for position, sample in enumerate(planted):
        kind = list(PLANTED)[position // PLANTS]
        assert MEANT_FOR[kind] in sample["flagged_by"], (kind, sample)
        assert not sample["clean"]
        assert sample["nearest_train_key"] == f"sample-{position % PLANTS:06d}", (kind, sample)
    # False positives on a disjoint split of the same distribution (measured; see docs/evals.md):
    # exact never collides; pHash and aligned pixels stay near 0 at their chosen radius/threshold.
    rates = {
        name: np.mean([name in s["flagged_by"] for s in disjoint]) for name in ("exact", "phash", "pixels")
    }
    print("false-positive rates on a disjoint split:", json.dumps(rates))
    assert rates["exact"] == 0.0
    assert rates["phash"] <= 0.03
    assert rates["pixels"] <= 0.02
    assert report["clean_samples"] >= DISJOINT * 0.95


def test_index_is_incremental_and_stored_without_pickle(datasets, tmp_path):
    root = tmp_path / "grow"
    first = write_dataset(root, scenes(0, 128), shard_samples=64)
    meta = build_index(first, IndexSettings())
    assert meta["reindexed"] == ["shard-00000-0000.tar", "shard-00000-0001.tar"]
    grown = write_dataset(root, scenes(0, 192), shard_samples=64)  # same first two shards, one new
    meta = build_index(grown, IndexSettings())
    assert meta["reindexed"] == ["shard-00000-0002.tar"]
    assert meta["samples"] == 192
    assert build_index(grown, IndexSettings())["reindexed"] == []
    assert build_index(grown, IndexSettings(phash_size=16))["reindexed"] == sorted(meta["shards"])
    for path in (root / "contamination-index").glob("*.npz"):
        with np.load(path, allow_pickle=False) as arrays:  # raises if anything needs unpickling
            assert {arrays[name].dtype.kind for name in arrays.files} <= {"U", "S", "u", "i", "f"}


def test_undecodable_samples_are_counted_not_fatal_unless_strict(tmp_path, ray_local):
    from evals.index import IndexBuildError

    bad = Sample(image=np.zeros((32, 32, 3), np.uint8), caption="fine", metadata={})
    url = write_dataset(tmp_path / "bad", scenes(0, 8) + [bad], shard_samples=64)
    shard = next((tmp_path / "bad").glob("*.tar"))
    data = shard.read_bytes()
    # Corrupt the last image's JPEG bytes in place (the tar stays well-formed).
    marker = data.rfind(b"\xff\xd8\xff")
    shard.write_bytes(data[: marker + 3] + b"\x00" * 200 + data[marker + 203 :])
    manifest = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(manifest))
    meta = build_index(url, IndexSettings())
    assert meta["samples"] == 8
    assert meta["rejects"] == {"undecodable_image": 1}
    with pytest.raises(IndexBuildError, match="undecodable_image"):
        build_index(url, IndexSettings(phash_size=16), strict=True)


def test_ngram13_matches_a_hand_computed_example():
    train_text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat today"
    # 18 words -> 6 13-grams; this eval text has "a fox", not "brown fox", so no 13 words in a row match.
    evals_text = "Yesterday a fox jumps over the lazy dog while the cat sleeps on the mat"
    grams = caption_ngrams(train_text)
    assert len(grams) == 18 - 13 + 1
    assert grams[2] == "brown fox jumps over the lazy dog while the cat sleeps on the"
    shared = set(caption_ngrams(train_text)) & set(caption_ngrams(evals_text))
    assert shared == set()  # "a fox" vs "brown fox": no 13 consecutive words in common
    evals_text = "Look! Brown fox jumps over the LAZY dog, while the cat sleeps on the sofa"
    assert set(caption_ngrams(train_text)) & set(caption_ngrams(evals_text)) == {grams[2]}
    assert normalise_text("Brown  fox, jumps!") == "brown fox jumps"
    assert caption_ngrams("a small red circle") == ["a small red circle"]  # short: whole caption


def test_caption_with_one_word_changed_is_caught_by_minhash_only():
    captions = [
        "an old stone lighthouse on a rocky cliff at sunset with seagulls circling above",
        "two children flying a bright orange kite over a wide green meadow in spring",
        "a bowl of ramen with a soft boiled egg, spring onions and slices of pork",
        "a red vintage bicycle leaning against a brick wall covered in ivy",
    ]
    evals_captions = [
        "an old stone lighthouse on a rocky cliff at sunrise with seagulls circling above",  # one word
        "a crowded night market with lanterns and food stalls in the rain",
        "snow covered pine trees along a frozen lake under a pale winter sky",
    ]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(7)]
    settings = IndexSettings()
    none = np.zeros((4, 0), np.float32)
    train = fingerprint_samples([f"t{i}" for i in range(4)], images[:4], captions, settings, none)
    evals = fingerprint_samples([f"e{i}" for i in range(3)], images[4:], evals_captions, settings, none[:3])
    report = check(train, evals, CheckSettings())
    assert [s["flagged_by"] for s in report["samples"]] == [["minhash"], [], []]
    assert report["methods"]["ngram13"]["flagged"] == 0  # the change breaks every 13-gram of 14 words


def test_nearest_cosine_matches_brute_force():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2500, 16)).astype(np.float32)  # crosses a block boundary
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    query = rng.normal(size=(7, 3, 16)).astype(np.float32)
    query /= np.linalg.norm(query, axis=-1, keepdims=True)
    best, where = nearest_cosine(query, base)
    full = np.einsum("mkd,nd->mnk", query, base).max(2)
    assert np.allclose(best, full.max(1), atol=1e-6)
    assert (where == full.argmax(1)).all()
