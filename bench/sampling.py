"""Benchmark: drawing 1024 image codes (32x32 grid) with the KV cache against recomputing the prefix.

One small DALL-E transformer (default: 4 layers, 8 heads x 32, 32 text tokens, row/column/conv/full
masks), one batch of captions, the same seeded sampler (top-k) two ways:

- ``cache``: ``trainer.sampling.generate_codes(use_cache=True)``: the caption is prefilled once, then
  each new code runs one position through the network against cached keys/values (its mask row);
- ``no-cache``: the same call with ``use_cache=False``, i.e. every code re-runs the whole prefix
  through the model, which is what a generate loop without a cache (the baseline a user would have) does.

Both use the same weights and generator, so the codes should match; the script reports the fraction
that does (float32 logits of the two paths differ by rounding, which can flip a near-tie draw and
everything after it). Repeats are interleaved and the best time of each kept (shared machine).
Writes ``bench/results/sampling.json``.
Usage: ``python bench/sampling.py [--batch 2] [--repeats 1] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.sampling import SamplingConfig, generate_codes

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--image-side", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1: small decode ops thrash on a shared box)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampling.json")
    return parser.parse_args(argv)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def timed(model: DalleTransformer, text: torch.Tensor, config: SamplingConfig) -> tuple[float, torch.Tensor]:
    if text.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    codes = generate_codes(model, text, config)
    if text.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, codes


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = DalleConfig(
        text_vocab_size=1000,
        text_len=args.text_len,
        image_vocab_size=512,
        image_side=args.image_side,
        depth=args.depth,
        heads=args.heads,
        head_dim=args.head_dim,
        attention_cycle=["row", "column", "conv"],
        conv_kernel_size=5,
    )
    model = DalleTransformer(config).to(args.device).eval()
    text = torch.randint(1, config.text_vocab_size, (args.batch, config.text_len), device=args.device)
    settings = {"top_k": 64, "seed": 0}
    times: dict[str, list[float]] = {"cache": [], "no-cache": []}
    codes: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, use_cache in (("cache", True), ("no-cache", False)):
            seconds, codes[name] = timed(model, text, SamplingConfig(use_cache=use_cache, **settings))
            times[name].append(seconds)
            print(f"  {name:9s} {seconds:8.2f} s", flush=True)
    best = {name: min(values) for name, values in times.items()}
    tokens = args.batch * config.image_len
    speedup = best["no-cache"] / best["cache"]
    match = float((codes["cache"] == codes["no-cache"]).float().mean())
    result = {
        "benchmark": "sampling",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(args.device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            **config.model_dump(include={"depth", "heads", "head_dim", "text_len", "image_side"}),
            "layer_attention": model.layer_attention(),
        },
        "batch": args.batch,
        "image_tokens_per_sample": config.image_len,
        "sampling": settings,
        "seconds": best,
        "all_seconds": times,
        "tokens_per_s": {name: tokens / seconds for name, seconds in best.items()},
        "speedup_cache_over_no_cache": speedup,
        "codes_identical_fraction": match,
        "target_speedup": 10.0,
    }
    rows = [
        ("method", "best s", "codes/s"),
        *((name, f"{best[name]:.2f}", f"{tokens / best[name]:.0f}") for name in ("no-cache", "cache")),
    ]
    print(
        f"\n{args.batch} x {config.image_len} image codes, {result['model']['parameters'] / 1e6:.1f}M params"
    )
    for row in rows:
        print(f"{row[0]:<10} {row[1]:>9} {row[2]:>9}")
    print(f"speedup (no-cache / cache): {speedup:.1f}x  (target >= 10x); identical codes: {match:.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
