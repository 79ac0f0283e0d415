"""Sample-level shuffle: quality on a synthetic manifest, order a pure function of (seed, epoch, world
size, consumed set), same-world-size resume continuing the uninterrupted order (0 and 2 workers), and
shard windows fetched as one byte range per shard per window, never one per sample, and once per rank
whatever its number of DataLoader workers."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import scipy.stats

from data_pipeline import shard_reader, tar_index
from data_pipeline.ledger import SampleLedger, manifest_keys
from data_pipeline.loader import merge_states, open_loader
from data_pipeline.loader_plan import Positions, rank_batches
from data_pipeline.shuffle_quality import plan_quality, spearman_rho, uniform_distinct
from tests.test_loader import hostile_shard, run_epoch, sample_members, write_dataset

EQUAL = [128] * 16  # 2,048 samples in 16 equal shards: a synthetic manifest for the quality figures


def test_spearman_matches_scipy_on_fresh_permutations():
    rng = np.random.default_rng()
    for n in (2, 17, 1000):
        x, y = rng.permutation(n), rng.permutation(n)
        # float64 rank sums over <= 1000 items: agreement to ~1e-12; 1e-9 leaves room for summation order.
        assert spearman_rho(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-9)
    assert spearman_rho(np.arange(50), np.arange(50) * 3) == pytest.approx(1.0)


@pytest.mark.parametrize(("world_size", "window_shards"), [(1, 16), (2, 8), (4, 4)])
def test_quality_when_a_window_covers_the_rank(world_size, window_shards):
    """One window per rank: delivery order uncorrelated with tar order, and a batch of 64 draws on
    every shard of the window. A uniform batch of 64 from k equal shards misses one with probability
    about k (1 - 1/k)^64 (0.0015 for k = 8), so the mean lies above 0.99 min(8, k); rho over n >= 512
    samples has a standard deviation of about 1/sqrt(n) <= 0.044, and these seeds sit well inside 0.05."""
    shuffled = plan_quality(EQUAL, batch_size=64, world_size=world_size, window_shards=window_shards)
    streamed = plan_quality(
        EQUAL, batch_size=64, world_size=world_size, window_shards=window_shards, shuffle=False
    )
    in_window = shuffled["shards_per_window_max"]
    assert in_window == window_shards
    assert shuffled["mean_distinct_shards_per_batch"] >= 0.99 * min(8, in_window)
    assert shuffled["mean_distinct_target"] == min(8, in_window)
    assert abs(shuffled["spearman_rho"]) <= 0.05
    assert abs(shuffled["spearman_rho_vs_streaming"]) <= 0.05
    # The figures see what the issue measured on the old loader: a batch from one or two shards.
    assert streamed["mean_distinct_shards_per_batch"] <= 2 and streamed["spearman_rho_vs_streaming"] == 1.0


def test_quality_with_several_windows_per_rank():
    quality = plan_quality(EQUAL, batch_size=64, world_size=1, window_shards=4)
    assert quality["shards_per_window_max"] == 4
    assert quality["mean_distinct_shards_per_batch"] >= 0.99 * quality["mean_distinct_target"] >= 0.99 * 4


def test_uniform_ceiling_matches_the_hypergeometric_oracle():
    rng = np.random.default_rng()
    for _ in range(20):
        sizes = rng.integers(1, 300, size=rng.integers(1, 12)).tolist()
        batch = int(rng.integers(1, 128))
        total, draw = sum(sizes), min(batch, sum(sizes))
        oracle = sum(1 - scipy.stats.hypergeom.pmf(0, total, n, draw) for n in sizes)
        # lgamma differences of numbers <= ~3,600 lose ~1e-12 relative; 1e-9 is far above that.
        assert uniform_distinct(sizes, batch) == pytest.approx(oracle, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("world_size", [2, 4])
def test_split_shards_mix_as_well_as_uniform_draws_from_their_windows(world_size):
    """Ranks whose pieces cut shards hold small fragments that no shuffle can put in every batch: the
    plan's distinct shards per batch still reaches the uniform-draw ceiling of its windows (within 2%:
    the mean over 8-16 batches of a sum of Bernoullis, sd ~1% here) while tar order stays far below."""
    counts = [231, 232, 49] * 3 + [230, 230, 52]  # the tiny set's shards (bench/results/shuffle_quality.json)
    shuffled = plan_quality(counts, batch_size=64, world_size=world_size, window_shards=8)
    ordered = plan_quality(counts, batch_size=64, world_size=world_size, window_shards=8, shuffle=False)
    assert shuffled["mean_distinct_shards_per_batch"] >= 0.98 * shuffled["mean_distinct_uniform"]
    assert ordered["mean_distinct_shards_per_batch"] < 0.5 * ordered["mean_distinct_uniform"]


def order(counts, **kwargs) -> list[tuple[int, int]]:
    batches = rank_batches(counts, consumed={}, rank=0, world_size=1, batch_size=8, **kwargs)
    every = Positions.concat(batches)
    return list(zip(every.shard.tolist(), every.entry.tolist(), strict=True))


def test_order_within_a_window_is_seeded_by_seed_and_epoch():
    """One shard: the shard permutation cannot change the order, only the window's own permutation can."""
    first = order([40], seed=3, epoch=0)
    assert first == order([40], seed=3, epoch=0)
    assert first != order([40], seed=3, epoch=1)
    assert first != order([40], seed=4, epoch=0)
    assert sorted(first) == sorted(order([40], seed=3, epoch=1)) == [(0, i) for i in range(40)]
    assert order([40], seed=3, epoch=0, shuffle=False) == [(0, i) for i in range(40)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("shuffle")), (9, 14, 6, 11, 3, 17))


def keys_by_rank(loaders, steps: int | None = None) -> list[list[str]]:
    """Valid keys each rank delivers, in order, stepping the ranks in lockstep."""
    delivered = [[] for _ in loaders]
    streams = [iter(loader) for loader in loaders]
    step = 0
    while steps is None or step < steps:
        batches = [next(stream, None) for stream in streams]
        if all(batch is None for batch in batches):
            break
        for rank, batch in enumerate(batches):
            delivered[rank] += [k for k, v in zip(batch["__key__"], batch["valid"].tolist()) if v]
        step += 1
    for stream in streams:
        stream.close()
    return delivered


def loaders(manifest, world_size, workers, **kwargs):
    options = {"batch_size": 4, "seed": 5, "num_workers": workers, "window_shards": 2, **kwargs}
    return [open_loader(manifest, rank=r, world_size=world_size, **options) for r in range(world_size)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("world_size", "stop"), [(1, 3), (2, 2), (3, 4)])
def test_same_world_size_resume_continues_the_uninterrupted_order(dataset, workers, world_size, stop):
    uninterrupted = keys_by_rank(loaders(dataset, world_size, workers))
    first = loaders(dataset, world_size, workers)
    head = keys_by_rank(first, steps=stop)
    saved = json.loads(json.dumps([loader.state_dict() for loader in first]))
    resumed = loaders(dataset, world_size, workers, seed=0)  # the state's seed wins
    for loader in resumed:
        loader.load_state_dict(merge_states(saved))
    tail = keys_by_rank(resumed)
    assert [h + t for h, t in zip(head, tail, strict=True)] == uninterrupted
    assert any(len(set(key.split("-")[0] for key in keys[:4])) > 1 for keys in uninterrupted)  # mixed


def test_loader_delivers_the_plan_order_mixed_within_windows(dataset):
    counts = [entry.num_samples for entry in dataset.shards]
    [delivered] = keys_by_rank(loaders(dataset, 1, 2, window_shards=3))
    batches = rank_batches(
        counts,
        seed=5,
        epoch=0,
        consumed={},
        rank=0,
        world_size=1,
        batch_size=4,
        window_shards=3,
        shuffle=True,
    )
    every = Positions.concat(batches)
    assert delivered == [f"s{s:03d}-{e:05d}" for s, e in zip(every.shard.tolist(), every.entry.tolist())]
    [streamed] = keys_by_rank(loaders(dataset, 1, 0, shuffle=False))
    assert sorted(streamed) == sorted(delivered) and streamed != delivered
    for shard in {key.split("-")[0] for key in streamed}:  # shuffle=False: each shard front to back
        mine = [key for key in streamed if key.startswith(shard)]
        assert mine == sorted(mine)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shuffled_resume_across_world_sizes_is_exactly_once(dataset, world_size):
    ledger = SampleLedger()
    old = loaders(dataset, world_size, 2, window_shards=3)
    run_epoch(old, ledger, steps=3)
    state = merge_states([loader.state_dict() for loader in old])
    new = loaders(dataset, 5 - world_size, 0, window_shards=3)
    for loader in new:
        loader.load_state_dict(state)
    run_epoch(new, ledger)
    ledger.check_exactly_once(manifest_keys(dataset), epoch=0)


def test_one_ranged_read_per_shard_per_window(dataset, monkeypatch):
    """Each window's shards are fetched with one byte range each (or whole, checksummed, when the
    window covers the shard), whatever the batch size: never one read per sample."""
    ranged, whole = [], []
    read_range, read_shard = shard_reader.read_range, shard_reader.read_shard
    monkeypatch.setattr(
        shard_reader, "read_range", lambda url, a, b: ranged.append((url, a, b)) or read_range(url, a, b)
    )
    monkeypatch.setattr(shard_reader, "read_shard", lambda url: whole.append(url) or read_shard(url))
    world = loaders(dataset, 3, 0, window_shards=2, batch_size=2)
    plans = [Positions.concat(loader._batches) for loader in world]
    expected = sum(len({(w, s) for w, s in zip(p.window.tolist(), p.shard.tolist())}) for p in plans)
    keys_by_rank(world)
    assert len(ranged) + len(whole) == expected
    assert ranged and whole  # shards split between ranks are read by range, the others whole
    assert len(ranged) + len(whole) < dataset.num_samples // 4


def test_two_workers_fetch_each_window_shard_once(dataset, tmp_path, monkeypatch):
    """Forked workers log every store read to one file: a rank with two workers reads each (window,
    shard) once, as one worker does, delivers the plan order, and leaves no shared files behind."""
    log = tmp_path / "reads.log"
    read_range, read_shard = shard_reader.read_range, shard_reader.read_shard

    def logged(kind, read):
        def wrapper(url, *span):
            with open(log, "a") as handle:  # O_APPEND: one line per read from any process
                handle.write(f"{kind} {url} {span}\n")
            return read(url, *span)

        return wrapper

    monkeypatch.setattr(shard_reader, "read_range", logged("range", read_range))
    monkeypatch.setattr(shard_reader, "read_shard", logged("whole", read_shard))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tempfile.tempdir)
    [two] = loaders(dataset, 1, 2, window_shards=3)
    plan = Positions.concat(two._batches)
    [delivered] = keys_by_rank([two])
    expected = len(set(zip(plan.window.tolist(), plan.shard.tolist(), strict=True)))
    assert len(log.read_text().splitlines()) == expected
    assert delivered == [f"s{s:03d}-{e:05d}" for s, e in zip(plan.shard.tolist(), plan.entry.tolist())]
    assert os.listdir(tempfile.tempdir) == []  # the share directory went with the iteration


def test_a_shard_without_an_index_is_indexed_on_first_read_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(tar_index.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(tar_index, "_MEMORY", {})
    dest = tmp_path / "plain"
    dest.mkdir()
    plain = hostile_shard(
        dest, "shard-00001-0000.tar", [(f"k{i}", sample_members(f"k{i}", i)) for i in range(6)]
    )
    manifest = write_dataset(str(dest), (0,), [plain])
    assert manifest.shards[-1].index is None
    first = open_loader(manifest, rank=0, world_size=2, batch_size=2, seed=0, num_workers=0)
    list(first)  # rank 0 reads half the shard, but must read it whole once to index it
    assert (tmp_path / "cache" / f"{plain.sha256}{tar_index.INDEX_SUFFIX}").exists()
    monkeypatch.setattr(tar_index, "_MEMORY", {})
    monkeypatch.setattr(
        shard_reader, "read_shard", lambda url: pytest.fail("read whole despite the cached index")
    )
    second = open_loader(manifest, rank=1, world_size=2, batch_size=2, seed=0, num_workers=0)
    assert sum(int(batch["valid"].sum()) for batch in second) == 3
