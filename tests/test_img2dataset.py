"""img2dataset's default ``files`` output ingests as a folder source, its metadata parquet notwithstanding.

The layout is img2dataset 1.x's (``output_format="files"``): ``00000/000000000.jpg`` + ``.txt`` + ``.json``
per downloaded sample, and beside each folder ``00000.parquet`` (one row per URL, failures included, no
image bytes) and ``00000_stats.json``. Built by hand: the package pulls wandb, OpenCV and an older
webdataset into the environment.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_pipeline.sources.external import ExternalSource


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_files_output(root, captions: list[str]) -> None:
    shard = root / "00000"
    shard.mkdir(parents=True)
    rows = []
    for index, caption in enumerate(captions):
        key = f"{index:09d}"
        url = f"http://127.0.0.1/{key}.jpg"
        (shard / f"{key}.jpg").write_bytes(jpeg((index * 40, 0, 0)))
        (shard / f"{key}.txt").write_text(caption)
        (shard / f"{key}.json").write_text(json.dumps({"url": url, "key": key, "status": "success"}))
        rows.append({"url": url, "caption": caption, "key": key, "status": "success", "error_message": None})
    rows.append(
        {
            "url": "http://127.0.0.1/gone.jpg",
            "caption": "lost",
            "key": "000000099",
            "status": "failed_to_download",
            "error_message": "404",
        }
    )
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(captions)}))


def test_files_output_is_read_as_images_with_captions(tmp_path):
    captions = ["a red square", "a green circle", "a blue triangle"]
    write_files_output(tmp_path / "out", captions)
    source = ExternalSource.open(str(tmp_path / "out"))
    assert source.kind == "folder" and len(source.files) == 3
    records = [record for part in source.partitions(2, None) for _, record in source.read(part)]
    assert sorted(record.caption for record in records) == sorted(captions)
    assert {record.metadata["status"] for record in records} == {"success"}
    assert all(Image.open(io.BytesIO(record.image)).size == (8, 8) for record in records)


def test_parquet_output_without_loose_images_stays_a_parquet_source(tmp_path):
    rows = [{"jpg": jpeg((0, 0, 200)), "caption": "a blue square"}]
    (tmp_path / "out").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "out" / "00000.parquet")
    (tmp_path / "out" / "00000_stats.json").write_text("{}")
    source = ExternalSource.open(str(tmp_path / "out"))
    assert source.kind == "parquet"
    [(_, record)] = [item for part in source.partitions(1, None) for item in source.read(part)]
    assert record.caption == "a blue square"
