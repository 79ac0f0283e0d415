"""The read path's image decode: libjpeg-turbo (simplejpeg) gives PIL's pixels and PIL's verdicts,
decodes into the caller's preallocated slot, reduces large JPEGs at DCT scale, and reads ingest's raw
``.npy`` pixels without unpickling anything."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline import shard_reader
from data_pipeline.loader import open_loader
from data_pipeline.shard_reader import decode_entry, decode_image
from tests.test_loader import write_dataset
from tests.test_sources import png_header_only


def encode(pixels: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def smooth(size: int, seed: int) -> np.ndarray:
    """A smooth random image (sum of low-frequency waves): what downscaling should preserve."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6.28)
        channels.append(127.5 + 100 * np.sin(6.28 * (fx * x + fy * y) + phase))
    return np.stack(channels, -1).round().astype(np.uint8)


def pil_only(monkeypatch) -> None:
    monkeypatch.setattr(shard_reader, "simplejpeg", None)


@pytest.mark.skipif(shard_reader.simplejpeg is None, reason="simplejpeg not installed")
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_turbo_decodes_the_pixels_pil_does(monkeypatch, subsampling):
    rng = np.random.default_rng()
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), smooth(32, int(rng.integers(1 << 30)))]
    blobs = [encode(image, quality=90, subsampling=subsampling) for image in images]
    blobs.append(encode(images[0][..., 0], quality=90))  # greyscale JPEG: replicated to RGB by both
    turbo = [decode_image(blob, 32) for blob in blobs]
    pil_only(monkeypatch)
    reference = [decode_image(blob, 32) for blob in blobs]
    for got, want in zip(turbo, reference, strict=True):
        # Both are libjpeg-turbo's integer ISLOW IDCT with fancy upsampling: the same integers.
        assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
        np.testing.assert_array_equal(got, want)


def test_decode_writes_into_the_preallocated_slot():
    batch = np.zeros((2, 32, 32, 3), np.uint8)
    blob = encode(smooth(32, 1), quality=95)
    image = decode_image(blob, 32, out=batch[1])
    assert np.shares_memory(image, batch) and batch[1].any() and not batch[0].any()
    np.testing.assert_array_equal(batch[1], np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))


@pytest.mark.parametrize("use_turbo", [True, False])
@pytest.mark.parametrize("train_size", [32, 16, 24])
def test_reduced_size_decode_of_a_larger_stored_image(monkeypatch, use_turbo, train_size):
    """Stored 64 px, trained at less: DCT-scaled decode (to 32/16, then a resize for 24) against the
    float64 area average of the full decode. DCT scaling keeps the low-frequency coefficients, so on a
    smooth image it differs from an area average by rounding and the JPEG's own error: a mean absolute
    difference under 2 levels and no pixel beyond 12 (a 64->32 box average of the same waves differs
    from the ideal low-pass by < 1 level; the rest is quantisation)."""
    if not use_turbo:
        pil_only(monkeypatch)
    blob = encode(smooth(64, 7), quality=95)
    got = decode_image(blob, 64, train_size=train_size)
    assert got.shape == (train_size, train_size, 3) and got.dtype == np.uint8
    full = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).astype(np.float64)
    if 64 % train_size == 0:
        k = 64 // train_size
        reference = full.reshape(train_size, k, train_size, k, 3).mean(axis=(1, 3))
    else:
        reference = np.asarray(
            Image.fromarray(full.round().astype(np.uint8)).resize(
                (train_size, train_size), Image.Resampling.BOX
            )
        ).astype(np.float64)
    error = np.abs(got.astype(np.float64) - reference)
    assert error.mean() < 2.0 and error.max() <= 12


def members(image: bytes, ext: str = "jpg") -> dict:
    return {"__key__": "k", ext: image, "txt": b"caption", "json": b"{}"}


def bad_images() -> dict[str, tuple[bytes, str]]:
    good = encode(smooth(32, 3), quality=90)
    return {
        "garbage": (b"\xff\xd8 not a jpeg at all", "undecodable_image"),
        "truncated": (good[: len(good) // 2], "undecodable_image"),
        "wrong size": (encode(smooth(40, 3)), "wrong_image_size"),
        "huge png": (png_header_only(10000, 10000), "wrong_image_size"),
        "empty": (b"", "undecodable_image"),
    }


@pytest.mark.parametrize("use_turbo", [True, False])
def test_corrupt_images_are_rejected_for_the_same_reason_either_way(monkeypatch, use_turbo):
    if not use_turbo:
        pil_only(monkeypatch)
    for name, (blob, reason) in bad_images().items():
        outcome = decode_entry(members(blob), "shard.tar", 32)
        assert getattr(outcome, "reason", None) == reason, name


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_raw_npy_pixels_need_no_decode_and_are_checked():
    pixels = smooth(32, 5)
    sample = decode_entry(members(npy(pixels), "npy"), "shard.tar", 32)
    np.testing.assert_array_equal(sample.image, pixels)
    assert decode_entry(members(npy(pixels), "npy"), "shard.tar", 32, train_size=16).image.shape == (
        16,
        16,
        3,
    )
    assert decode_entry(members(npy(smooth(40, 5)), "npy"), "s", 32).reason == "wrong_image_size"
    assert decode_entry(members(npy(pixels.astype(np.float32)), "npy"), "s", 32).reason == "undecodable_image"
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle inside: never loaded
    outcome = decode_entry(members(buffer.getvalue(), "npy"), "s", 32)
    assert outcome.reason == "undecodable_image" and "pickle" in outcome.detail.lower()


def test_the_loader_decodes_at_a_smaller_training_size(tmp_path):
    manifest = write_dataset(str(tmp_path), (5,))  # 32 px random-noise JPEGs
    small = next(
        iter(open_loader(manifest, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0, image_size=16))
    )
    full = next(iter(open_loader(manifest, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0)))
    assert small["image"].shape == (4, 3, 16, 16) and small["__key__"] == full["__key__"]
    # Random-noise JPEGs: the DCT-halved decode sits ~11 levels from the 2x2 means of the full decode
    # (noise is all high frequency, which JPEG and the DCT scaling treat differently); plain 2x
    # subsampling of the full decode sits ~36 away, so 20 separates a reduced decode from a subsample.
    pooled = full["image"].double().reshape(4, 3, 16, 2, 16, 2).mean(dim=(3, 5))
    assert (small["image"].double() - pooled).abs().mean() < 20
    with pytest.raises(ValueError, match="image_size must be in"):
        open_loader(manifest, rank=0, world_size=1, batch_size=4, seed=0, image_size=64)
