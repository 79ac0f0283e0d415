"""Benchmark: decoded samples/s and CPU per sample from an S3 store, Tessera's loader against its peers.

Starts its own single-node Ceph RGW (``infra/object-store-ceph.sh``; a moto server in a subprocess if
the Ceph binaries are missing, which the output then says), ingests a synthetic dataset into it with
the real ``data_pipeline.ingest`` and reads it, one full epoch per measurement, with

- ``webdataset``: ``webdataset.WebDataset(urls).decode("torchrgb8").to_tuple("jpg", "txt")`` in a torch
  DataLoader with ``batch_size`` (what a user would write; s3 opened through one s3fs per worker). It
  decodes to uint8, like Tessera's loader, so the headline ratio compares loaders, not dtypes;
- ``webdataset-float``: the same with ``decode("torchrgb")`` (float32 in [0, 1]), webdataset's usual
  recipe, as a second row;
- ``tessera``: ``data_pipeline.loader.open_loader(...)`` (rank 0 of 1, its default sample-level
  shuffle), and ``tessera-ordered``: the same with ``shuffle=False`` (what the shuffle costs);
- ``streaming`` (``--streaming``): mosaic ``StreamingDataset`` over an MDS copy of the same samples
  that the bench writes to the same bucket (same JPEG bytes; shuffle on, a cold local cache per
  epoch), PIL decode to uint8, plain DataLoader; it runs in its own venv (``bench/peers.py``,
  ``bench/streaming_peer.py``) since its pins clash with Tessera's;
- ``ray-data`` (``--ray-data``): ``ray.data.read_webdataset`` over pyarrow's S3 filesystem, ``iter_batches``
  on a local Ray with ``num_cpus`` = workers (started before the clock).

each with 1 and 2 workers, repeats interleaved, medians reported (the best repeat is in the JSON; each
repeat records the 1-minute load average, and ``--note`` says what else shared the machine). CPU
time per sample is that of every loader process (this one, its DataLoader workers, the streaming peer
and its workers, the Ray cluster and its workers: ``bench/cpu_meter.py``; the store's daemons are
reported beside it), the cost measure that predicts many-core scaling and that contention on a
shared machine does not move. Ratios come from the same run: each loader / webdataset (uint8) at
each worker count, CPU the other way round, and 2-worker / (2 x 1-worker) scaling efficiency.
Writes ``bench/results/loader.json``.
Usage: ``python bench/loader.py [--samples 4000] [--batch-size 64] [--streaming] [--ray-data]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import webdataset  # noqa: E402

from bench.cpu_meter import tree_cpu_seconds  # noqa: E402
from bench.object_store import BUCKET, pids_of, start_store, stop_store, store_cpu_seconds, use_store  # noqa: E402
from bench.peers import peer_python, peer_version  # noqa: E402
from data_pipeline.loader import open_loader  # noqa: E402
from data_pipeline.manifest import Manifest, load_manifest  # noqa: E402

BASELINE_DECODES = {
    "webdataset": "torchrgb8",
    "webdataset-float": "torchrgb",
}  # the headline decodes to uint8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-samples", type=int, default=500, help="samples per shard at ingest")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray-data", action="store_true", help="add a Ray Data read_webdataset row")
    parser.add_argument("--streaming", action="store_true", help="add a mosaic StreamingDataset row")
    parser.add_argument("--note", default="", help="conditions of the run, kept in the JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loader.json")
    return parser.parse_args(argv)


def ingest_dataset(dest: str, args: argparse.Namespace) -> Manifest:
    """The real ingest (Ray tasks writing shards to S3), then Ray is shut down before anything is timed."""
    from cluster.runtime import init_ray, shutdown_ray
    from data_pipeline.ingest import ingest

    init_ray("local", num_cpus=2)
    try:
        ingest(
            "synthetic",
            dest,
            num_samples=args.samples,
            image_size=args.image_size,
            partitions=max(1, args.samples // args.shard_samples),
            shard_max_samples=args.shard_samples,
            progress=False,
        )
    finally:
        shutdown_ray()
    return load_manifest(dest)


@functools.lru_cache(maxsize=1)
def _s3fs_for(pid: int):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def _baseline_open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    """The s3 handler a user gives webdataset: one s3fs per worker process, default buffering."""
    return _s3fs_for(os.getpid()).open(url, mode)


def _register_baseline_s3(_worker_id: int = 0) -> None:
    webdataset.gopen_schemes["s3"] = _baseline_open_s3


class Clock:
    """Wall time and loader CPU (``tree_cpu_seconds`` less the store) of the span an epoch marks."""

    def __init__(self, store_pids: list[int]) -> None:
        self.exclude = frozenset(store_pids)
        self.seconds = self.cpu = 0.0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        cpu, started = tree_cpu_seconds(self.exclude), time.perf_counter()
        yield
        self.seconds = time.perf_counter() - started
        self.cpu = tree_cpu_seconds(self.exclude) - cpu


def epoch_webdataset(manifest: Manifest, batch_size: int, workers: int, clock: Clock, decode: str) -> int:
    _register_baseline_s3()
    with clock.running():
        dataset = webdataset.WebDataset(manifest.shard_urls(), shardshuffle=False).decode(decode)
        dataset = dataset.to_tuple("jpg", "txt")
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=_register_baseline_s3
        )
        return sum(len(images) for images, _ in loader)


def epoch_tessera(manifest: Manifest, batch_size: int, workers: int, clock: Clock, shuffle: bool) -> int:
    with clock.running():
        options = {"batch_size": batch_size, "num_workers": workers, "shuffle": shuffle}
        loader = open_loader(manifest, rank=0, world_size=1, seed=0, **options)
        return sum(int(batch["valid"].sum()) for batch in loader)


class StreamingPeer:
    """mosaic streaming in its own venv: the MDS copy is written once, then one epoch per call."""

    def __init__(self, manifest: Manifest, remote: str) -> None:
        env = {**os.environ, "S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
        self.remote = remote
        self.process = subprocess.Popen(
            [str(peer_python("streaming")), str(ROOT / "bench" / "streaming_peer.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ask({})  # its "ready" line: imports done
        converted = self.ask({"op": "convert", "shards": manifest.shard_urls(), "remote": remote})
        if converted["samples"] != manifest.num_samples:
            raise RuntimeError(f"MDS copy holds {converted['samples']} of {manifest.num_samples} samples")

    def ask(self, request: dict) -> dict:
        if request:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the streaming peer exited with {self.process.wait()}")
        return json.loads(line)

    def epoch(self, manifest: Manifest, batch_size: int, workers: int, clock: Clock) -> int:
        request = {"op": "epoch", "remote": self.remote, "batch_size": batch_size, "workers": workers}
        with clock.running():
            return self.ask(request)["samples"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def epoch_ray_data(manifest: Manifest, batch_size: int, workers: int, clock: Clock) -> int:
    """Ray Data on a local Ray with ``workers`` CPUs (starting Ray is not timed; an epoch is).

    pyarrow ignores AWS_ENDPOINT_URL, so the endpoint is passed in.
    """
    import ray
    from pyarrow import fs as pafs

    from cluster.runtime import init_ray, shutdown_ray

    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    filesystem = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
    )
    paths = [url.removeprefix("s3://") for url in manifest.shard_urls()]
    init_ray("local", num_cpus=workers)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with clock.running():
            dataset = ray.data.read_webdataset(paths, filesystem=filesystem)
            return sum(len(batch["jpg"]) for batch in dataset.iter_batches(batch_size=batch_size))
    finally:
        shutdown_ray()


def timed(
    epoch: Callable[[Manifest, int, int, Clock], int],
    manifest: Manifest,
    batch: int,
    workers: int,
    store_pids: list[int],
):
    """One epoch: worker start-up included (every epoch pays it), store, peer and cluster start-up not.

    CPU is every loader process's (``Clock``); the object store's own CPU (it shares the cores) is
    reported beside it.
    """
    clock = Clock(store_pids)
    store_before = store_cpu_seconds(store_pids)
    samples = epoch(manifest, batch, workers, clock)
    store_cpu = store_cpu_seconds(store_pids) - store_before
    return {
        "samples": samples,
        "seconds": round(clock.seconds, 3),
        "samples_per_s": round(samples / clock.seconds, 1),
        "cpu_us_per_sample": round(clock.cpu * 1e6 / samples, 1),
        "store_cpu_us_per_sample": round(store_cpu * 1e6 / samples, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def summarise(runs: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """Median throughput and CPU cost per (loader, workers), with ratios from the same run.

    ``vs_webdataset``: median samples/s over the baseline's at the same worker count;
    ``cpu_vs_webdataset``: the baseline's CPU per sample over this loader's; ``vs_streaming``: median
    samples/s over mosaic streaming's at the same worker count (when it ran); ``scaling_efficiency``:
    median samples/s at N workers over N x the median at 1 worker. The best repeat is kept beside it.
    """

    def median(slot: tuple[str, int], field: str) -> float | None:
        values = [r[field] for r in runs[slot] if r[field] is not None]
        return round(statistics.median(values), 1) if values else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    rows = []
    for name, workers in runs:
        rate = median((name, workers), "samples_per_s")
        cpu = median((name, workers), "cpu_us_per_sample")
        base, streaming = ("webdataset", workers), ("streaming", workers)
        single = median((name, 1), "samples_per_s") if (name, 1) in runs and workers > 1 else None
        rows.append(
            {
                "loader": name,
                "workers": workers,
                "samples_per_s": rate,
                "best_samples_per_s": max(r["samples_per_s"] for r in runs[(name, workers)]),
                "cpu_us_per_sample": cpu,
                "store_cpu_us_per_sample": median((name, workers), "store_cpu_us_per_sample"),
                "vs_webdataset": ratio(rate, median(base, "samples_per_s")) if base in runs else None,
                "cpu_vs_webdataset": ratio(median(base, "cpu_us_per_sample"), cpu) if base in runs else None,
                "vs_streaming": (
                    ratio(rate, median(streaming, "samples_per_s")) if streaming in runs else None
                ),
                "scaling_efficiency": ratio(rate, workers * single) if single else None,
                "repeats": runs[(name, workers)],
            }
        )
    return rows


def versions(streaming: bool) -> dict[str, str]:
    import numpy
    import PIL
    import psutil
    import ray
    import s3fs

    peers = {"mosaicml-streaming": peer_version("streaming", "mosaicml-streaming")} if streaming else {}
    return {
        **peers,
        "psutil": psutil.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "webdataset": webdataset.__version__,
        "s3fs": s3fs.__version__,
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "ray": ray.__version__,
    }


def code_state() -> dict:
    """The commit measured, and which loader files differed from it (the checkout may be shared)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    changed = git("status", "--porcelain", "--", "data_pipeline", "bench/loader.py").splitlines()
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": [line[3:] for line in changed]}


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ceph-bench-", dir="/tmp"))
    kind, endpoint, handles = start_store(workdir)
    stack = contextlib.ExitStack()  # the streaming peer, stopped before the store
    try:
        use_store(endpoint)
        manifest = ingest_dataset(f"s3://{BUCKET}/bench-{args.image_size}px", args)
        print(f"store {kind} at {endpoint}: {manifest.num_samples} samples, {len(manifest.shards)} shards")
        # Ray Data runs last: its cluster processes would otherwise be reaped (and their CPU
        # counted) during the other loaders' epochs.
        baselines = {
            name: functools.partial(epoch_webdataset, decode=spec) for name, spec in BASELINE_DECODES.items()
        }
        loaders = {
            **baselines,
            "tessera": functools.partial(epoch_tessera, shuffle=True),
            "tessera-ordered": functools.partial(epoch_tessera, shuffle=False),
        }
        if args.streaming:
            peer = stack.enter_context(contextlib.closing(StreamingPeer(manifest, f"s3://{BUCKET}/mds")))
            loaders["streaming"] = peer.epoch
        groups = [loaders]
        if args.ray_data:
            groups.append({"ray-data": epoch_ray_data})
        store_pids = pids_of(handles)
        runs: dict[tuple[str, int], list[dict]] = {}
        for loaders in groups:
            for _ in range(args.repeats):
                for name, epoch in loaders.items():
                    for workers in args.workers:
                        result = timed(epoch, manifest, args.batch_size, workers, store_pids)
                        runs.setdefault((name, workers), []).append(result)
                        print(
                            f"  {name:<16} workers={workers}: {result['samples_per_s']:8.1f} samples/s, "
                            f"{result['cpu_us_per_sample']:6.0f} CPU us/sample, "
                            f"store {result['store_cpu_us_per_sample']:4.0f} CPU us/sample"
                        )
    finally:
        stack.close()
        stop_store(handles)
        shutil.rmtree(workdir, ignore_errors=True)

    rows = summarise(runs)
    print(
        f"\n{'loader':<17}{'workers':>8}{'samples/s':>11}{'vs webdataset':>15}{'vs streaming':>14}"
        f"{'scaling eff.':>14}{'CPU us/sample':>15}{'CPU vs webdataset':>19}"
    )
    for row in rows:
        cells = [
            f"{row['vs_webdataset']:.2f}x" if row["vs_webdataset"] else "-",
            f"{row['vs_streaming']:.2f}x" if row["vs_streaming"] else "-",
            f"{row['scaling_efficiency']:.2f}" if row["scaling_efficiency"] else "-",
            f"{row['cpu_us_per_sample']:.0f}",
            f"{row['cpu_vs_webdataset']:.2f}x" if row["cpu_vs_webdataset"] else "-",
        ]
        print(
            f"{row['loader']:<17}{row['workers']:>8}{row['samples_per_s']:>11.1f}"
            f"{cells[0]:>15}{cells[1]:>14}{cells[2]:>14}{cells[3]:>15}{cells[4]:>19}"
        )
    report = {
        "benchmark": "loader",
        "device": "cpu",
        "cores": os.cpu_count(),
        "store": kind,
        "versions": versions(args.streaming),
        "code": code_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "samples": manifest.num_samples,
            "shards": len(manifest.shards),
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "statistic": "median of interleaved repeats (best_samples_per_s: the best repeat)",
            "baseline_decode": BASELINE_DECODES,
            "streaming": "StreamingDataset(shuffle=True, py1e), cold local cache per epoch, PIL decode",
            "cpu": "user+sys of every loader process (bench/cpu_meter.py), the store's daemons apart",
        },
        "note": args.note,
        # Issue 16, at 1 worker: >= 2x plain webdataset (uint8), >= 1x streaming, CPU/sample <= 1/3
        # of webdataset's, shuffle costing <= 10% over shuffle=False.
        "targets": {
            "tessera_vs_webdataset": 2.0,
            "tessera_vs_streaming": 1.0,
            "tessera_cpu_vs_webdataset": 3.0,
            "shuffle_cost": 0.10,
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
