"""The mosaic ``streaming`` peer of ``bench/loader.py``, run in its own virtualenv (see ``bench/peers.py``).

mosaicml-streaming pins numpy<2.2 and needs transformers (whose tokenizers pin clashes with Tessera's),
so it cannot share Tessera's environment; ``bench/loader.py`` starts this script once with the peer
venv's Python and talks to it over stdin/stdout, one JSON line per request, so its epochs interleave
with the other loaders' and its import cost (seconds) is paid once, untimed:

- ``{"op": "convert", "shards": [s3 urls], "remote": "s3://bucket/mds"}``: copy every sample of
  the given WebDataset shards into an MDS dataset (``jpg`` kept as the same JPEG bytes, ``txt`` as str);
- ``{"op": "epoch", "remote": ..., "batch_size": B, "workers": W}``: one full epoch through a plain
  torch DataLoader over a ``StreamingDataset`` (shuffle on, py1e, the default; a fresh local cache,
  so every epoch downloads its shards as a training run's first epoch does), decoding each JPEG to a
  uint8 ``(H, W, 3)`` array with PIL; answers samples and seconds (the caller counts the CPU of this
  process and its workers, as it does for every loader).

Only the core package is imported: ``streaming.vision``/``text``/``multimodal`` (torchvision and
transformers datasets) are stubbed before ``import streaming``, as nothing here uses them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import types

for _name in ("vision", "text", "multimodal"):
    sys.modules[f"streaming.{_name}"] = types.ModuleType(f"streaming.{_name}")

import boto3  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from streaming import MDSWriter, StreamingDataset  # noqa: E402
from streaming.base.util import clean_stale_shared_memory  # noqa: E402


class DecodedStreamingDataset(StreamingDataset):
    def __getitem__(self, index: int):
        sample = super().__getitem__(index)
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        return torch.from_numpy(image.copy()), sample["txt"]


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def convert(shards: list[str], remote: str) -> dict:
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    samples = 0
    with MDSWriter(out=remote, columns={"jpg": "bytes", "txt": "str"}, size_limit="64mb") as writer:
        for url in shards:
            bucket, key = _split(url)
            data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                for member in archive.getmembers():
                    stem, _, ext = member.name.partition(".")
                    members.setdefault(stem, {})[ext] = archive.extractfile(member).read()
            for parts in members.values():
                writer.write({"jpg": parts["jpg"], "txt": parts["txt"].decode("utf-8")})
                samples += 1
    return {"samples": samples}


def epoch(remote: str, batch_size: int, workers: int) -> dict:
    clean_stale_shared_memory()
    local = tempfile.mkdtemp(prefix="mds-cache-")
    try:
        started = time.perf_counter()
        dataset = DecodedStreamingDataset(remote=remote, local=local, shuffle=True, batch_size=batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        samples = sum(len(images) for images, _ in loader)
        seconds = time.perf_counter() - started
        del loader, dataset
        return {"samples": samples, "seconds": seconds}
    finally:
        shutil.rmtree(local, ignore_errors=True)


def main() -> int:
    torch.set_num_threads(1)
    # Answers go out on the original stdout; anything a library prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "convert":
            answer = convert(request["shards"], request["remote"])
        else:
            answer = epoch(request["remote"], request["batch_size"], request["workers"])
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
