"""The docs tables of the peer benchmarks (bench/ingest.py; bench/loader.py's streaming and shuffle rows)
come from their JSON through `bench/report.py`, like every other figure.

No benchmark runs here: the JSON below has the shape the scripts write, with made-up numbers.
"""

from __future__ import annotations

import json

from tests.test_bench_report import copy_of_docs_and_results, report


def ingest_row(tool: str, mode: str, dest: str, workers: int, images: int, seconds: float, cpu_ms: float):
    return {
        "tool": tool,
        "mode": mode,
        "dest": dest,
        "workers": workers,
        "images": images,
        "seconds": seconds,
        "images_per_s": round(images / seconds, 1),
        "cpu_ms_per_image": cpu_ms,
        "vs_img2dataset": None,
        "cpu_vs_img2dataset": None,
        "repeats": [{"load_average_1min": 0.5}],
    }


INGEST = {
    "benchmark": "ingest",
    "cores": 16,
    "store": "ceph-rgw",
    "versions": {"img2dataset": "1.47.0", "ray": "2.60.0"},
    "date": "2026-11-24T10:00:00+00:00",
    "command": "python bench/ingest.py",
    "settings": {"images": 3000, "source_size": 256, "output_size": 64, "tiny": 10, "repeats": 3},
    "note": "",
    "ray_startup_s": 1.43,
    "results": [
        ingest_row("img2dataset", "", "local", 1, 3000, 10.0, 3.0),
        {
            **ingest_row("tessera", "in-process", "local", 1, 3000, 5.0, 1.5),
            "vs_img2dataset": 2.0,
            "cpu_vs_img2dataset": 2.0,
        },
        ingest_row("tessera", "ray", "local", 1, 10, 4.0, 500.0),
    ],
}


def test_ingest_results_reach_the_docs_only_through_the_report(tmp_path):
    root = copy_of_docs_and_results(tmp_path)
    (root / "bench" / "results" / "ingest.json").write_text(json.dumps(INGEST))
    stale = report(root, "--check")
    assert stale.returncode == 1
    assert "docs/benchmarks.md: ingest" in stale.stdout and "docs/benchmarks.md: summary" in stale.stdout

    assert report(root).returncode == 0 and report(root, "--check").returncode == 0
    doc = (root / "docs" / "benchmarks.md").read_text()
    assert "| **tessera** | in-process | local | 1 | 3,000 | 5.0 | 600 | 2.00x | 1.50 | 2.00x |" in doc
    assert "| img2dataset | processes | local | 1 | 3,000 | 10.0 | 300 | - | 3.00 | - |" in doc
    assert "Ray start-up in a 10-image local ingest (Ray minus in-process wall time): 1.43 s" in doc
    summary = next(line for line in doc.splitlines() if line.startswith("| ingest of a folder"))
    assert "local, 1 worker (in-process): **2.00x** images/s, **2.00x** per core" in summary
    assert "Ray start-up 1.4 s (10 images)" in summary


def test_streaming_and_shuffle_rows_of_the_loader_table(tmp_path):
    root = copy_of_docs_and_results(tmp_path)
    path = root / "bench" / "results" / "loader.json"
    loader = json.loads(path.read_text())
    tessera = next(r for r in loader["results"] if r["loader"] == "tessera" and r["workers"] == 1)
    base = next(r for r in loader["results"] if r["loader"] == "webdataset" and r["workers"] == 1)
    streaming = {**base, "loader": "streaming", "samples_per_s": 1000.0, "vs_webdataset": 0.42}
    ordered = {**tessera, "loader": "tessera-ordered", "samples_per_s": tessera["samples_per_s"] * 1.05}
    tessera["vs_streaming"] = round(tessera["samples_per_s"] / 1000.0, 2)
    loader["results"] += [streaming, ordered]
    loader["versions"]["mosaicml-streaming"] = "0.13.0"
    loader["targets"] = {"tessera_vs_webdataset": 2.0, "tessera_vs_streaming": 1.0, "shuffle_cost": 0.1}
    path.write_text(json.dumps(loader))

    assert report(root).returncode == 0
    table = (root / "docs" / "loader.md").read_text()
    assert "| loader | workers | samples/s | vs webdataset | vs streaming | scaling 1->2 |" in table
    assert "| mosaic `StreamingDataset` (MDS, shuffled, cold cache) | 1 | 1,000 | 0.42x |" in table
    assert "mosaicml-streaming 0.13.0" in table
    lines = (root / "docs" / "benchmarks.md").read_text().splitlines()
    summary = next(line for line in lines if "loader throughput" in line)
    assert f"**{tessera['vs_streaming']:.2f}x** mosaic streaming (1 worker)" in summary
    assert "shuffle costs 5% (1 worker)" in summary
    assert ">= 2x, >= 1x streaming, shuffle <= 10% over shuffle=False" in summary
