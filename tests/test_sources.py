"""Sources: synthetic determinism and held-out exclusion, caption truth, digits, external formats."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from data_pipeline import storage
from data_pipeline.sources import (
    HELDOUT_COMBINATIONS,
    DigitsSource,
    ExternalSource,
    Rejected,
    Sample,
    SyntheticSource,
    open_source,
)
from data_pipeline.sources.synthetic import (
    COLOURS,
    RELATIONS,
    SHAPES,
    contains_heldout,
    generate_scene,
    phrase,
)
from data_pipeline.validate import decode


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def records(source, num_partitions: int = 3, num_samples: int | None = None) -> list[tuple[int, object]]:
    return [item for part in source.partitions(num_partitions, num_samples) for item in source.read(part)]


def test_synthetic_scene_is_a_pure_function_of_seed_split_and_index():
    first = generate_scene(7, 123, image_size=32)
    again = generate_scene(7, 123, image_size=32)
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    assert first.metadata == again.metadata
    assert not np.array_equal(first.image, generate_scene(8, 123, image_size=32).image)
    assert not np.array_equal(first.image, generate_scene(7, 123, image_size=32, split="heldout").image)
    # Reading a partition in a worker gives exactly the scenes a direct call gives.
    source = SyntheticSource(image_size=32, seed=7)
    parts = source.partitions(4, 200)
    assert [p.items for p in parts] == [(0, 50), (50, 100), (100, 150), (150, 200)]
    for index, sample in source.read(parts[2]):
        if index in (100, 149):
            assert np.array_equal(sample.image, generate_scene(7, index, image_size=32).image)
    assert first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8


def test_train_split_never_holds_a_heldout_combination_and_heldout_always_does():
    train = [generate_scene(0, i, image_size=16).metadata for i in range(2000)]
    assert not any(contains_heldout(meta) for meta in train)
    seen = {(o["colour"], o["shape"]) for meta in train for o in meta["objects"]}
    # Everything except the held-out pairs shows up: the split removes exactly the declared pairs.
    assert seen == {(c, s) for c in COLOURS for s in SHAPES} - set(HELDOUT_COMBINATIONS)
    assert {meta["relation"]["relation"] for meta in train if meta["relation"]} == set(RELATIONS)
    assert {len(meta["objects"]) for meta in train} == {1, 2, 3}
    heldout = [generate_scene(0, i, image_size=16, split="heldout").metadata for i in range(300)]
    assert all(contains_heldout(meta) for meta in heldout)
    assert {meta["split"] for meta in heldout} == {"heldout"}


def test_caption_names_every_object_and_the_relation_is_true_of_the_picture():
    for index in range(300):
        sample = generate_scene(1, index, image_size=64)
        meta, caption = sample.metadata, sample.caption
        for obj in meta["objects"]:
            assert phrase(obj) in caption, (caption, obj)
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # Every shape covers its centre: the pixel there has the named colour (fill jitter is
            # +-15 per channel, pixel noise sigma 3, so 15 + 5 sigma = 30 is a safe bound).
            centre = sample.image[int((y0 + y1) / 2), int((x0 + x1) / 2)].astype(int)
            assert np.abs(centre - np.array(COLOURS[obj["colour"]])).max() <= 30, (caption, obj, centre)
        if meta["relation"] is None:
            assert len(meta["objects"]) == 1
            continue
        subject, other = meta["objects"][0], meta["objects"][1]
        relation = meta["relation"]["relation"]
        inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
        assert (
            f"{phrase(subject)} {RELATIONS[relation]} {phrase(other)}" in caption
            or f"{phrase(other)} {RELATIONS[inverse]} {phrase(subject)}" in caption
            or f"{phrase(subject)} is {RELATIONS[relation]} {phrase(other)}" in caption
        ), caption
        sx0, sy0, sx1, sy1 = subject["bbox"]
        ox0, oy0, ox1, oy1 = other["bbox"]
        holds = {"left of": sx1 <= ox0, "right of": sx0 >= ox1, "above": sy1 <= oy0, "below": sy0 >= oy1}
        assert holds[relation], (caption, subject, other)


def test_synthetic_needs_a_sample_count_and_a_known_split():
    with pytest.raises(ValueError, match="unbounded"):
        SyntheticSource().partitions(2, None)
    with pytest.raises(ValueError, match="split"):
        SyntheticSource(split="test")


def test_digits_are_real_sklearn_digits_with_matching_captions():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    source = DigitsSource(image_size=32, seed=3)
    items = records(source, num_partitions=3, num_samples=120)
    assert [index for index, _ in items] == list(range(120))
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    labels = set()
    for _, sample in items:
        label = sample.metadata["label"]
        labels.add(label)
        assert label == targets[sample.metadata["sklearn_index"]]
        assert re.search(rf"\b({label}|{words[label]})\b", sample.caption), sample.caption
        assert sample.image.size == (32, 32) and sample.image.mode == "RGB"
    assert labels == set(range(10))  # the seeded order mixes classes
    assert len({s.metadata["sklearn_index"] for _, s in items}) == 120
    with pytest.raises(ValueError, match="1797"):
        source.partitions(2, 5000)


def test_digits_skip_carves_disjoint_slices_of_one_seeded_order():
    """skip=k reads scans k.. of the same order (same scans, captions, indices), so slices never overlap."""
    whole = records(DigitsSource(image_size=16, seed=3), num_partitions=2, num_samples=60)
    head, tail = (
        records(DigitsSource(image_size=16, seed=3, skip=skip), num_partitions=3, num_samples=count)
        for skip, count in ((0, 25), (25, 35))
    )
    assert [i for i, _ in head + tail] == [i for i, _ in whole]
    for (_, a), (_, b) in zip(head + tail, whole):
        assert a.metadata == b.metadata and a.caption == b.caption
    assert not {s.metadata["sklearn_index"] for _, s in head} & {s.metadata["sklearn_index"] for _, s in tail}
    last = DigitsSource(seed=3, skip=1790)
    assert len(records(last, num_partitions=2)) == 7  # all that is left after the skip
    with pytest.raises(ValueError, match="7 after skip=1790; asked for 8"):
        last.partitions(1, 8)
    assert open_source("digits", skip=5).skip == 5
    with pytest.raises(ValueError, match="skip=5 exists only for the digits source"):
        open_source("synthetic", skip=5)


def make_folder(root, names_and_seeds: dict[str, int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, seed in names_and_seeds.items():
        (root / f"{name}.jpg").write_bytes(jpeg_bytes(seed))
        (root / f"{name}.txt").write_text(f"caption of {name}")


def test_folder_source_pairs_images_with_captions_and_metadata(tmp_path):
    make_folder(tmp_path / "data", {"a": 1, "b": 2, "c": 3})
    (tmp_path / "data" / "b.json").write_text(json.dumps({"license": "cc0"}))
    Image.new("RGB", (20, 20)).save(tmp_path / "data" / "orphan.png")  # no caption file
    source = open_source(str(tmp_path / "data"))
    assert isinstance(source, ExternalSource) and source.kind == "folder"
    items = records(source, num_partitions=2)
    assert [index for index, _ in items] == [0, 1, 2, 3]
    by_caption = {rec.caption: rec for _, rec in items if isinstance(rec, Sample)}
    assert set(by_caption) == {"caption of a", "caption of b", "caption of c"}
    assert by_caption["caption of b"].metadata["license"] == "cc0"
    assert by_caption["caption of a"].image == jpeg_bytes(1)
    rejected = [rec for _, rec in items if isinstance(rec, Rejected)]
    assert [r.reason for r in rejected] == ["missing_caption"] and "orphan" in rejected[0].detail
    assert len(records(source, num_partitions=2, num_samples=2)) == 2


def write_wds(path, samples: list[tuple[str, bytes, str]]) -> None:
    with open(path, "wb") as handle, webdataset.TarWriter(handle) as writer:
        for key, image, caption in samples:
            writer.write({"__key__": key, "jpg": image, "txt": caption, "json": json.dumps({"key": key})})


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_wds_shards_are_read_and_hostile_members_or_truncation_become_rejects(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_wds(shards / "00000.tar", [(f"{i:09d}", jpeg_bytes(i), f"photo {i}") for i in range(4)])
    with tarfile.open(shards / "00001.tar", "w") as archive:
        add_member(archive, "000000010.jpg", jpeg_bytes(10))
        add_member(archive, "000000010.txt", b"fine")
        add_member(archive, "../evil.jpg", jpeg_bytes(11))
        add_member(archive, "/etc/evil.txt", b"absolute")
        link = tarfile.TarInfo("000000012.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    write_wds(tmp_path / "whole.tar", [(f"{i:09d}", jpeg_bytes(20 + i), f"cut {i}") for i in range(6)])
    whole = (tmp_path / "whole.tar").read_bytes()
    (shards / "00002.tar").write_bytes(whole[: len(whole) // 2])  # cut on a block boundary
    (shards / "00003.tar").write_bytes(whole[: len(whole) // 2 + 700])  # cut inside a member

    source = open_source(str(shards))
    assert source.kind == "wds" and len(source.files) == 4
    items = records(source, num_partitions=3)
    samples = [rec for _, rec in items if isinstance(rec, Sample)]
    reasons = sorted(rec.reason for _, rec in items if isinstance(rec, Rejected))
    assert [s.caption for s in samples[:5]] == ["photo 0", "photo 1", "photo 2", "photo 3", "fine"]
    assert samples[0].metadata["key"] == "000000000" and samples[0].image == jpeg_bytes(0)
    assert reasons.count("unsafe_member") == 3 and reasons.count("corrupt_shard") == 2
    # The samples before the cut survive; the one being read when the shard ended is lost with it.
    assert 2 <= len([s for s in samples if s.caption.startswith("cut")]) < 12
    with pytest.raises(ValueError, match="num_samples"):
        source.partitions(2, 10)


def test_parquet_rows_with_image_bytes_and_captions(tmp_path):
    table = pa.table(
        {
            "jpg": [jpeg_bytes(i) for i in range(5)] + [None],
            "caption": [f"row {i}" for i in range(5)] + ["no image"],
            "width": list(range(6)),
        }
    )
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    hf_style = pa.table({"image": [{"bytes": jpeg_bytes(9), "path": "x.jpg"}], "text": ["hf row"]})
    pq.write_table(hf_style, tmp_path / "hf.parquet")
    source = open_source(str(tmp_path / "part.parquet"))
    assert source.kind == "parquet"
    items = records(source, num_partitions=2)
    assert [i for i, _ in items] == list(range(6))
    assert [r.caption for _, r in items[:5]] == [f"row {i}" for i in range(5)]
    assert items[3][1].metadata["width"] == 3 and items[3][1].image == jpeg_bytes(3)
    assert isinstance(items[5][1], Rejected) and items[5][1].reason == "missing_image"
    assert len(records(source, num_partitions=2, num_samples=3)) == 3
    ((hf_index, hf_record),) = records(open_source(str(tmp_path / "hf.parquet")), num_partitions=1)
    assert hf_record.caption == "hf row" and hf_record.image == jpeg_bytes(9)
    pq.write_table(pa.table({"pixels": [b"x"], "caption": ["c"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="image column"):
        open_source(str(tmp_path / "bad.parquet")).partitions(1, None)


def test_open_source_picks_the_kind_and_refuses_what_it_cannot_read(tmp_path):
    assert open_source("synthetic", split="heldout").split == "heldout"
    assert open_source("digits").kind == "digits"
    with pytest.raises(ValueError, match="only for the synthetic"):
        open_source("digits", split="heldout")
    (tmp_path / "notes.md").write_text("nothing here")
    with pytest.raises(ValueError, match="no \\*.tar"):
        open_source(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "missing"))


def test_every_external_format_reads_from_s3(s3_moto, tmp_path):
    make_folder(tmp_path / "data", {"x": 5, "y": 6})
    write_wds(tmp_path / "00000.tar", [("000000000", jpeg_bytes(7), "from a shard")])
    pq.write_table(pa.table({"jpg": [jpeg_bytes(8)], "caption": ["from parquet"]}), tmp_path / "rows.parquet")
    url = s3_moto.url("external")
    for path in sorted((tmp_path / "data").iterdir()):
        storage.write_bytes_atomic(storage.join(url, "folder", path.name), path.read_bytes())
    storage.write_bytes_atomic(
        storage.join(url, "shards", "00000.tar"), (tmp_path / "00000.tar").read_bytes()
    )
    storage.write_bytes_atomic(storage.join(url, "rows.parquet"), (tmp_path / "rows.parquet").read_bytes())

    folder = open_source(storage.join(url, "folder"))
    assert folder.kind == "folder" and all(f.startswith("s3://") for f in folder.files)
    assert sorted(rec.caption for _, rec in records(folder, num_partitions=2)) == [
        "caption of x",
        "caption of y",
    ]
    shards = open_source(storage.join(url, "shards", "*.tar"))
    assert shards.kind == "wds" and [r.caption for _, r in records(shards)] == ["from a shard"]
    rows = open_source(storage.join(url, "rows.parquet"))
    assert rows.kind == "parquet" and [r.image for _, r in records(rows)] == [jpeg_bytes(8)]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` and whose pixel data is missing: PIL sizes it from
    the header, and any attempt to decode it fails, so the reject reason tells which happened first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_hostile_folder_pipes_links_big_files_and_huge_headers_are_rejected_unread(tmp_path):
    root = tmp_path / "hostile"
    make_folder(root, {"good": 1})
    outside = tmp_path / "outside"
    make_folder(outside, {"secret": 2})
    os.mkfifo(root / "pipe.jpg")  # reading it would block forever waiting for a writer
    (root / "pipe.txt").write_text("a pipe")
    (root / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    (root / "zero.txt").write_text("endless")
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "escape.txt").write_text("a link out of the folder")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)  # never walked into
    (root / "inside.jpg").symlink_to(root / "good.jpg")  # a link that stays inside is fine
    (root / "inside.txt").write_text("linked inside")
    (root / "big.jpg").write_bytes(jpeg_bytes(3) + bytes(5000))
    (root / "big.txt").write_text("over the cap")
    source = open_source(str(root), max_file_bytes=4096)
    assert not any("secret" in url for url in source.files)
    outcomes = {
        rec.metadata["source_file"].rsplit("/", 1)[-1] if isinstance(rec, Sample) else rec.reason
        for _, rec in records(source)
    }
    assert outcomes == {
        "good.jpg",
        "inside.jpg",
        "not_a_regular_file",
        "outside_source",
        "file_too_large",
    }
    # A 10000x10000 PNG is refused from its header: the data is never decoded (it has none to decode).
    assert decode(png_header_only(10000, 10000), max_pixels=2**26).reason == "image_too_large"
    assert decode(png_header_only(64, 64), max_pixels=2**26).reason == "undecodable"
