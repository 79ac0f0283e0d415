"""Caption tokenizer: trained from a manifest's shards, exact round trip, fixed-length padding."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from data_pipeline import storage
from data_pipeline.manifest import Manifest, SourceLineage, save_manifest
from data_pipeline.shards import ShardWriter
from data_pipeline.sources.digits import DigitsSource
from data_pipeline.sources.synthetic import generate_scene
from data_pipeline.tokenizer import iter_captions, load_tokenizer, train_tokenizer


def write_caption_dataset(dest: str, captions: list[str]) -> None:
    """A two-partition dataset written with the ingest's own shard writer (no images needed here)."""
    entries = []
    for partition, chunk in enumerate((captions[: len(captions) // 2], captions[len(captions) // 2 :])):
        writer = ShardWriter(dest, partition, max_bytes=1 << 20, max_samples=64)
        for index, caption in enumerate(chunk):
            key = f"synthetic-{partition:05d}-{index:07d}"
            writer.write(
                key, {"jpg": b"\xff\xd8", "txt": caption.encode(), "json": json.dumps({"key": key}).encode()}
            )
        entries += writer.close()
    manifest = Manifest(
        source=SourceLineage(spec="synthetic", kind="synthetic", seed=0),
        image_size=32,
        num_samples=sum(e.num_samples for e in entries),
        total_bytes=sum(e.bytes for e in entries),
        shards=entries,
    )
    save_manifest(manifest, dest)


@pytest.fixture
def scene_captions() -> list[str]:
    return [generate_scene(0, i, image_size=16).caption for i in range(400)]


def test_trained_tokenizer_round_trips_and_pads(tmp_path, scene_captions):
    dest = str(tmp_path / "ds")
    write_caption_dataset(dest, scene_captions)
    assert list(iter_captions(dest)) == scene_captions
    url = train_tokenizer(storage.join(dest, "manifest.json"), vocab_size=400)
    assert url == storage.join(dest, "tokenizer.json")
    tokenizer = load_tokenizer(dest)
    assert tokenizer.pad_id == 0 and 260 < tokenizer.vocab_size <= 400

    ids = tokenizer.encode_batch(scene_captions[:64], text_len=48)
    assert ids.dtype == torch.long and ids.shape == (64, 48)
    for row, caption in zip(ids, scene_captions[:64]):
        real = row[row != tokenizer.pad_id]
        assert real[0] == tokenizer.bos_id and real[-1] == tokenizer.eos_id
        assert (row[len(real) :] == tokenizer.pad_id).all()  # padding only after the caption
        assert tokenizer.decode(row) == caption
        assert len(real) < len(caption.encode()) / 2  # the merges learned the captions' words
    assert tokenizer.decode_batch(ids[:3]) == scene_captions[:3]

    # Byte-level: text never seen in training still round-trips (lower-cased, NFKC-normalised).
    unseen = "Ein Zebra 🦓 naïvely jumps — über 3 Würfel"
    assert tokenizer.decode(tokenizer.encode_batch([unseen], 64)[0]) == unseen.lower()
    cut = tokenizer.encode_batch([scene_captions[0] * 5], text_len=8)[0]
    assert cut[0] == tokenizer.bos_id and cut[-1] == tokenizer.eos_id and (cut != 0).all()
    with pytest.raises(ValueError, match="text_len"):
        tokenizer.encode_batch(["x"], text_len=1)


def test_tokenizer_on_s3_through_the_cli(s3_moto):
    dest = s3_moto.url("tok")
    captions = [DigitsSource().sample(torch.zeros(8, 8).numpy(), i % 10, 0, i).caption for i in range(200)]
    write_caption_dataset(dest, captions)
    from cluster.commands import tokenizer as command

    parser = argparse.ArgumentParser(prog="tessera")
    command.register(parser.add_subparsers())
    args = parser.parse_args(["tokenizer", "train", "--manifest", dest, "--vocab-size", "320"])
    result = command.run(args)
    assert result["tokenizer"] == storage.join(dest, "tokenizer.json") and result["vocab_size"] <= 320
    tokenizer = load_tokenizer(result["tokenizer"])
    assert [tokenizer.decode(r) for r in tokenizer.encode_batch(captions[:20], 16)] == captions[:20]
