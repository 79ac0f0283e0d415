"""Benchmark: decoded samples/s from an S3 store, Tessera's loader against the plain WebDataset pipeline.

Starts its own single-node Ceph RGW (``infra/object-store-ceph.sh``; a moto server in a subprocess if
the Ceph binaries are missing, which the output then says), ingests a synthetic dataset into it with
the real ``data_pipeline.ingest`` and reads it, one full epoch per measurement, with

- ``webdataset``: ``webdataset.WebDataset(urls).decode("torchrgb8").to_tuple("jpg", "txt")`` in a torch
  DataLoader with ``batch_size`` (what a user would write; s3 opened through one s3fs per worker). It
  decodes to uint8, like Tessera's loader, so the headline ratio compares loaders, not dtypes;
- ``webdataset-float``: the same with ``decode("torchrgb")`` (float32 in [0, 1]), webdataset's usual
  recipe, as a second row;
- ``tessera``: ``data_pipeline.loader.open_loader(...)`` (rank 0 of 1);
- ``ray-data`` (``--ray-data``): ``ray.data.read_webdataset`` over pyarrow's S3 filesystem, ``iter_batches``
  on a local Ray with ``num_cpus`` = workers.

each with 1 and 2 workers, repeats interleaved, medians reported (the best repeat is in the JSON; each
repeat records the 1-minute load average, and ``--note`` says what else shared the machine). CPU
time per sample (this process and its DataLoader workers; the store's daemons beside it) is reported
too, as the cost measure that contention on a shared machine does not move. Ratios come from the same
run: tessera / webdataset at each worker count, and 2-worker / (2 x 1-worker) scaling efficiency.
Writes ``bench/results/loader.json``.
Usage: ``python bench/loader.py [--samples 4000] [--image-size 64] [--batch-size 64] [--ray-data]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import webdataset  # noqa: E402

from data_pipeline.loader import open_loader  # noqa: E402
from data_pipeline.manifest import Manifest, load_manifest  # noqa: E402
from trainer.net import free_port  # noqa: E402

CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin")
ACCESS_KEY, SECRET_KEY, BUCKET = "benchkey", "benchsecret", "tessera-bench"
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
    parser.add_argument("--note", default="", help="conditions of the run, kept in the JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loader.json")
    return parser.parse_args(argv)


def start_store(workdir: Path) -> tuple[str, str, list[subprocess.Popen | int]]:
    """(kind, endpoint, things to stop): Ceph RGW when installed, else a moto server process."""
    port = free_port()
    if all(shutil.which(name) for name in CEPH_BINARIES):
        env = {**os.environ, "CEPH_ACCESS_KEY": ACCESS_KEY, "CEPH_SECRET_KEY": SECRET_KEY}
        subprocess.run(
            ["bash", str(ROOT / "infra" / "object-store-ceph.sh"), str(workdir), str(port), str(free_port())],
            check=True,
            timeout=240,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        return (
            "ceph-rgw",
            f"http://127.0.0.1:{port}",
            [int(p.read_text()) for p in (workdir / "run").glob("*.pid")],
        )
    print("Ceph binaries missing: falling back to a moto server (numbers are NOT Ceph numbers)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(3)
    return "moto", f"http://127.0.0.1:{port}", [proc]


def stop_store(handles: list[subprocess.Popen | int]) -> None:
    for handle in handles:
        if isinstance(handle, subprocess.Popen):
            handle.terminate()
            handle.wait(timeout=20)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle, signal.SIGTERM)


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


def epoch_webdataset(manifest: Manifest, batch_size: int, workers: int, decode: str) -> tuple[int, float]:
    _register_baseline_s3()
    started = time.perf_counter()
    dataset = webdataset.WebDataset(manifest.shard_urls(), shardshuffle=False).decode(decode)
    dataset = dataset.to_tuple("jpg", "txt")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=_register_baseline_s3
    )
    samples = sum(len(images) for images, _ in loader)
    return samples, time.perf_counter() - started


def epoch_tessera(manifest: Manifest, batch_size: int, workers: int) -> tuple[int, float]:
    started = time.perf_counter()
    loader = open_loader(manifest, rank=0, world_size=1, batch_size=batch_size, seed=0, num_workers=workers)
    samples = sum(int(batch["valid"].sum()) for batch in loader)
    return samples, time.perf_counter() - started


def epoch_ray_data(manifest: Manifest, batch_size: int, workers: int) -> tuple[int, float]:
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
        started = time.perf_counter()
        dataset = ray.data.read_webdataset(paths, filesystem=filesystem)
        samples = sum(len(batch["jpg"]) for batch in dataset.iter_batches(batch_size=batch_size))
        return samples, time.perf_counter() - started
    finally:
        shutdown_ray()


def timed(
    epoch: Callable[[Manifest, int, int], tuple[int, float]],
    manifest: Manifest,
    batch: int,
    workers: int,
    store_pids: list[int],
):
    """One epoch: worker start-up included (every epoch pays it), store and cluster start-up not.

    CPU time of this process and its reaped children (the DataLoader workers) is the contention-proof
    cost measure on a shared machine; Ray's workers are not our children, so Ray Data gets none. The
    object store's own CPU (it shares the cores) is reported beside it.
    """
    cpu_before, store_before = _cpu_seconds(), _store_cpu_seconds(store_pids)
    samples, seconds = epoch(manifest, batch, workers)
    cpu = _cpu_seconds() - cpu_before
    store_cpu = _store_cpu_seconds(store_pids) - store_before
    return {
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 1),
        "cpu_us_per_sample": None if epoch is epoch_ray_data else round(cpu * 1e6 / samples, 1),
        "store_cpu_us_per_sample": round(store_cpu * 1e6 / samples, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def _store_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the store's daemons, from /proc (they are not our children)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def summarise(runs: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """Median throughput and CPU cost per (loader, workers), with ratios from the same run.

    ``vs_webdataset``: median samples/s over the baseline's at the same worker count;
    ``cpu_vs_webdataset``: the baseline's CPU per sample over this loader's; ``scaling_efficiency``:
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
        base = ("webdataset", workers)
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
                "scaling_efficiency": ratio(rate, workers * single) if single else None,
                "repeats": runs[(name, workers)],
            }
        )
    return rows


def versions() -> dict[str, str]:
    import numpy
    import PIL
    import ray
    import s3fs

    return {
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
    os.environ.update(
        {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    )
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)
        manifest = ingest_dataset(f"s3://{BUCKET}/bench-{args.image_size}px", args)
        print(f"store {kind} at {endpoint}: {manifest.num_samples} samples, {len(manifest.shards)} shards")
        # Ray Data runs last: its cluster processes would otherwise be reaped (and their CPU
        # counted) during the other loaders' epochs.
        baselines = {
            name: functools.partial(epoch_webdataset, decode=spec) for name, spec in BASELINE_DECODES.items()
        }
        groups = [{**baselines, "tessera": epoch_tessera}]
        if args.ray_data:
            groups.append({"ray-data": epoch_ray_data})
        store_pids = [h.pid if isinstance(h, subprocess.Popen) else h for h in handles]
        runs: dict[tuple[str, int], list[dict]] = {}
        for loaders in groups:
            for _ in range(args.repeats):
                for name, epoch in loaders.items():
                    for workers in args.workers:
                        result = timed(epoch, manifest, args.batch_size, workers, store_pids)
                        runs.setdefault((name, workers), []).append(result)
                        print(
                            f"  {name:<10} workers={workers}: {result['samples_per_s']:8.1f} samples/s, "
                            f"{result['cpu_us_per_sample'] or 0:6.0f} CPU us/sample, "
                            f"store {result['store_cpu_us_per_sample']:4.0f} CPU us/sample"
                        )
    finally:
        stop_store(handles)
        shutil.rmtree(workdir, ignore_errors=True)

    rows = summarise(runs)
    print(
        f"\n{'loader':<11}{'workers':>8}{'samples/s':>11}{'vs webdataset':>15}{'scaling eff.':>14}"
        f"{'CPU us/sample':>15}{'CPU vs webdataset':>19}"
    )
    for row in rows:
        cells = [
            f"{row['vs_webdataset']:.2f}x" if row["vs_webdataset"] else "-",
            f"{row['scaling_efficiency']:.2f}" if row["scaling_efficiency"] else "-",
            f"{row['cpu_us_per_sample']:.0f}" if row["cpu_us_per_sample"] else "-",
            f"{row['cpu_vs_webdataset']:.2f}x" if row["cpu_vs_webdataset"] else "-",
        ]
        print(
            f"{row['loader']:<11}{row['workers']:>8}{row['samples_per_s']:>11.1f}"
            f"{cells[0]:>15}{cells[1]:>14}{cells[2]:>15}{cells[3]:>19}"
        )
    report = {
        "benchmark": "loader",
        "device": "cpu",
        "cores": os.cpu_count(),
        "store": kind,
        "versions": versions(),
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
        },
        "note": args.note,
        "targets": {"tessera_vs_webdataset": 1.5, "scaling_efficiency_1_to_2": 0.8},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
