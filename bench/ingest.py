"""Benchmark: images/s and CPU ms/image turning a folder of JPEGs into 64 px WebDataset shards,
``tessera ingest`` against img2dataset (what a data engineer would pick instead).

Writes ``--images`` synthetic scenes (``--source-size`` px JPEGs with a ``.txt`` caption each) into a
folder, serves it with ``python -m http.server`` on 127.0.0.1 and gives img2dataset a CSV of their URLs
and captions (``--resize_mode center_crop --encode_quality 95``, what Tessera's ingest does: resize +
centre crop, JPEG quality 95); ``tessera ingest`` reads the same folder. Each run is the real command
line in a subprocess (start-up included: a user pays it), writing to a local folder and to a bucket on
a single-node Ceph RGW (``bench/object_store.py``); rows:

- ``img2dataset``, ``--processes_count`` = workers (``--thread_count 16`` downloaders each);
- ``tessera`` (Ray): ``--in-process no --partitions`` = workers, so at most that many Ray tasks run;
- ``tessera`` (in-process): ``--in-process yes`` (one process, no Ray; 1 worker only).

Repeats are interleaved; medians reported. CPU is that of the command and every process under it
(Ray's daemons and workers included; this process is made their subreaper, so a daemon Ray orphans is
still counted): ``resource.getrusage(RUSAGE_CHILDREN)`` around the run. The web server's and the
store's CPU are not in it. ``--tiny`` adds a row per tool for a ``--tiny``-image ingest (local, 1 worker):
what start-up costs, Ray's included. Ratios are from the same run: images/s and CPU per image of
tessera against img2dataset at the same workers and destination (CPU ratio = images per CPU-second,
the per-core figure). img2dataset runs in its own venv (``bench/peers.py``): it pins webdataset<0.3.
Writes ``bench/results/ingest.json``.
Usage: ``python bench/ingest.py [--images 3000] [--repeats 3] [--workers 1 2] [--tiny 10]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from bench.object_store import BUCKET, start_store, stop_store, use_store  # noqa: E402
from bench.peers import peer_python, peer_version  # noqa: E402
from data_pipeline.sources.synthetic import generate_scene  # noqa: E402
from trainer.net import free_port  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
OUTPUT_SIZE = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--source-size", type=int, default=256, help="side of the source JPEGs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dests", nargs="+", choices=("local", "ceph"), default=["local", "ceph"])
    parser.add_argument("--tiny", type=int, default=10, help="images in the start-up row (0: none)")
    parser.add_argument("--note", default="", help="conditions of the run, kept in the JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    return parser.parse_args(argv)


def write_images(folder: Path, count: int, side: int) -> list[tuple[str, str]]:
    """``count`` JPEG scenes with captions in ``folder``; (file name, caption) per image."""
    folder.mkdir(parents=True)
    files = []
    for index in range(count):
        scene = generate_scene(0, index, image_size=side)
        name = f"{index:06d}"
        Image.fromarray(scene.image).save(folder / f"{name}.jpg", quality=95)
        (folder / f"{name}.txt").write_text(scene.caption)
        files.append((f"{name}.jpg", scene.caption))
    return files


def url_list(path: Path, files: list[tuple[str, str]], base_url: str) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        writer.writerows([f"{base_url}/{name}", caption] for name, caption in files)
    return path


def img2dataset_command(urls: Path, dest: str, workers: int) -> list[str]:
    return [
        str(peer_python("img2dataset").parent / "img2dataset"),
        f"--url_list={urls}",
        "--input_format=csv",
        "--url_col=url",
        "--caption_col=caption",
        "--output_format=webdataset",
        f"--output_folder={dest}",
        f"--image_size={OUTPUT_SIZE}",
        "--resize_mode=center_crop",
        "--resize_only_if_bigger=False",
        "--encode_quality=95",
        "--number_sample_per_shard=1000",
        f"--processes_count={workers}",
        "--thread_count=16",
        "--distributor=multiprocessing",
        "--enable_wandb=False",
    ]


def tessera_command(folder: Path, dest: str, workers: int, in_process: bool, run_dir: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "tessera"),
        "ingest",
        f"--source={folder}",
        f"--dest={dest}",
        f"--image-size={OUTPUT_SIZE}",
        f"--partitions={workers}",
        f"--in-process={'yes' if in_process else 'no'}",
        f"--run-dir={run_dir}",
        "--set",
        "ingest.progress=false",
    ]


def img2dataset_count(dest: str) -> int:
    """Images img2dataset wrote, from its per-shard ``*_stats.json``."""
    from data_pipeline import storage

    return sum(
        json.loads(storage.read_bytes(url))["successes"]
        for url in storage.list_files(dest, suffix="_stats.json")
    )


def tessera_count(dest: str) -> int:
    from data_pipeline.manifest import load_manifest

    return load_manifest(dest).num_samples


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _reap_descendants(keep: set[int], timeout: float = 60) -> None:
    """Wait until every process under this one but ``keep`` has exited and been reaped, so its CPU
    is in RUSAGE_CHILDREN before the next run starts (Ray's daemons outlive the command briefly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
        if not left:
            return
        time.sleep(0.2)
    print(f"  warning: {len(left)} processes outlived the run by {timeout:.0f} s: their CPU may count later")


def timed(command: list[str], log: Path, keep: set[int]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``command`` and everything it started."""
    cpu, started = _children_cpu(), time.perf_counter()
    with log.open("ab") as handle:
        handle.write(f"$ {shlex.join(command)}\n".encode())
        handle.flush()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - started
    if code:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{command[0]} exited with {code}; the end of its output:\n{tail}")
    _reap_descendants(keep)
    return seconds, _children_cpu() - cpu


def summarise(runs: dict[tuple, list[dict]]) -> list[dict]:
    """Medians per (tool, mode, dest, workers, images), with tessera / img2dataset ratios."""

    def median(key: tuple, field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    rows = []
    for key in runs:
        tool, mode, dest, workers, images = key
        base = ("img2dataset", "", dest, workers, images)
        rate, cpu = median(key, "images_per_s"), median(key, "cpu_ms_per_image")
        rows.append(
            {
                "tool": tool,
                "mode": mode,
                "dest": dest,
                "workers": workers,
                "images": images,
                "seconds": round(median(key, "seconds"), 2),
                "images_per_s": round(rate, 1),
                "cpu_ms_per_image": round(cpu, 2),
                "vs_img2dataset": round(rate / median(base, "images_per_s"), 2) if base in runs else None,
                "cpu_vs_img2dataset": round(median(base, "cpu_ms_per_image") / cpu, 2)
                if base in runs
                else None,
                "repeats": runs[key],
            }
        )
    return rows


def ray_startup(rows: list[dict], tiny: int) -> float | None:
    """What Ray adds to a tiny local ingest: its median wall time minus the in-process one."""
    seconds = {
        row["mode"]: row["seconds"]
        for row in rows
        if row["tool"] == "tessera" and row["images"] == tiny and row["dest"] == "local"
    }
    return round(seconds["ray"] - seconds["in-process"], 2) if len(seconds) == 2 else None


def versions() -> dict[str, str]:
    import PIL
    import ray

    return {
        "python": platform.python_version(),
        "img2dataset": peer_version("img2dataset", "img2dataset"),
        "ray": ray.__version__,
        "pillow": PIL.__version__,
        "psutil": psutil.__version__,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir="/tmp"))
    peer_python("img2dataset")  # build its venv now, not inside a timed run
    if args.tiny > args.images:
        raise SystemExit(f"--tiny ({args.tiny}) must not exceed --images ({args.images})")
    full_folder, tiny_folder = work / "images", work / "tiny"
    files = write_images(full_folder, args.images, args.source_size)
    tiny_folder.mkdir()
    for name, _ in files[: args.tiny]:
        for suffix in (".jpg", ".txt"):
            shutil.copy(full_folder / name.replace(".jpg", suffix), tiny_folder)

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(full_folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    full_urls = url_list(work / "urls.csv", files[: args.images], base_url)
    tiny_urls = url_list(work / "tiny-urls.csv", files[: args.tiny], base_url)
    store_handles: list = []
    kind = None
    if "ceph" in args.dests:
        kind, endpoint, store_handles = start_store(work / "ceph")
        use_store(endpoint)
    # From here on, a process that a run orphans (Ray's daemons) is re-parented to this one and reaped
    # here, so its CPU is counted; the server and the store started before are not.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    keep = {server.pid}
    log = work / "commands.log"
    plan = []  # (tool, mode, dest kind, workers, images)
    for dest in args.dests:
        for workers in args.workers:
            plan.append(("img2dataset", "", dest, workers, args.images))
            plan.append(("tessera", "ray", dest, workers, args.images))
        plan.append(("tessera", "in-process", dest, 1, args.images))
    if 0 < args.tiny < args.images:  # (tiny == images: the main rows are the tiny ones)
        plan += [
            ("img2dataset", "", "local", 1, args.tiny),
            ("tessera", "ray", "local", 1, args.tiny),
            ("tessera", "in-process", "local", 1, args.tiny),
        ]
    runs: dict[tuple, list[dict]] = {}
    try:
        for repeat in range(args.repeats):
            for tool, mode, dest, workers, images in plan:
                name = f"{tool}-{mode or 'mp'}-{workers}w-{images}-r{repeat}"
                url = f"s3://{BUCKET}/{name}" if dest == "ceph" else str(work / "out" / name)
                if tool == "img2dataset":
                    command = img2dataset_command(
                        full_urls if images == args.images else tiny_urls, url, workers
                    )
                else:
                    folder = full_folder if images == args.images else tiny_folder
                    command = tessera_command(
                        folder, url, workers, mode == "in-process", work / "runs" / name
                    )
                seconds, cpu = timed(command, log, keep)
                written = img2dataset_count(url) if tool == "img2dataset" else tessera_count(url)
                if written != images:
                    raise RuntimeError(f"{name}: wrote {written} of {images} images (see {log})")
                result = {
                    "seconds": round(seconds, 3),
                    "images_per_s": round(images / seconds, 1),
                    "cpu_ms_per_image": round(cpu * 1e3 / images, 2),
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
                runs.setdefault((tool, mode, dest, workers, images), []).append(result)
                print(
                    f"  {tool:<12}{mode:<11}{dest:<6}{workers}w {images:>6} images: {seconds:7.2f} s, "
                    f"{result['images_per_s']:7.1f} images/s, {result['cpu_ms_per_image']:6.2f} CPU ms/image",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=20)
        stop_store(store_handles)
        shutil.rmtree(work, ignore_errors=True)

    rows = summarise(runs)
    startup = ray_startup(rows, args.tiny)
    print(
        f"\n{'tool':<12}{'mode':<11}{'dest':<6}{'workers':>8}{'images':>8}{'seconds':>9}{'images/s':>10}"
        f"{'vs img2dataset':>16}{'CPU ms/image':>14}{'per core vs img2dataset':>25}"
    )
    for row in rows:
        ratio = f"{row['vs_img2dataset']:.2f}x" if row["vs_img2dataset"] else "-"
        per_core = f"{row['cpu_vs_img2dataset']:.2f}x" if row["cpu_vs_img2dataset"] else "-"
        print(
            f"{row['tool']:<12}{row['mode']:<11}{row['dest']:<6}{row['workers']:>8}{row['images']:>8}"
            f"{row['seconds']:>9.2f}{row['images_per_s']:>10.1f}{ratio:>16}{row['cpu_ms_per_image']:>14.2f}"
            f"{per_core:>25}"
        )
    report = {
        "benchmark": "ingest",
        "device": "cpu",
        "cores": os.cpu_count(),
        "store": kind,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "images": args.images,
            "source_size": args.source_size,
            "output_size": OUTPUT_SIZE,
            "tiny": args.tiny,
            "repeats": args.repeats,
            "statistic": "median of interleaved repeats; each run is the whole command line",
            "cpu": "RUSAGE_CHILDREN around the command (Ray processes included), server and store apart",
        },
        "note": args.note,
        # Issue 16: >= 1.5x img2dataset per core; Ray start-up <= 2 s of a local ingest.
        "targets": {"tessera_per_core_vs_img2dataset": 1.5, "ray_startup_s": 2.0},
        "ray_startup_s": startup,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if startup is not None:
        print(
            f"Ray start-up in a {args.tiny}-image local ingest (Ray minus in-process wall): {startup:.2f} s"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
