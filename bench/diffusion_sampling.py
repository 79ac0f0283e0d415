"""Benchmark: latent diffusion samplers (DDPM-1000, DDIM-50, DPM-Solver++-20) and training throughput.

1. Sampler accuracy without a network: data ~ N(0.7, 0.4^2) has a closed-form exact denoiser, so
   each sampler's output moments against the data's measure its own discretisation error.
2. With a trained checkpoint of ``configs/diffusion/tiny.toml`` (``--checkpoint``, default: the newest
   of that run, e.g. after ``make demo``): wall time to draw ``--images`` guided samples for the
   held-out prompts, and their pixel-statistics gap to real images (mean over RGB of |mean gap| +
   |std gap|; FID on 32 px synthetic scenes with a few dozen images would be noise).
3. Training throughput of the tiny and small presets through the real Engine (fp32, ZeRO-0, one
   rank): samples/s and the achieved TFLOP/s from the model's counted FLOPs (MFU needs a known peak;
   none for CPUs).
Writes ``bench/results/diffusion_sampling.json``.
Usage: ``python bench/diffusion_sampling.py [--checkpoint URL] [--images 16] [--train-steps 5]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/diffusion_sampling.py` imports its sibling bench.sampling

import torch  # noqa: E402

from bench.sampling import device_name  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.stage_inputs import resolve_stage_inputs  # noqa: E402
from trainer.config import EngineConfig  # noqa: E402
from trainer.diffusion import NoiseSchedule, sample  # noqa: E402
from trainer.diffusion.ema import WithEMA  # noqa: E402
from trainer.diffusion.inference import generate, load_denoiser, load_frozen_autoencoder  # noqa: E402
from trainer.engine import Engine  # noqa: E402
from trainer.inference import resolve_checkpoint  # noqa: E402
from trainer.models import build, count_parameters  # noqa: E402
from trainer.stages.diffusion import DiffusionStageConfig, make_loss_fn, pixel_stat_gap, sample_prompts  # noqa: E402
from trainer.stages.loop import checkpoint_dir_of, fixed_validation_batch  # noqa: E402

SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("dpmpp", 20)]
DATA_MEAN, DATA_STD = 0.7, 0.4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "diffusion" / "tiny.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--checkpoint", default="auto")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument(
        "--train-batch", type=int, help="micro-batch for the throughput runs (default: the preset's)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "diffusion_sampling.json")
    return parser.parse_args(argv)


def gaussian_oracle() -> dict[str, dict[str, float]]:
    schedule = NoiseSchedule("scaled_linear", 1000)
    abar = schedule.alphas_cumprod

    def denoise(x, t):
        a = abar[t].view(-1, 1).sqrt()
        return (1 - a**2).sqrt() * (x - a * DATA_MEAN) / (a**2 * DATA_STD**2 + 1 - a**2)

    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}
    for sampler, steps in SAMPLERS:
        out = sample(
            denoise, schedule, noise, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1)
        )
        results[f"{sampler}-{steps}"] = {
            "mean_error": abs(float(out.mean()) - DATA_MEAN),
            "std_error": abs(float(out.std()) - DATA_STD),
        }
    return results


def trained_samplers(args: argparse.Namespace) -> dict | None:
    config = resolve_stage_inputs(load_config(DiffusionStageConfig, args.config, args.overrides))
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, checkpoint_dir_of(config))
    except FileNotFoundError as exc:
        print(f"no trained checkpoint ({exc}); skipping the trained-model part", flush=True)
        return None
    from data_pipeline.tokenizer import load_tokenizer

    net = load_denoiser(checkpoint)
    autoencoder = load_frozen_autoencoder(config.diffusion.autoencoder_checkpoint)
    tokenizer = load_tokenizer(config.data.tokenizer)
    prompts = sample_prompts(
        config.model_copy(
            update={"diffusion": config.diffusion.model_copy(update={"samples_per_scale": args.images})}
        )
    )
    tokens = tokenizer.encode_batch(prompts, config.model.text.text_len)
    data = config.model_copy(update={"data": config.data.model_copy(update={"validation_batch_size": 256})})
    real = fixed_validation_batch(data)["image"].float() / 255.0
    schedule = NoiseSchedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    rows = {}
    for sampler, steps in SAMPLERS:
        started = time.perf_counter()
        images = generate(
            net,
            autoencoder,
            tokens,
            schedule,
            guidance=args.guidance,
            sampler=sampler,
            steps=steps,
            prediction=config.diffusion.prediction,
        )
        seconds = time.perf_counter() - started
        rows[f"{sampler}-{steps}"] = {
            "seconds": seconds,
            "images_per_s": len(prompts) / seconds,
            "pixel_gap": pixel_stat_gap(images, real),
        }
        print(f"  {sampler}-{steps}: {seconds:.2f} s", flush=True)
    return {"checkpoint": checkpoint, "images": len(prompts), "guidance": args.guidance, "samplers": rows}


def training_throughput(preset: str, steps: int, batch_size: int | None) -> dict:
    config = load_config(
        DiffusionStageConfig, ROOT / "configs" / "diffusion" / f"{preset}.toml", ["data.manifest='unused'"]
    )
    torch.manual_seed(0)
    net = build(config.model, device="cpu")
    batch_size = batch_size or config.engine.micro_batch_size
    engine = Engine(
        WithEMA(net, config.diffusion.ema_decay),
        EngineConfig(micro_batch_size=batch_size, total_steps=steps + 1),
        make_loss_fn(config.diffusion, NoiseSchedule(config.diffusion.schedule)),
        flops_per_sample=net.flops_per_sample(),
    )
    m = config.model
    batch = {
        "latents": torch.randn(batch_size, m.latent_channels, m.latent_size, m.latent_size),
        "text": torch.randint(1, m.text.vocab_size, (batch_size, m.text.text_len)),
        "t": torch.randint(0, 1000, (batch_size,)),
        "noise": torch.randn(batch_size, m.latent_channels, m.latent_size, m.latent_size),
    }
    engine.train_step(batch)  # warm-up
    results = [engine.train_step(batch) for _ in range(steps)]
    best = min(results, key=lambda r: r.step_time_s)
    return {
        "parameters": count_parameters(net),
        "micro_batch_size": batch_size,
        "latent": [m.latent_channels, m.latent_size, m.latent_size],
        "samples_per_s": best.samples_per_s,
        "tflops": best.tflops,
        "mfu": best.mfu,
        "train_flops_per_sample": net.flops_per_sample(),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    oracle = gaussian_oracle()
    trained = trained_samplers(args)
    training = {}
    for preset in ("tiny", "small"):
        training[preset] = training_throughput(preset, args.train_steps, args.train_batch)
        print(f"  train {preset}: {training[preset]['samples_per_s']:.2f} samples/s", flush=True)
    result = {
        "benchmark": "diffusion_sampling",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name("cpu"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "gaussian_oracle": oracle,
        "trained": trained,
        "training": training,
    }
    print("\nsampler        oracle |mean err|  oracle |std err|  wall s  pixel gap")
    for name, errors in oracle.items():
        row = trained["samplers"][name] if trained else {}
        print(
            f"{name:<14} {errors['mean_error']:>17.4f} {errors['std_error']:>17.4f} "
            f"{row.get('seconds', float('nan')):>7.2f} {row.get('pixel_gap', float('nan')):>10.4f}"
        )
    for preset, row in training.items():
        print(
            f"train {preset}: {row['parameters'] / 1e6:.2f}M params, "
            f"{row['samples_per_s']:.1f} samples/s, {row['tflops'] or 0:.4f} TFLOP/s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
