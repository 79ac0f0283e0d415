"""The rank-aware resumable loader: exactly-once per epoch at any world size, across resumes, on bad shards.

Shards are written with the ingest's own ``ShardWriter`` and ``Manifest`` (tiny 32 px images, uneven
shard sizes); damaged shards are built by hand with ``webdataset.TarWriter``. Exactly-once is checked
with ``SampleLedger`` against the keys read back from the tars themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from data_pipeline import storage
from data_pipeline.ledger import SampleLedger, manifest_keys, sample_id
from data_pipeline.loader import LoaderError, derived_seed, merge_states, open_loader
from data_pipeline.loader_plan import intervals_of, merge_intervals, rank_batches
from data_pipeline.manifest import (
    Manifest,
    ManifestError,
    ShardEntry,
    SourceLineage,
    load_manifest,
    save_manifest,
)
from data_pipeline.shards import ShardWriter
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from tests.test_sources import png_header_only

REPO = Path(__file__).resolve().parents[1]

IMAGE_SIZE = 32
UNEVEN = (7, 13, 5, 20, 1, 11)  # 57 samples: no world size or batch size divides the shards evenly


def jpeg(seed: int, size: int = IMAGE_SIZE) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sample_members(key: str, seed: int) -> dict[str, bytes]:
    return {
        "jpg": jpeg(seed),
        "txt": f"a picture number {seed}".encode(),
        "json": json.dumps({"key": key, "n": seed}).encode(),
    }


def write_dataset(dest: str, sizes: tuple[int, ...], extra: list[ShardEntry] = ()) -> Manifest:
    """Good shards of the given sizes through the ingest's ShardWriter, plus ready-made ``extra`` shards."""
    entries = []
    for partition, count in enumerate(sizes):
        writer = ShardWriter(dest, partition, max_bytes=2**30, max_samples=count)
        for i in range(count):
            key = f"s{partition:03d}-{i:05d}"
            writer.write(key, sample_members(key, partition * 1000 + i))
        entries += writer.close()
    entries += list(extra)
    manifest = Manifest(
        source=SourceLineage(spec="test-fixture", kind="test"),
        image_size=IMAGE_SIZE,
        num_samples=sum(e.num_samples for e in entries),
        total_bytes=sum(e.bytes for e in entries),
        shards=entries,
    )
    save_manifest(manifest, dest)
    return load_manifest(dest)


def run_epoch(loaders, ledger: SampleLedger, steps: int | None = None) -> list[int]:
    """Iterate the ranks' loaders in lockstep (as DDP would), recording valid rows; returns batch counts."""
    counts = [0] * len(loaders)
    streams = [iter(loader) for loader in loaders]
    step = 0
    while steps is None or step < steps:
        batches = [next(stream, None) for stream in streams]
        if all(b is None for b in batches):
            break
        for rank, batch in enumerate(batches):
            if batch is not None:
                counts[rank] += 1
                ledger.record(batch, rank=rank, epoch=loaders[rank].epoch)
        step += 1
    for stream in streams:
        stream.close()  # stops the workers, which have prefetched beyond what was consumed
    return counts


def loaders_for(manifest, world_size: int, **kwargs):
    kwargs = {"batch_size": 4, "seed": 7, "num_workers": 0, **kwargs}
    return [open_loader(manifest, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return write_dataset(str(tmp_path_factory.mktemp("uneven")), UNEVEN)


@pytest.fixture(scope="module")
def all_keys(dataset: Manifest) -> set:
    keys = manifest_keys(dataset)
    assert len(keys) == sum(UNEVEN)
    return keys


def test_intervals_merge_and_subtract():
    assert merge_intervals([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert intervals_of(np.array([7, 1, 2, 9, 8, 3])) == [(1, 4), (7, 10)]
    assert intervals_of(np.array([], dtype=np.int64)) == []


@pytest.mark.parametrize(("shuffle", "window_shards"), [(True, 2), (True, 8), (False, 8)])
def test_plan_covers_every_position_once_with_equal_batch_counts(shuffle, window_shards):
    counts = list(UNEVEN)
    consumed = {1: [(2, 9)], 3: [(0, 20)]}
    for world_size in (1, 2, 3, 5, 64):
        plans = [
            rank_batches(
                counts,
                seed=1,
                epoch=0,
                consumed=consumed,
                rank=r,
                world_size=world_size,
                batch_size=4,
                window_shards=window_shards,
                shuffle=shuffle,
            )
            for r in range(world_size)
        ]
        assert len({len(plan) for plan in plans}) == 1
        positions = [
            (int(s), int(i)) for plan in plans for batch in plan for s, i in zip(batch.shard, batch.entry)
        ]
        expected = {(s, i) for s, n in enumerate(counts) for i in range(n)} - {(1, i) for i in range(2, 9)}
        expected -= {(3, i) for i in range(20)}
        assert len(positions) == len(set(positions)) and set(positions) == expected
        assert all(len(batch) <= 4 for plan in plans for batch in plan)


def test_one_epoch_one_rank_exactly_once(dataset, all_keys):
    loader = open_loader(dataset, rank=0, world_size=1, batch_size=8, seed=0, num_workers=2)
    expected_batches = len(loader)
    ledger = SampleLedger()
    batches = 0
    for batch in loader:
        batches += 1
        ledger.record(batch)
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["valid"].dtype == torch.bool and len(batch["caption"]) == 8
        assert all(m["key"] == k for m, k, v in zip(batch["meta"], batch["__key__"], batch["valid"]) if v)
    assert batches == expected_batches == -(-sum(UNEVEN) // 8)
    ledger.check_exactly_once(all_keys, epoch=0)
    assert loader.rejects == {}
    assert len(loader) == 0  # the epoch is spent until set_epoch


def test_decoded_pixels_match_the_jpeg(dataset):
    loader = open_loader(dataset, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0)
    batch = next(iter(loader))
    name, key = sample_id(batch["__url__"][0], batch["__key__"][0])
    partition, index = int(name.split("-")[1]), int(key.split("-")[1])
    reference = np.array(Image.open(io.BytesIO(jpeg(partition * 1000 + index))).convert("RGB"))
    assert torch.equal(batch["image"][0], torch.from_numpy(reference).permute(2, 0, 1))
    assert batch["caption"][0] == f"a picture number {partition * 1000 + index}"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_equal_batches_and_disjoint_samples(dataset, all_keys, world_size):
    loaders = loaders_for(dataset, world_size, batch_size=5, num_workers=2 if world_size == 2 else 0)
    lengths = [len(loader) for loader in loaders]
    ledger = SampleLedger()
    assert run_epoch(loaders, ledger) == lengths == [lengths[0]] * world_size
    ledger.check_exactly_once(all_keys, epoch=0)
    per_rank = ledger.per_rank(0)
    assert max(per_rank.values()) - min(per_rank.values()) <= 1


def test_more_ranks_than_samples_still_agree_on_batch_count(tmp_path):
    manifest = write_dataset(str(tmp_path), (2, 1))
    loaders = loaders_for(manifest, 5, batch_size=2)
    ledger = SampleLedger()
    assert run_epoch(loaders, ledger) == [1] * 5
    ledger.check_exactly_once(manifest_keys(manifest), epoch=0)


def key_order(manifest, seed: int, epoch: int) -> list[str]:
    loader = open_loader(manifest, rank=0, world_size=1, batch_size=16, seed=seed, epoch=epoch, num_workers=0)
    return [key for batch in loader for key, valid in zip(batch["__key__"], batch["valid"]) if valid]


def test_permutation_is_seeded_and_changes_per_epoch(dataset):
    first = key_order(dataset, seed=3, epoch=0)
    assert first == key_order(dataset, seed=3, epoch=0)
    assert first != key_order(dataset, seed=3, epoch=1)
    assert first != key_order(dataset, seed=4, epoch=0)
    assert sorted(first) == sorted(key_order(dataset, seed=3, epoch=1))


def test_set_epoch_starts_a_fresh_epoch(dataset, all_keys):
    loader = open_loader(dataset, rank=0, world_size=1, batch_size=16, seed=0, num_workers=0)
    ledger = SampleLedger()
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for batch in loader:
            ledger.record(batch, epoch=epoch)
        ledger.check_exactly_once(all_keys, epoch=epoch)


@pytest.mark.parametrize(
    ("before", "stop_step", "after"),
    [(2, 3, 3), (3, 2, 1), (1, 5, 2), (2, 1, 2), (3, 0, 2), (2, 6, 1)],
)
def test_resume_any_world_size_is_exactly_once(dataset, all_keys, before, stop_step, after):
    ledger = SampleLedger()
    old = loaders_for(dataset, before, batch_size=3, num_workers=2)
    run_epoch(old, ledger, steps=stop_step)
    # What a checkpoint holds: the all-gathered rank states, through JSON.
    saved = json.loads(json.dumps([loader.state_dict() for loader in old]))
    new = loaders_for(dataset, after, batch_size=3, num_workers=2, seed=999)
    for loader in new:
        loader.load_state_dict(merge_states(saved))
    assert len({len(loader) for loader in new}) == 1
    counts = run_epoch(new, ledger)
    assert len(set(counts)) == 1
    ledger.check_exactly_once(all_keys, epoch=0)
    # A second resume from the new ranks' states has nothing left to read.
    final = merge_states([loader.state_dict() for loader in new])
    assert sum(hi - lo for ivs in final["consumed"].values() for lo, hi in ivs) == sum(UNEVEN)


def test_state_reflects_consumed_batches_not_prefetched(dataset):
    loader = open_loader(dataset, rank=0, world_size=1, batch_size=4, seed=0, num_workers=2)
    stream = iter(loader)
    next(stream)
    next(stream)
    state = loader.state_dict()
    stream.close()
    assert sum(hi - lo for ivs in state["consumed"].values() for lo, hi in ivs) == 8


def test_state_from_another_dataset_is_refused(dataset, tmp_path):
    other = write_dataset(str(tmp_path), (3,))
    state = open_loader(other, rank=0, world_size=1, batch_size=2, seed=0, num_workers=0).state_dict()
    loader = open_loader(dataset, rank=0, world_size=1, batch_size=2, seed=0, num_workers=0)
    with pytest.raises(LoaderError, match="3 samples"):
        loader.load_state_dict(state)
    with pytest.raises(LoaderError, match="disagree on epoch"):
        merge_states([loader.state_dict(), {**loader.state_dict(), "epoch": 1}])


def test_tokenizer_url_gives_text_of_the_right_shape(dataset, tmp_path):
    url = train_tokenizer(
        dataset.location, vocab_size=300, min_frequency=1, out_url=str(tmp_path / "tok.json")
    )
    loader = open_loader(
        dataset, rank=0, world_size=1, batch_size=6, seed=0, num_workers=2, tokenizer=url, text_len=9
    )
    reference = load_tokenizer(url)
    for batch in loader:
        assert batch["text"].shape == (6, 9) and batch["text"].dtype == torch.long
        assert torch.equal(batch["text"], reference.encode_batch(batch["caption"], 9))
    with pytest.raises(ValueError, match="text_len"):
        open_loader(dataset, rank=0, world_size=1, batch_size=6, seed=0, tokenizer=reference)


def hostile_shard(dest: Path, name: str, samples: list[tuple[str, dict[str, bytes]]]) -> ShardEntry:
    path = dest / name
    with webdataset.TarWriter(str(path)) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    return entry_for(path, len(samples))


def entry_for(path: Path, num_samples: int) -> ShardEntry:
    data = path.read_bytes()
    return ShardEntry(
        name=path.name,
        url=str(path),
        num_samples=num_samples,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        partition=int(path.name.split("-")[1]),
    )


def escaping_shard(dest: Path, name: str, good_key: str) -> ShardEntry:
    """One good sample with hostile members before, inside and after it: ``../escape.jpg``, a
    ``../<key>.txt`` between its own jpg and txt, and an absolute ``/etc/evil.jpg``. Hostile members
    belong to no sample, so the shard holds one entry and the good sample survives them."""
    path = dest / name
    good = sample_members(good_key, 1)
    with tarfile.open(path, "w") as tar:
        for member, data in [
            ("../escape.jpg", jpeg(2)),
            (f"{good_key}.jpg", good["jpg"]),
            (f"../{good_key}.txt", b"escaped"),
            (f"{good_key}.txt", good["txt"]),
            (f"{good_key}.json", good["json"]),
            ("/etc/evil.jpg", jpeg(3)),
        ]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return entry_for(path, 1)


def fixture_keys(sizes: dict[int, int]) -> list[tuple[str, str]]:
    """The sample ids ``write_dataset`` gives partition ``p`` with ``n`` samples, in tar order."""
    return [(f"shard-{p:05d}-0000.tar", f"s{p:03d}-{i:05d}") for p, n in sizes.items() for i in range(n)]


@pytest.fixture
def damaged(tmp_path) -> Manifest:
    """Two good shards, a shard with an undecodable jpg and a missing caption, one with escaping member
    names, and one truncated inside its 4th of 6 samples."""
    good = tmp_path / "good"
    whole = write_dataset(str(tmp_path / "whole"), (0, 0, 0, 0, 6))
    data = Path(whole.shard_url(whole.shards[0])).read_bytes()
    good.mkdir()
    truncated = good / "shard-00004-0000.tar"
    truncated.write_bytes(data[: len(data) * 55 // 100])
    extra = [
        hostile_shard(
            good,
            "shard-00002-0000.tar",
            [
                ("bad-jpg", {"jpg": b"\xff\xd8 not a jpeg at all", "txt": b"broken", "json": b"{}"}),
                ("no-caption", {"jpg": jpeg(5), "json": b"{}"}),
                ("fine-2", sample_members("fine-2", 6)),
            ],
        ),
        escaping_shard(good, "shard-00003-0000.tar", "fine-3"),
        entry_for(truncated, 6),
    ]
    return write_dataset(str(good), (4, 3), extra)


def test_bad_input_is_skipped_and_counted(damaged):
    loaders = loaders_for(damaged, 2, batch_size=4, num_workers=2)
    ledger = SampleLedger()
    counts = run_epoch(loaders, ledger)
    assert counts[0] == counts[1]
    delivered = ledger.delivered(0)
    assert max(delivered.values()) == 1
    cut = fixture_keys({4: 6})
    kept = [key for key in cut if key in delivered]
    assert 1 <= len(kept) <= 4 and kept == cut[: len(kept)]  # the samples before the cut, nothing after
    intact = {
        *fixture_keys({0: 4, 1: 3}),
        ("shard-00002-0000.tar", "fine-2"),
        ("shard-00003-0000.tar", "fine-3"),
    }
    assert set(delivered) == intact | set(kept)
    rejects = Counter(loaders[0].reject_counts()) + Counter(loaders[1].reject_counts())
    assert rejects == {
        "undecodable_image": 1,
        "missing_caption": 1,
        "unsafe_member": 3,
        "truncated_tar": 6 - len(kept),
    }


@pytest.mark.parametrize(
    ("shard", "names"),
    [
        ("shard-00002-0000.tar", "'bad-jpg': undecodable_image"),
        ("shard-00003-0000.tar", "member '../escape.jpg': unsafe_member"),
        ("shard-00004-0000.tar", "'s004-00003': truncated_tar \\(unexpected end of data\\)"),
    ],
)
def test_strict_raises_naming_shard_and_key(damaged, shard, names):
    only = damaged.model_copy(update={"shards": [s for s in damaged.shards if s.name == shard]})
    only._location = damaged.location
    loader = open_loader(
        only, rank=0, world_size=1, batch_size=8, seed=0, num_workers=1, strict=True, shuffle=False
    )  # tar order: the first bad sample of the shard is the one named
    with pytest.raises(LoaderError, match=f"strict loader: shard .*{shard}: (sample )?{names}"):
        list(loader)


def test_ledger_reports_missing_and_duplicates(dataset, all_keys):
    loader = open_loader(dataset, rank=0, world_size=1, batch_size=8, seed=0, num_workers=0)
    batches = list(loader)
    ledger = SampleLedger()
    for batch in batches[1:] + batches[-1:]:
        ledger.record(batch)
    assert len(ledger.missing(all_keys, 0)) == int(batches[0]["valid"].sum())
    assert set(ledger.duplicates(0)) == {
        sample_id(u, k)
        for u, k, v in zip(batches[-1]["__url__"], batches[-1]["__key__"], batches[-1]["valid"])
        if v
    }
    with pytest.raises(AssertionError, match="missing.*duplicated"):
        ledger.check_exactly_once(all_keys, epoch=0)


def upload(manifest: Manifest, url: str) -> Manifest:
    """Copy a local dataset to object storage; shard names resolve beside the manifest there."""
    for entry in manifest.shards:
        storage.publish_file(manifest.shard_url(entry), storage.join(url, entry.name))
    save_manifest(manifest.model_copy(), url)  # a copy: saving re-points the manifest's location
    return load_manifest(url)


def test_epoch_from_moto_resumed_across_world_sizes(s3_moto, dataset, all_keys):
    remote = upload(dataset, s3_moto.url("loader"))
    assert remote.shard_url(remote.shards[0]).startswith("s3://")
    ledger = SampleLedger()
    old = loaders_for(remote, 2, batch_size=4, num_workers=2)
    run_epoch(old, ledger, steps=2)
    state = merge_states([loader.state_dict() for loader in old])
    new = loaders_for(remote.location, 3, batch_size=4, num_workers=1)
    for loader in new:
        loader.load_state_dict(state)
    run_epoch(new, ledger)
    ledger.check_exactly_once(all_keys, epoch=0)


@pytest.mark.slow
def test_epoch_from_ceph_two_ranks_exactly_once(s3_ceph, dataset, all_keys):
    remote = upload(dataset, s3_ceph.url("loader"))
    assert os.environ["AWS_ENDPOINT_URL"] == s3_ceph.endpoint
    ledger = SampleLedger()
    loaders = loaders_for(remote.location, 2, batch_size=8, num_workers=2)
    counts = run_epoch(loaders, ledger, steps=3)
    resumed = loaders_for(remote.location, 1, batch_size=8, num_workers=2)
    resumed[0].load_state_dict([loader.state_dict() for loader in loaders])
    counts = [a + b for a, b in zip_longest(counts, run_epoch(resumed, ledger), fillvalue=0)]
    ledger.check_exactly_once(all_keys, epoch=0)
    assert ledger.delivered(0).keys() == manifest_keys(remote)


@pytest.mark.parametrize(
    "name", ["../../../../etc/passwd", "/etc/passwd", "s3://elsewhere/x.tar", "a/../../b"]
)
def test_manifest_shard_names_must_stay_inside_the_dataset(dataset, tmp_path, name):
    data = json.loads(dataset.to_bytes())
    data["shards"][2]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"field 'shards\.2\.name'.*shard name '{re.escape(name)}'"):
        load_manifest(str(tmp_path))


def copy_dataset(manifest: Manifest, dest: Path) -> Manifest:
    dest.mkdir()
    for entry in manifest.shards:
        (dest / entry.name).write_bytes(Path(manifest.shard_url(entry)).read_bytes())
    save_manifest(manifest.model_copy(), str(dest))
    return load_manifest(str(dest))


def test_a_missing_shard_is_found_before_the_first_batch(dataset, tmp_path):
    copy = copy_dataset(dataset, tmp_path / "copy")
    os.remove(copy.shard_url(copy.shards[3]))
    Path(copy.shard_url(copy.shards[1])).write_bytes(b"cut")
    with pytest.raises(
        LoaderError,
        match=r"2 shard\(s\) missing or of the wrong size.*"
        r"shard-00001-0000.tar: 3 bytes.*shard-00003-0000.tar: missing",
    ):
        open_loader(copy, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0)


def test_a_shard_read_whole_is_checked_against_its_sha256(dataset, tmp_path):
    copy = copy_dataset(dataset, tmp_path / "copy")
    damaged = Path(copy.shard_url(copy.shards[1]))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside image data: same size, still a valid tar
    damaged.write_bytes(bytes(data))
    with pytest.raises(LoaderError, match=r"strict loader: shard .*shard-00001-0000.tar: checksum_mismatch"):
        list(open_loader(copy, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0, strict=True))
    loader = open_loader(copy, rank=0, world_size=1, batch_size=4, seed=0, num_workers=1)
    ledger = SampleLedger()
    run_epoch([loader], ledger)
    assert loader.reject_counts() == {"checksum_mismatch": UNEVEN[1]}
    assert sum(ledger.delivered(0).values()) == sum(UNEVEN) - UNEVEN[1]


def test_an_image_too_large_is_rejected_from_its_header(tmp_path):
    dest = tmp_path / "huge"
    dest.mkdir()
    huge = hostile_shard(
        dest, "shard-00001-0000.tar", [("huge", {"jpg": png_header_only(10000, 10000), "txt": b"big"})]
    )
    manifest = write_dataset(str(dest), (2,), [huge])
    loader = open_loader(manifest, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0)
    list(loader)
    assert loader.reject_counts() == {"wrong_image_size": 1}  # not undecodable_image: never decoded


LOADER_CHILD = """
import os, sys, time
import torch
from data_pipeline.loader import open_loader

class StallingTokenizer:
    # Stands in for a worker stuck in a slow call (a read from a hung store): once the flag file
    # exists, every call blocks. torch's own parent watchdog runs only between batches, so it never
    # sees the parent die; only PR_SET_PDEATHSIG ends such a worker.
    def encode_batch(self, captions, text_len):
        while os.path.exists(sys.argv[2]):
            time.sleep(1)
        return torch.zeros(len(captions), text_len, dtype=torch.long)

loader = open_loader(sys.argv[1], rank=0, world_size=1, batch_size=1, seed=0, num_workers=2,
                     tokenizer=StallingTokenizer(), text_len=4)
stream = iter(loader)  # kept referenced: the workers live as long as the iterator
next(stream)
open(sys.argv[2], "w").close()
print(os.getpid(), flush=True)
sys.stdin.read()  # hold the workers until killed
"""


def test_workers_die_when_the_training_process_is_killed(dataset, tmp_path):
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", LOADER_CHILD, dataset.location, str(tmp_path / "stall")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        pid = int(proc.stdout.readline())
        workers = psutil.Process(pid).children()
        assert len(workers) == 2
        os.kill(pid, signal.SIGKILL)  # as the OOM killer or a preempted node would
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=30)  # torch's watchdog would take 5 s, if it ran
        assert not alive, f"DataLoader workers outlived their parent: {[p.pid for p in alive]}"
    finally:
        proc.kill()


def training_trace(loader, steps: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What a training loop would see: each batch's images and the next draw of its own torch RNG."""
    trace = []
    for batch in loader:
        trace.append((batch["image"], torch.rand(3)))
        if steps is not None and len(trace) == steps:
            break
    return trace


def test_resume_with_workers_is_bit_identical(dataset):
    options = dict(rank=0, world_size=1, batch_size=4, seed=3, num_workers=2)
    torch.manual_seed(11)
    uninterrupted = training_trace(open_loader(dataset, **options))

    torch.manual_seed(11)
    first = open_loader(dataset, **options)
    head = training_trace(first, steps=5)
    saved_loader, saved_rng = json.loads(json.dumps(first.state_dict())), torch.get_rng_state()
    resumed = open_loader(dataset, **options)
    resumed.load_state_dict(saved_loader)
    torch.set_rng_state(saved_rng)
    trace = head + training_trace(resumed)

    assert len(trace) == len(uninterrupted)
    for (images, draw), (images_ref, draw_ref) in zip(trace, uninterrupted, strict=True):
        assert torch.equal(images, images_ref) and torch.equal(draw, draw_ref)
    assert derived_seed(3, 0, 0, 1) not in {
        derived_seed(3, 0, 0, 0),
        derived_seed(3, 1, 0, 1),
        derived_seed(3, 0, 1, 1),
    }
